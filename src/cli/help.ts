/** The `mla-decode --help` text. */

export const HELP = `mla-decode: MLA decoding (FlashMLA-compatible) for Node.js

Usage:
  mla-decode bench [options]   run the benchmark; print a table, write CSV + SVG
  mla-decode bench --host      the host benchmark (see below); write host.csv, host-ops.csv
  mla-decode bench --host-breakdown
                               phases of one call of each host-path mode (see below);
                               write host-breakdown.csv
  mla-decode bench --devices all|LIST
                               the same configurations on several GPUs at once (see
                               below); write bench-multi.csv
  mla-decode info [--device D] GPU status and the device that would run
  mla-decode --help            this text

bench options:
  --device auto|cpu|cuda[:n]   device (default auto: CUDA device 0 if usable, else CPU)
  --quick                      fewer configurations: FlashMLA's grid at mean length 4096
                               only (plus the beyond-grid shapes); on the CPU backend,
                               mean 1024 only and no multi-token shapes
  --suite flashmla|cpu         which configurations (default: flashmla on CUDA, cpu on
                               the CPU backend). flashmla: FlashMLA's grid (b=128, mean
                               length 4096/8192/16384, h_q 16/32/64/128, s_q 1/2, fixed
                               and variable lengths) then short contexts, an imbalanced
                               batch and multi-token prediction. cpu: a reduced grid
                               (b=8, means 1024/4096, h_q 16/128, s_q 1/2, fixed and
                               variable lengths, the imbalanced batch, multi-token at
                               b=8): the b=128 grid takes far too long on a few
                               CPU cores (half an hour or more on 2 cores).
  --reps N                     timed runs per configuration, median reported
                               (default 30 on CUDA, 5 on the CPU backend)
  --dtype bf16|fp16            element type (default bf16, as FlashMLA's grid)
  --filter PREFIX              only labels starting with PREFIX (tag/s_q/mean/h_q/varlen,
                               e.g. grid/1/4096 or mtp)
  --anchors FILE[,FILE]        FlashMLA anchor CSVs (in the repository:
                               bench/anchors/flashmla-h200.csv): adds anchor ms and
                               speed-up columns and the geometric mean of the speed-ups
  --matmul-tflops T            a matmul ceiling for the floor_ms column (default: none,
                               the floor is then bytes at the copy ceiling)
  --out DIR                    output directory (default ./bench-out): bench.csv, bench.svg
  --batch-invariant            measure batch-invariant plans (a sequence's output bit for
                               bit the same whatever else is in the batch), and the default
                               plan on the same inputs: adds default_ms and vs_default
                               (invariant time / default time) and their geometric mean
  --no-progress                no in-place progress bar (also off when stderr is no TTY)

bench --devices all|LIST options (--quick, --suite, --filter, --reps, --dtype, --out,
--no-progress as above; not with --device, --host, --host-breakdown, --batch-invariant,
--anchors, --matmul-tflops):
  all: every usable CUDA device; LIST: distinct ordinals, e.g. 0,1. Each configuration
  runs on every listed GPU at once (one native thread, inputs, plan and stream per GPU,
  started after a barrier), after the first GPU alone. Per GPU its median ms, GB/s and
  TFLOPS; in total the bytes of every GPU's steps over the wall span (barrier to the last
  GPU done), and the scaling: total / the first GPU alone (over its own wall span), e.g.
  two GPUs at h_q 16, s_q 1, mean 16384: --devices 0,1 --filter grid/1/16384/16/0.
  One GPU works too (scaling about 1); without a CUDA GPU: ERR_GPU_UNAVAILABLE, exit 1.
    bench-multi.csv  tag,b,s_q,mean_sk,h_q,varlen,device,ms,gbps,tflops,scaling
                     (device: the ordinal, alone:N, or total)

bench --host options (--device, --out, --quick as above):
  --steps N                    timed steps per mode (default 200 on CUDA, 10 on the CPU)
  --modes LIST                 comma-separated subset of await,sync,enqueue,graph
  Shapes: on CUDA b=1 h_q=16 1024 tokens, b=128 h_q=16 and 128 4096 tokens, 1 and 8
  layers per step; on the CPU backend small shapes (--quick: the smallest). Per mode, the
  median wall time of a step (plan.update + the layers' decodes, and the wait) divided by
  the layers, next to the kernels' own time per layer (CUDA events between steps run back
  to back, queued ahead of the device, so launch gaps are not counted):
    host.csv      b,h_q,s_q,length,layers,mode,kernel_us,step_us
    host-ops.csv  b,h_q,s_q,length,op,us   (append-loop, appendBatch, appendBatch-device,
                  appendBatch-f32, batch, batchInto, plan, plan.update: host time of one
                  call)

bench --host-breakdown options (--device, --out, --quick, --steps as --host's; --steps is
the calls per mode, default 200 on CUDA, 20 on the CPU):
  For each shape of --host (one layer), the median gap between consecutive phase marks of
  one call (js:* in src/, native:* in the binding, the rest in the core, all on
  CLOCK_MONOTONIC) for: await (completion polled from the event loop), await-pool (the
  wait on the libuv pool, MLA_AWAIT_SPIN_US=0), enqueue (plan.update + decodeInto +
  synchronizeSync), appendBatch (host bits), appendBatch-device, appendBatch-f32; and the
  two completion paths around a stand-in wait of 30 and 500 us (stub-pool, stub-poll: the
  latency from the wait's end to the JS continuation, no GPU work).
    host-breakdown.csv  b,h_q,s_q,length,mode,phase,us,n

Timing: median of CUDA-event-timed runs after warm-up (wall clock on the CPU backend).
GB/s = (sum(seqlens)*576 + b*s_q*h_q*576 + b*s_q*h_q*512) * 2 bytes / time;
TFLOPS = 2 * s_q * sum(seqlens) * h_q * (576 + 512) / time. The copy ceiling (1 GiB
device-to-device on CUDA, 256 MiB host copy on the CPU) is measured in the same run;
compare ratios to it, not raw times across machines.

Kernels: Hopper (sm_90) runs its own; Ampere, Ada and Blackwell (compute capability 8.0+)
the portable ones, from a cubin of their architecture or the compute_80 PTX (\`info\`
prints which). MLA_FORCE_PORTABLE=1 runs the portable kernels on Hopper too.

Exit status: 0 done, 1 a failure (device, measurement, files), 2 a usage error.`
