#!/usr/bin/env bash
# npm pack test: `npm run package` (both tarballs into packages/), then installs them with
# no registry access into a fresh project under a path with spaces and non-ASCII characters
# (as an Electron app's resources folder may be), and loads the package with plain node
# (require and import) to run a tiny CPU decode, runs its bin, and type-checks a TypeScript
# consumer against the shipped .d.ts. Then installs the main tarball alone and checks that
# the load error names the missing package and file.
#
# Needs: the build (`npm run build`, or bootstrap.sh). MLA_PACKAGE_NO_BUILD=1 (npm test
# sets it) packs that build as it is instead of running `npm run build` first.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
node_file=mla-decode.linux-x64-gnu.node
npm run --silent package
version=$(node -p "require('./package.json').version")
main_tgz=$root/packages/mla-decode-$version.tgz
plat_tgz=$root/packages/mla-decode-linux-x64-gnu-$version.tgz
[[ -f $main_tgz && -f $plat_tgz ]] || { echo "pack-test: npm run package did not write both tarballs" >&2; exit 1; }
tar -tzf "$main_tgz" | sed 's/^/   main: /'
tar -tzf "$plat_tgz" | sed 's/^/   platform: /'

base=$(mktemp -d "${TMPDIR:-/tmp}/mla pack tëst.XXXXXX")
trap 'rm -rf "$base"' EXIT
work="$base/Ünïcode app dir"
mkdir -p "$work/app" "$work/main-only"

echo "== install both tarballs into a fresh project (offline) at '$work/app'"
cd "$work/app"
printf '{ "name": "mla-pack-test-app", "version": "1.0.0", "private": true }\n' > package.json
npm install --offline --no-audit --no-fund --no-save --loglevel=error "$plat_tgz" "$main_tgz"
[[ -f node_modules/mla-decode/dist/index.js ]]
[[ -f node_modules/mla-decode-linux-x64-gnu/$node_file ]]

cat > smoke.cjs <<'JS'
const assert = require('node:assert')
const m = require('mla-decode')
const dev = m.Device.open('cpu')
const cache = new m.KvCache(dev, { numBlocks: 4, dtype: 'bf16' })
const a = cache.createSequence()
const b = cache.createSequence()
cache.append(a, new Float32Array(100 * 576).fill(0.01))
cache.append(b, new Float32Array(3 * 576).fill(0.02))
const { blockTable, cacheSeqlens } = cache.batch([a, b])
const q = dev.tensor(new Float32Array(2 * 16 * 576).fill(0.01), [2, 1, 16, 576], 'bf16')
const { out, lse } = m.decodeSync({ q, kvCache: cache, blockTable, cacheSeqlens })
const o = out.toFloat32ArraySync()
assert.deepStrictEqual(out.shape, [2, 1, 16, 512])
assert.ok(Math.abs(o[0] - 0.01) < 1e-4 && Math.abs(o[o.length - 1] - 0.02) < 1e-4, `out ${o[0]} ${o[o.length - 1]}`)
const l = lse.toFloat32ArraySync()
assert.ok(Math.abs(l[0] - (Math.log(100) + 576 * 0.01 * 0.01 / 24)) < 1e-3, `lse ${l[0]}`)
try { m.Device.open('bogus') } catch (e) { assert.ok(e instanceof m.MlaError && e.code === 'ERR_INVALID_ARGUMENT') }
const loaded = Object.keys(require.cache).find((k) => k.endsWith('.node'))
assert.ok(loaded && loaded.includes('node_modules/mla-decode-linux-x64-gnu/'), `native module loaded from ${loaded}`)
assert.ok(loaded.includes(' ') && /[^\x00-\x7f]/.test(loaded), `not under the test's spaced, non-ASCII path: ${loaded}`)
console.log(`require: ok (${dev.info.name}; native module from ${loaded.slice(loaded.indexOf('node_modules'))}; gpu: ${JSON.stringify(m.gpuStatus())})`)
JS
node smoke.cjs

