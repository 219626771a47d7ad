#!/usr/bin/env bash
# The whole GPU suite on a lent GPU machine, in one call (run from the repo root there,
# after scripts/prepare-device.sh here). Writes logs under $OUT (or ./gpu-out) and prints
# a short table last.  Stages: info, rust tests, sanitizer, typescript tests, bench; the
# portable kernels forced on this (Hopper) card: rust-portable, bench-portable.
# `invariant` (batch-invariant decoding: its tests with each decode kernel, and under
# compute-sanitizer) runs by default, `bench-invariant` (its cost) on request.
# `bench-multi` (issue 12): gpu_bench --devices all on h_q 16, s_q 1, mean 16384, every GPU
# at once: per GPU, total and the scaling vs GPU 0 alone (one GPU: about 1.0).
#   bash scripts/gpu-suite.sh [stage ...]     (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
stages=${*:-"info sass rust pipeline multi invariant rust-portable rust-tma sanitizer ts matmul bench-cli bench-multi bench-host bench-host-breakdown bench-portable"}
declare -A result
# Binaries packed by scripts/pack-device.sh (the device tool carries 64 MiB; xz shrinks them ~10x).
if [[ -f .device/bins.tar.xz && ! -d .device/bin ]]; then tar -xJf .device/bins.tar.xz -C .device; fi
export MLA_TEST_DEVICE=cuda
# FlashMLA's times of the card at hand (the H100 pair when nvidia-smi names an H100).
if [[ -z ${ANCHORS:-} ]]; then
  case $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) in
    *H100*) ANCHORS=.device/anchors/flashmla-h100.csv,.device/anchors/flashmla-h100-beyond.csv ;;
    *) ANCHORS=.device/anchors/flashmla-h200.csv ;;
  esac
fi

run_stage() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  if timeout "${STAGE_TIMEOUT:-900}" "$@" >"$OUT/$name.log" 2>&1; then result[$name]="pass ($((SECONDS - t0)) s)"; else result[$name]="FAIL rc=$? ($((SECONDS - t0)) s)"; fi
  tail -n 25 "$OUT/$name.log"
}

# run_stage with the SM clock sampled by nvidia-smi every 100 ms into $OUT/clock-CLOCK.txt
# and summarised at the end of the stage's log: run_clocked CLOCK STAGE command...
run_clocked() {
  local clock=$1 stage=$2; shift 2
  nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 100 > "$OUT/clock-$clock.txt" 2>/dev/null &
  local smi=$!
  run_stage "$stage" "$@"
  kill $smi 2>/dev/null
  awk -F', *' '$1 > 1000 {n++; s += $1; if (!lo || $1 < lo) lo = $1; if ($1 > hi) hi = $1} END {if (n) printf "SM clock under load: mean %.0f MHz, min %d, max %d (%d samples)\n", s / n, lo, hi, n}' "$OUT/clock-$clock.txt" | tee -a "$OUT/$stage.log"
}

# The matmul stage's TFLOP/s (empty before it has run), for the bench's floor.
matmul_tflops() { grep -o '[0-9]* TFLOP/s' "$OUT/matmul.log" 2>/dev/null | grep -o '^[0-9]*' || true; }

# The bench stage's run name of variant $1 in round $2 (a suffix only when ROUNDS > 1), and
# every run's, the variants of BENCH_VARIANTS ROUNDS times in alternation.
bench_name() { if (( ${ROUNDS:-1} > 1 )); then echo "$1-r$2"; else echo "$1"; fi; }
bench_names() {
  local r v
  for ((r = 1; r <= ${ROUNDS:-1}; r++)); do
    for v in ${BENCH_VARIANTS:-default}; do bench_name "$v" "$r"; done
  done
}

