// The accuracy suite, shared by the CPU tests (accuracy.test.ts) and the GPU tests
// (gpu.test.ts): every contract case, both input distributions, through each entry point.

import type { ExecutionContext } from 'ava'
import { decode, decodeSync, flashMlaWithKvcache, getMlaMetadata, type Device, type Tensor } from '../index'
import {
  BASE_SEED,
  CASES,
  DISTS,
  caseSeed,
  caseTensors,
  checkAccuracy,
  makeCase,
  referenceDecode,
  type CaseData,
  type Reference,
} from './_helpers'

/** How a case is run: the four public ways to decode. */
export type Mode = 'decode' | 'decode+plan' | 'decodeSync' | 'flashMlaWithKvcache'
export const MODES: Mode[] = ['decode+plan', 'decode', 'decodeSync', 'flashMlaWithKvcache']

export interface RunResult {
  out: Float32Array
  lse: Float32Array
}

/** Runs one case on `dev` through `mode`, returning host copies of out and lse. */
export async function runCase(dev: Device, c: CaseData, mode: Mode): Promise<RunResult> {
  const { q, kvCache, blockTable, cacheSeqlens } = caseTensors(dev, c)
  const { causal, softmaxScale, sQ, hQ } = c.cfg
  const opts = { causal, ...(softmaxScale !== undefined ? { softmaxScale } : {}) }
  let out: Tensor
  let lse: Tensor
  switch (mode) {
    case 'decode': {
      ;({ out, lse } = await decode({ q, kvCache, blockTable, cacheSeqlens, ...opts }))
      break
    }
    case 'decode+plan': {
      const plan = dev.plan(cacheSeqlens, { sQ, hQ })
      ;({ out, lse } = await decode({ q, kvCache, blockTable, cacheSeqlens, plan, ...opts }))
      plan.dispose()
      break
    }
    case 'decodeSync': {
      ;({ out, lse } = decodeSync({ q, kvCache, blockTable, cacheSeqlens, ...opts }))
      break
    }
    case 'flashMlaWithKvcache': {
      const md = getMlaMetadata(cacheSeqlens, sQ * hQ, 1)
      ;[out, lse] = await flashMlaWithKvcache(
        q,
        kvCache,
        blockTable,
        cacheSeqlens,
        512,
        md.tileSchedulerMetadata,
        md.numSplits,
        softmaxScale,
        causal,
      )
      break
    }
  }
  const r = { out: await out.toFloat32Array(), lse: await lse.toFloat32Array() }
  for (const x of [q, kvCache, blockTable, cacheSeqlens, out, lse]) x.dispose()
  return r
}

export interface AccuracyCase {
  title: string
  data: () => CaseData
  ref: () => Reference
  mode: Mode
}

/** Every (case, distribution) pair, with a mode rotating through the entry points. */
export function accuracyCases(): AccuracyCase[] {
  const list: AccuracyCase[] = []
  CASES.forEach((cfg, i) => {
    DISTS.forEach((dist, k) => {
      const mode = MODES[(i * DISTS.length + k) % MODES.length]!
      let data: CaseData | undefined
      let ref: Reference | undefined
      list.push({
        title: `${cfg.name} lens [${cfg.seqlens.join(',')}] ${dist} via ${mode}`,
        data: () => (data ??= makeCase(cfg, dist, caseSeed(i, dist))),
        ref: () => (ref ??= referenceDecode((data ??= makeCase(cfg, dist, caseSeed(i, dist))))),
        mode,
      })
    })
  })
  return list
}

/** Runs one accuracy case on `dev` and checks it against the f64 reference. */
export async function checkCase(t: ExecutionContext, dev: Device, ac: AccuracyCase): Promise<RunResult> {
  const c = ac.data()
  t.log(`case seed ${c.seed}; MLA_TEST_SEED=${BASE_SEED} replays the run; ${dev.info.name}`)
  const r = await runCase(dev, c, ac.mode)
  const err = checkAccuracy(t, ac.title, c.cfg.dtype, r.out, r.lse, ac.ref())
  t.log(`rel L2 ${err.toExponential(2)}`)
  return r
}