cat > smoke.mjs <<'JS'
import { Device, decode, getMlaMetadata, flashMlaWithKvcache, f32ToBf16, bf16ToF32 } from 'mla-decode'
const dev = Device.open('cpu')
const q = dev.tensor(f32ToBf16(new Float32Array(1 * 2 * 3 * 576).fill(0.5)), [1, 2, 3, 576], 'bf16')
const kv = dev.tensor(new Float32Array(2 * 64 * 576).fill(0.25), [2, 64, 1, 576], 'bf16')
const bt = dev.tensor(new Int32Array([1, 2147480000]), [1, 2])
const sl = dev.tensor(new Int32Array([10]), [1])
const { out } = await decode({ q, kvCache: kv, blockTable: bt, cacheSeqlens: sl, causal: true })
if (out.toFloat32ArraySync()[0] !== 0.25) throw new Error('decode result')
const md = getMlaMetadata(sl, 2 * 3, 1)
const [o2, lse] = await flashMlaWithKvcache(q, kv, bt, sl, 512, md.tileSchedulerMetadata, md.numSplits, undefined, true)
if (o2.shape.join() !== '1,2,3,512' || lse.shape.join() !== '1,3,2') throw new Error('shapes')
if (bf16ToF32(f32ToBf16(new Float32Array([1.5])))[0] !== 1.5) throw new Error('conversion')
console.log('import: ok')
JS
node smoke.mjs

cat > consumer.ts <<'TS'
import { Device, KvCache, decode, MlaError, type ErrorCode, type DecodeResult } from 'mla-decode'
async function main(): Promise<void> {
  using dev = Device.open('auto')
  using cache = new KvCache(dev, { numBlocks: 2 })
  const s: number = cache.createSequence()
  cache.append(s, new Float32Array(576))
  const { blockTable, cacheSeqlens } = cache.batch([s])
  const q = dev.tensor(new Float32Array(576), [1, 1, 1, 576], 'bf16')
  const r: DecodeResult = await decode({ q, kvCache: cache, blockTable, cacheSeqlens })
  const code: ErrorCode = 'ERR_SHAPE'
  const e = new MlaError(code, 'x')
  const p: bigint | null = r.out.devicePtr
  void e; void p
}
void main()
TS
cat > tsconfig.json <<'JSON'
{ "compilerOptions": { "strict": true, "noEmit": true, "module": "node16", "moduleResolution": "node16",
  "target": "ES2022", "lib": ["ES2022", "ESNext.Disposable"], "types": [], "skipLibCheck": false },
  "files": ["consumer.ts"] }
JSON
"$root/node_modules/.bin/tsc" -p tsconfig.json
echo "typescript consumer: ok"

./node_modules/.bin/mla-decode info --device cpu | sed 's/^/   bin: /'
info_out=$(./node_modules/.bin/mla-decode info --device cpu) || { echo "pack-test: the bin failed" >&2; exit 1; }
grep -q '^device (cpu): CPU backend' <<<"$info_out" || { echo "pack-test: the bin did not run" >&2; exit 1; }

echo "== the main package without its platform package: the error says what is missing"
cd "$work/main-only"
printf '{ "name": "mla-pack-test-main-only", "version": "1.0.0", "private": true }\n' > package.json
npm install --offline --no-audit --no-fund --no-save --loglevel=error --omit=optional "$main_tgz"
[[ ! -e node_modules/mla-decode-linux-x64-gnu ]] || { echo "pack-test: --omit=optional still installed the platform package" >&2; exit 1; }
cat > missing.cjs <<'JS'
const assert = require('node:assert')
try {
  require('mla-decode')
  assert.fail('loaded without the native module')
} catch (e) {
  assert.strictEqual(e.code, 'MODULE_NOT_FOUND', String(e))
  for (const part of ['mla-decode-linux-x64-gnu@', 'mla-decode.linux-x64-gnu.node', 'npm install mla-decode-linux-x64-gnu@', 'asarUnpack']) {
    assert.ok(e.message.includes(part), `message lacks '${part}': ${e.message}`)
  }
  assert.ok(!/wasm32|npm has a bug/.test(e.message), e.message)
  console.log(`missing native module: ok (${e.message.slice(0, 120)}...)`)
}
JS
node missing.cjs
echo "pack-test: ok"