for s in $stages; do
  case $s in
    info) run_stage info bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nvcc --version | tail -1' ;;
    sass) run_stage sass bash -c 'for c in .device/cubins/*.cubin; do printf "%-28s HGMMA %4d  HMMA %4d  LDL/STL %d\n" "$(basename $c)" "$(cuobjdump --dump-sass $c | grep -c HGMMA)" "$(cuobjdump --dump-sass $c | grep -c "HMMA")" "$(cuobjdump --dump-sass $c | grep -cE "LDL|STL")"; done' ;;
    rust) run_stage rust .device/bin/gpu_decode --test-threads=1 ;;
    pipeline) run_stage pipeline .device/bin/gpu_pipeline --test-threads=1 ;;
    # Several GPUs (issue 12): every GPU present; with one it prints SKIPPED (MLA_TEST_GPUS=2
    # on a machine of two or more makes that a failure).
    multi) run_stage multi .device/bin/gpu_multi --test-threads=1 --nocapture ;;
    # The portable path (cp.async + mma.sync, the kernels of sm_80/86/89/120 and of newer
    # GPUs) forced on Hopper: every module from the compute_80 PTX, JIT-compiled at open;
    # rows <= 16 take the 16-row tile of the 99 KiB parts, more rows the 32-row one of sm_80.
    # The whole decode and pipeline suites, then the sanitizers (the ring of half-block stages).
    rust-portable)
      run_stage rust-portable env MLA_FORCE_PORTABLE=1 .device/bin/gpu_decode --test-threads=1
      run_stage pipeline-portable env MLA_FORCE_PORTABLE=1 .device/bin/gpu_pipeline --test-threads=1
      run_stage memcheck-portable env MLA_FORCE_PORTABLE=1 compute-sanitizer --tool memcheck --error-exitcode 9 .device/bin/gpu_decode --test-threads=1 --ignored sanitizer_
      run_stage racecheck-portable env MLA_FORCE_PORTABLE=1 compute-sanitizer --tool racecheck --error-exitcode 9 .device/bin/gpu_decode --test-threads=1 --ignored sanitizer_
      run_stage synccheck-portable env MLA_FORCE_PORTABLE=1 compute-sanitizer --tool synccheck --error-exitcode 9 .device/bin/gpu_decode --test-threads=1 --ignored sanitizer_
      run_stage memcheck-pipeline-portable env MLA_FORCE_PORTABLE=1 compute-sanitizer --tool memcheck --error-exitcode 9 .device/bin/gpu_pipeline --test-threads=1 ;;
    # The TMA kernel on every row count (by default it only takes h_q * s_q <= 32).
    rust-tma) run_stage rust-tma env MLA_DECODE_KERNEL=tma .device/bin/gpu_decode --test-threads=1 edge_cases sanitizer_ --include-ignored ;;
    # The combine as a programmatic dependent of the decode (MLA_PDL=1; off by default until measured).
    rust-pdl)
      run_stage rust-pdl env MLA_PDL=1 .device/bin/gpu_decode --test-threads=1 edge_cases graph stale_plan bad_device serve_ sanitizer_ --include-ignored
      run_stage racecheck-pdl env MLA_PDL=1 compute-sanitizer --tool racecheck --error-exitcode 9 .device/bin/gpu_decode --test-threads=1 --ignored sanitizer_ ;;
    bench-pdl)
      run_stage bench-pdl env MLA_PDL=1 .device/bin/gpu_bench --csv "$OUT/bench-pdl.csv" --anchors "$ANCHORS" ${BENCH_ARGS:-} ;;
    # The warp-specialised wgmma kernel (not the default yet) on every row count, with the
    # pipeline tests and compute-sanitizer.
    rust-ws)
      run_stage rust-ws env MLA_DECODE_KERNEL=ws .device/bin/gpu_decode --test-threads=1 edge_cases sanitizer_ seqlen_zero adversarial --include-ignored
      run_stage pipeline-ws env MLA_DECODE_KERNEL=ws .device/bin/gpu_pipeline --test-threads=1
      for tool in memcheck racecheck synccheck; do
        run_stage $tool-ws env MLA_DECODE_KERNEL=ws compute-sanitizer --tool $tool --error-exitcode 9 .device/bin/gpu_decode --test-threads=1 --ignored sanitizer_
      done ;;
    # Every other variant on the edge cases (pass the names in VARIANTS).
    rust-variants) for v in ${VARIANTS:-}; do
        run_stage "rust-$v" env MLA_DECODE_KERNEL=$v .device/bin/gpu_decode --test-threads=1 edge_cases graph sanitizer_ seqlen_zero adversarial --include-ignored
        run_stage "pipeline-$v" env MLA_DECODE_KERNEL=$v .device/bin/gpu_pipeline --test-threads=1
        run_stage "memcheck-$v" env MLA_DECODE_KERNEL=$v compute-sanitizer --tool memcheck --error-exitcode 9 .device/bin/gpu_decode --test-threads=1 --ignored sanitizer_
        run_stage "racecheck-$v" env MLA_DECODE_KERNEL=$v compute-sanitizer --tool racecheck --error-exitcode 9 .device/bin/gpu_decode --test-threads=1 --ignored sanitizer_
      done ;;
    sanitizer)
      run_stage memcheck compute-sanitizer --tool memcheck --error-exitcode 9 .device/bin/gpu_decode --test-threads=1 --ignored sanitizer_
      run_stage racecheck compute-sanitizer --tool racecheck --error-exitcode 9 .device/bin/gpu_decode --test-threads=1 --ignored sanitizer_
      run_stage synccheck compute-sanitizer --tool synccheck --error-exitcode 9 .device/bin/gpu_decode --test-threads=1 --ignored sanitizer_
      # The TMA producer across segment boundaries and splits.
      run_stage memcheck-pipeline compute-sanitizer --tool memcheck --error-exitcode 9 .device/bin/gpu_pipeline --test-threads=1
      run_stage racecheck-pipeline compute-sanitizer --tool racecheck --error-exitcode 9 .device/bin/gpu_pipeline --test-threads=1
      run_stage synccheck-pipeline compute-sanitizer --tool synccheck --error-exitcode 9 .device/bin/gpu_pipeline --test-threads=1 ;;
    # Batch-invariant decoding (issue 11): gpu_invariant with every decode kernel
    # (INVARIANT_KERNELS, default: the kernel by shape, tma and ws on every shape, and the
    # portable kernel forced),
    # then its sanitizer case (many chunks to a part) under memcheck, racecheck, synccheck.
    invariant)
      for k in ${INVARIANT_KERNELS:-default tma ws portable}; do
        if [[ $k == portable ]]; then sel=(MLA_FORCE_PORTABLE=1); else sel=(MLA_DECODE_KERNEL=$k); fi
        run_stage "invariant-$k" env "${sel[@]}" .device/bin/gpu_invariant --test-threads=1
      done
      for tool in memcheck racecheck synccheck; do
        run_stage "$tool-invariant" compute-sanitizer --tool $tool --error-exitcode 9 .device/bin/gpu_invariant --test-threads=1 --ignored sanitizer_
      done ;;
    ts)
      if [[ -f .device/node.xz ]]; then
        mkdir -p /tmp/nodebin && xz -dc .device/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node
        (cd .device/pkg && [[ -f ../node_modules.tar.xz ]] && tar -xJf ../node_modules.tar.xz)
        run_stage ts bash -c 'cd .device/pkg && PATH=/tmp/nodebin:$PATH node node_modules/ava/entrypoints/cli.mjs "dist/__test__/**/*.test.js" --serial --timeout=5m'
      else
        result[ts]="not carried"
      fi ;;
    matmul)
      run_stage matmul python3 -c '
import torch
a=torch.randn(8192,8192,device="cuda",dtype=torch.bfloat16); b=torch.randn(8192,8192,device="cuda",dtype=torch.bfloat16)
for _ in range(3): a@b
torch.cuda.synchronize(); s=torch.cuda.Event(enable_timing=True); e=torch.cuda.Event(enable_timing=True); ts=[]
for _ in range(10):
    s.record(); a@b; e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
ts.sort(); print("bf16 8192^3 matmul: %.0f TFLOP/s" % (2*8192**3/(ts[5]*1e-3)/1e12))' ;;
    bench)
      mm=$(matmul_tflops)
      # A variant is a kernel name (MLA_DECODE_KERNEL); ENV_<variant> (dashes as
      # underscores) may hold more VAR=value settings for it, e.g. ENV_ws_a="MLA_X=1".
      # ROUNDS=N runs the variants N times in alternation (names -r1 .. -rN): compare them
      # within a round, as the card's clock drifts between rounds and machine starts.
      csvs=()
      for ((r = 1; r <= ${ROUNDS:-1}; r++)); do for v in ${BENCH_VARIANTS:-default}; do
        name=$(bench_name "$v" "$r")
        extra=ENV_${v//-/_}
        knobs=(MLA_DECODE_KERNEL=${v%%-*} ${!extra:-})
        # The SM clock while the bench runs, summarised in the log.
        run_clocked "$name" "bench-$name" env "${knobs[@]}" .device/bin/gpu_bench --matmul-tflops "${mm:-nan}" --csv "$OUT/bench-$name.csv" --anchors "$ANCHORS" ${BENCH_ARGS:-}
        [[ -f "$OUT/bench-$name.csv" ]] && csvs+=("$OUT/bench-$name.csv")
      done; done
      # Speed-up by row class, each run against the first (bench/report.py classes).
      ((${#csvs[@]})) && python3 bench/report.py classes "${csvs[@]}" | tee "$OUT/bench-classes.md"
      # Many rounds: the CSVs in one archive (the device tool brings back few files).
      if (( ${ROUNDS:-1} > 1 )); then (cd "$OUT" && tar -czf bench-csv.tgz bench-*.csv && rm -f bench-*.csv); fi ;;
    # Binaries of scripts/build-variants.sh (BENCH_BINS="a b ..."), ROUNDS times in
    # alternation, each a full run with its SM clock; the classes table against the first.
    # Everything of the stage goes into bench-bins.tgz (the device tool brings back few files).
    bench-bins)
      mm=$(matmul_tflops)
      csvs=()
      for ((r = 1; r <= ${ROUNDS:-1}; r++)); do for v in ${BENCH_BINS:-}; do
        name=bin-$v-r$r
        run_clocked "$name" "$name" ".device/bin/gpu_bench_$v" --matmul-tflops "${mm:-nan}" --csv "$OUT/$name.csv" --anchors "$ANCHORS" ${BENCH_ARGS:-}
        [[ -f "$OUT/$name.csv" ]] && csvs+=("$OUT/$name.csv")
      done; done
      ((${#csvs[@]})) && python3 bench/report.py classes "${csvs[@]}" | tee "$OUT/bench-bins-classes.md"
      (cd "$OUT" && tar -czf bench-bins.tgz bin-*.csv bin-*.log clock-bin-*.txt bench-bins-classes.md 2>/dev/null && rm -f bin-*.csv clock-bin-*.txt) ;;
    # The per-phase clocks of timing builds (PHASE_BINS, from build-variants.sh with
    # -DMLA_PHASE_TIMING=1) on PHASE_FILTERS (gpu_bench --filter prefixes): phases.txt.
    phases)
      for v in ${PHASE_BINS:-}; do for f in ${PHASE_FILTERS:-grid/1/4096/64/0 grid/1/4096/128/0 mtp/4/4096/128 grid/1/16384/128/0}; do
        ".device/bin/gpu_bench_$v" --filter "$f" --reps 10 2>&1 | grep -E "^phases" | sed "s|^|$v |"
      done; done | tee "$OUT/phases.txt"
      result[phases]="done" ;;
    # Issue 9's idle-start probe (scripts/probes/idle_start.cu): the SM clock after idle
    # gaps, a fixed kernel's event time by shared memory and predecessor, and a streaming
    # kernel's after idle, behind compute or behind another stream.
    probe-idle) run_stage probe-idle bash -c 'nvcc -O2 -arch=sm_90a -o /tmp/idle_start scripts/probes/idle_start.cu && /tmp/idle_start' ;;
    # The benchmark on the forced portable path (what the workstation GPUs run, here on
    # Hopper's bandwidth: for the record, not a target).
    bench-portable)
      mm=$(matmul_tflops)
      run_stage bench-portable env MLA_FORCE_PORTABLE=1 .device/bin/gpu_bench --matmul-tflops "${mm:-nan}" --csv "$OUT/bench-portable.csv" --anchors "$ANCHORS" ${BENCH_ARGS:-} ;;
    # The cost of batch-invariant plans: each configuration with an invariant plan and,
    # on the same inputs (timed runs alternating), the default plan; writes
    # $OUT/bench-invariant.csv (default_ms, vs_default) and prints the grid's geometric
    # mean of vs_default (target <= 1.10). INVARIANT_CHUNKS="16 64" also runs those chunk
    # sizes (MLA_INVARIANT_CHUNK_BLOCKS), into bench-invariant-c<N>.csv.
    bench-invariant)
      mm=$(matmul_tflops)
      for c in default ${INVARIANT_CHUNKS:-}; do
        if [[ $c == default ]]; then name=bench-invariant; chunk=(); else name=bench-invariant-c$c; chunk=(MLA_INVARIANT_CHUNK_BLOCKS=$c); fi
        run_clocked "$name" "$name" env "${chunk[@]}" .device/bin/gpu_bench --batch-invariant --matmul-tflops "${mm:-nan}" --csv "$OUT/$name.csv" --anchors "$ANCHORS" ${BENCH_ARGS:-}
      done ;;
    # The user-facing command (TypeScript CLI over the same core): CSV + SVG chart.
    bench-cli)
      mm=$(matmul_tflops)
      run_stage bench-cli bash -c "cd .device/pkg && PATH=/tmp/nodebin:\$PATH node dist/cli.js bench --no-progress --out '$OUT/cli' --anchors $(tr , '\n' <<<"$ANCHORS" | xargs -n1 basename | sed 's|^|../anchors/|' | paste -sd,) ${mm:+--matmul-tflops $mm} ${BENCH_ARGS:-}" ;;
    # Several GPUs at once (issue 12): the grid shape h_q 16, s_q 1, mean 16384 (fixed and
    # variable lengths) on every GPU present, after GPU 0 alone; the total row's scaling is
    # the issue's target (two GPUs: >= 1.9x). MULTI_ARGS: more gpu_bench options (--reps N).
    bench-multi)
      run_stage bench-multi .device/bin/gpu_bench --devices all --filter grid/1/16384/16/ --csv "$OUT/bench-multi.csv" ${MULTI_ARGS:-} ;;
    # The host benchmark (issue 9): decode steps driven from TypeScript vs the kernels'
    # own time; writes $OUT/host.csv and $OUT/host-ops.csv.
    bench-host)
      if [[ ! -x /tmp/nodebin/node && -f .device/node.xz ]]; then
        mkdir -p /tmp/nodebin && xz -dc .device/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node
      fi
      run_stage bench-host bash -c "cd .device/pkg && PATH=/tmp/nodebin:\$PATH node dist/cli.js bench --host --device cuda --no-progress --out '$OUT' ${HOST_ARGS:-}" ;;
    # Where one call's host time goes (phases of await, await-pool, enqueue, appendBatch;
    # the two completion paths around a stand-in wait): $OUT/host-breakdown.csv.
    bench-host-breakdown)
      if [[ ! -x /tmp/nodebin/node && -f .device/node.xz ]]; then
        mkdir -p /tmp/nodebin && xz -dc .device/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node
      fi
      run_stage bench-host-breakdown bash -c "cd .device/pkg && PATH=/tmp/nodebin:\$PATH node dist/cli.js bench --host-breakdown --device cuda --out '$OUT' ${HOST_ARGS:-}" ;;
    # The host bench with the serving-path switches of issue 9 (part 2) back on their
    # previous behaviour (device step flags with copies, no buffer reuse, no tensor-map
    # cache, awaits waited on the libuv pool): $OUT/host-ab.csv, $OUT/host-ops-ab.csv.
    bench-host-ab)
      if [[ ! -x /tmp/nodebin/node && -f .device/node.xz ]]; then
        mkdir -p /tmp/nodebin && xz -dc .device/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node
      fi
      mkdir -p "$OUT/ab"
      run_stage bench-host-ab bash -c "cd .device/pkg && PATH=/tmp/nodebin:\$PATH MLA_STEP_FLAGS=device MLA_BUFFER_REUSE=0 MLA_TMA_CACHE=0 MLA_AWAIT_SPIN_US=0 node dist/cli.js bench --host --device cuda --no-progress --out '$OUT/ab' ${HOST_ARGS:-} && mv '$OUT/ab/host.csv' '$OUT/host-ab.csv' && mv '$OUT/ab/host-ops.csv' '$OUT/host-ops-ab.csv' && rmdir '$OUT/ab'" ;;
    # Nsight Compute on one decode launch per shape (NCU_FILTERS, gpu_bench --filter
    # patterns; NCU_KERNEL, a kernel-name regex, default the ws kernel): the full set, as
    # text, in ncu-<filter>-details.log (logs.tgz): shared-memory and tensor-pipe use, stall
    # reasons; the samples per SASS instruction in ncu-<filter>-sass.csv and their summary
    # (bench/ncu_samples.py: by opcode, by mbarrier wait site) in ncu-<filter>-samples.log.
    ncu)
      for f in ${NCU_FILTERS:-grid/1/4096/128/ grid/1/4096/64/}; do
        tag="ncu-${f//\//_}"
        run_stage "$tag" ncu --clock-control none --set full -k "regex:${NCU_KERNEL:-ws64}" --launch-skip 3 -c 1 -f -o "/tmp/$tag" .device/bin/gpu_bench --filter "$f" --reps 3
        ncu -i "/tmp/$tag.ncu-rep" --page details > "$OUT/$tag-details.log" 2>&1
        ncu -i "/tmp/$tag.ncu-rep" --page source --print-source sass --csv > "$OUT/$tag-sass.csv" 2>&1
        python3 bench/ncu_samples.py "$OUT/$tag-sass.csv" > "$OUT/$tag-samples.log" 2>&1
      done ;;
    # The serving-path tests with the step flags in device memory (the fallback path).
    rust-flags-device)
      run_stage rust-flags-device env MLA_STEP_FLAGS=device .device/bin/gpu_decode --test-threads=1 serve_ graph stale_plan edge_cases --include-ignored ;;
  esac
done

echo
echo "=== summary"
for s in phases info sass rust pipeline multi invariant-default invariant-tma invariant-ws invariant-portable memcheck-invariant racecheck-invariant synccheck-invariant bench-invariant rust-portable pipeline-portable memcheck-portable racecheck-portable synccheck-portable memcheck-pipeline-portable rust-tma rust-pdl racecheck-pdl bench-pdl rust-ws pipeline-ws memcheck-ws racecheck-ws synccheck-ws bench-cli bench-host bench-host-breakdown bench-host-ab rust-flags-device bench-multi bench-portable ${VARIANTS:+$(for v in $VARIANTS; do echo rust-$v memcheck-$v racecheck-$v; done)} memcheck racecheck synccheck memcheck-pipeline racecheck-pipeline ts matmul $(for n in $(bench_names); do echo bench-$n; done) $(for ((r = 1; r <= ${ROUNDS:-1}; r++)); do for v in ${BENCH_BINS:-}; do echo bin-$v-r$r; done; done); do
  [[ -n "${result[$s]:-}" ]] && printf '%-26s %s\n' "$s" "${result[$s]}"
done
grep -H "test result\|passed\|failed" "$OUT"/rust*.log "$OUT"/pipeline*.log "$OUT"/ts.log 2>/dev/null | tail -12
grep -H "ERROR SUMMARY\|RACECHECK SUMMARY" "$OUT"/memcheck*.log "$OUT"/racecheck*.log "$OUT"/synccheck*.log 2>/dev/null
cat "$OUT"/sass.log 2>/dev/null
grep -H "copy ceiling\|matmul\|geometric\|SM clock\|at once" "$OUT"/bench-*.log "$OUT"/matmul.log 2>/dev/null
for f in "$OUT"/ncu-*-samples.log; do [[ -f $f ]] && { echo "== $(basename "$f")"; head -34 "$f"; }; done
[[ -f "$OUT/host.csv" ]] && { column -s, -t < "$OUT/host.csv" 2>/dev/null || cat "$OUT/host.csv"; }
[[ -f "$OUT/host-ab.csv" ]] && { echo "previous paths (bench-host-ab):"; column -s, -t < "$OUT/host-ab.csv" 2>/dev/null || cat "$OUT/host-ab.csv"; }

# At most 8 files come back from the device tool: keep the CSVs and the chart, pack the logs.
(cd "$OUT" && tar -czf logs.tgz ./*.log ./clock-*.txt $(ls ./ncu-*.csv 2>/dev/null) && rm -f ./*.log ./clock-*.txt ./ncu-*.csv) 2>/dev/null || true
