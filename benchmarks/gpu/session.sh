#!/usr/bin/env bash
# One call's worth of GPU work (issue 8), by part, on the GPU machine from the repository
# root after MLX's CUDA build is installed under /root/site (../shared/gpu/README.md).
# Each part fits one 10-minute call and writes its logs/JSON under $OUT.
#
#   bash benchmarks/gpu/session.sh scaling   # 2 GPUs (nvidia-h200-x2): data-parallel IWAE
#                                            # training and sharded SMC/IS, 1 vs 2 processes
#   bash benchmarks/gpu/session.sh scaling_smc # as scaling, without the data-parallel training rows
#   bash benchmarks/gpu/session.sh verify    # the halo-paths and gather kernels, NUTS's bookkeeping on a GPU
#   bash benchmarks/gpu/session.sh smc_tests # the SMC kernels' GPU tests (TESTS_T s, default 300)
#   bash benchmarks/gpu/session.sh smc_kernels # 2 GPUs: SMC scaling 1 → 2 processes by phase
#                                            # (NS_SMC one process, NS_SMC2 two; ONE_K1: opt-in kernel)
#   bash benchmarks/gpu/session.sh scaling_vec # 2 GPUs: sharded SMC, STATE_DIM-coordinate SSM, 1 → 2 processes
#   bash benchmarks/gpu/session.sh probes    # 2 GPUs: the sharded step probe (NCCL transports), IS by part
#   bash benchmarks/gpu/session.sh bench1    # 1 GPU: IS, VAE/IWAE step, SMC, kernels
#   bash benchmarks/gpu/session.sh bench2    # 1 GPU: HMC (NumPyro on CPU and GPU), CUDA graph sizes
#   bash benchmarks/gpu/session.sh nuts      # 1 GPU: NUTS ESS/s (NumPyro on CPU and GPU); on a
#                                            # fresh machine MLX JIT-compiles every kernel first
#   bash benchmarks/gpu/session.sh iwae [PHASE_S]  # 2 GPUs: the IWAE k = 50 budgeted runs (issue 7)
#   bash benchmarks/gpu/session.sh shards [K] [T]  # all GPUs: the test files in K shards for T s,
#                                            # resumable (per-file logs under /root/gputests)
#
# Test shards: one pytest per file (a stuck test dumps its traceback into the file's log
# shortly before the file's cap); ORDER=FILE lists test files to run first.
# TESTS_BG=T runs the test shards (as in `shards`) for T s on the LAST GPU beside a bench part
# (which uses GPU 0): the timed code and its baselines share the host alike. TESTS_K shards
# (default 2) run side by side: more of them spread a cold machine's kernel compilation
# (NVRTC, on the host) over its cores.
# Compiled CUDA kernels persist in MLX's PTX cache ($MLX_PTX_CACHE_DIR, /root/ptx); it comes
# back as $OUT/ptx.tgz.NN parts (only the last call's files come back, at most 8: call
# with SAVE_PTX=1 on the last call), and a carried .ptx/ptx.tgz seeds it on a fresh machine (no cold JIT).
# MNIST must be under $GENMLX_DATA (carry a folder holding mnist/ and binarized_mnist.npz).
# Run from a snapshot of a commit: rm -rf .snap && mkdir .snap && git archive HEAD | tar -x -C .snap
# && git rev-parse --short HEAD > .snap/COMMIT (benchmarks read the commit from it), carry .snap.
set -u
part=${1:?part: scaling, scaling_vec, bench1, bench2, nuts, iwae or shards}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
export PATH=/root/site/bin:$PATH PYTHONPATH=/root/site:$PWD
OUT="${OUT:-/tmp/genmlx-gpu}"; mkdir -p "$OUT"
NOTE="${NOTE:-GPU machine: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $(nvidia-smi -L | wc -l)}"
py=python3
export MLX_PTX_CACHE_DIR=/root/ptx
if [ ! -d /root/ptx ] && [ -f .ptx/ptx.tgz ]; then mkdir -p /root/ptx && tar -xzf .ptx/ptx.tgz -C /root/ptx; fi
mkdir -p /root/ptx
save_ptx() {  # the cache as ptx.tgz.00, .01, … (a returned file may hold 16 MiB): reassemble with
  # `mkdir -p .ptx && cat ptx.tgz.* > .ptx/ptx.tgz` and carry .ptx on the next machine's first call
  rm -f "$OUT"/ptx.tgz.*; tar -czf - -C /root/ptx . 2>/dev/null | split -b 15m -d - "$OUT/ptx.tgz."
  echo "ptx cache: $(ls /root/ptx | wc -l) files in $(ls "$OUT"/ptx.tgz.* | wc -l) parts"
}
run() {  # run NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log"
  tail -15 "$OUT/$name.log"
}
shards() {  # shards K T GPU...: the test files in K shards round robin over the GPUs given
  local K=$1 T=$2; shift 2; local gpus=("$@"); mkdir -p /root/gputests
  $py -c "import pytest, hypothesis" 2>/dev/null || \
    $py -m pip install -q --no-index --no-deps --no-compile --target /root/site .whl/*.whl
  # files that ran out of time before go last; one file gets at most FILE_T s per call, so a
  # file stuck in cold kernel compilation cannot hold its shard for the whole call
  # ORDER (a file listing test files, one per line) puts those first, in its order
  mapfile -t files < <( { [ -f "${ORDER:-}" ] && grep -x 'tests/.*\.py' "$ORDER"; ls tests/*/test_*.py tests/test_*.py 2>/dev/null | sort; } |
    awk '!seen[$0]++' | while read -r f; do [ -f "$f" ] || continue
    [ -f "/root/gputests/$(echo "$f" | tr / _).log.timeout" ] && echo "1 $f" || echo "0 $f"; done | sort -s -k1,1 | cut -d' ' -f2)
  local end=$(( $(date +%s) + T )) cap=${FILE_T:-240}
  for k in $(seq 0 $((K - 1))); do
    (
      for i in "${!files[@]}"; do
        [ $((i % K)) -eq "$k" ] || continue
        f=${files[$i]}; log=/root/gputests/$(echo "$f" | tr / _).log
        grep -q "^rc=" "$log" 2>/dev/null && continue
        left=$(( end - $(date +%s) )); [ "$left" -gt 20 ] || break
        [ "$left" -gt "$cap" ] && left=$cap
        CUDA_VISIBLE_DEVICES=${gpus[$((k % ${#gpus[@]}))]} timeout "$left" $py -m pytest -q -p no:cacheprovider \
          -o faulthandler_timeout=$(( left > 60 ? left - 30 : 30 )) "$f" > "$log.tmp" 2>&1
        rc=$?; [ $rc -eq 124 ] && { mv "$log.tmp" "$log.timeout"; continue; }
        mv "$log.tmp" "$log"; echo "rc=$rc" >> "$log"; rm -f "$log.timeout"
      done
    ) &
  done
  wait
  tar -czf "$OUT/tests.tgz" -C /root gputests 2>/dev/null
  for l in /root/gputests/*.log; do echo "$(basename "$l"): $(grep -E '(passed|failed|error|skipped)' "$l" | tail -1) $(tail -1 "$l")"; done
  echo "not finished: $(( ${#files[@]} - $(ls /root/gputests/*.log 2>/dev/null | wc -l) )) of ${#files[@]} files"
}
bg_tests() {  # the test shards on the last GPU for $TESTS_BG s, in the background
  [ -n "${TESTS_BG:-}" ] || return 0
  local last=$(( $(nvidia-smi -L | wc -l) - 1 ))
  shards "${TESTS_K:-2}" "$TESTS_BG" "$last" > "$OUT/tests_bg.log" 2>&1 &
  BG=$!
}
bg_wait() { [ -n "${BG:-}" ] && { wait "$BG"; tail -40 "$OUT/tests_bg.log"; }; return 0; }
case $part in
  scaling|scaling_smc)  # scaling_smc: the sharded SMC/IS rows alone
    [ "$part" = scaling ] && run scale_train 300 $py benchmarks/scale_train.py --procs 1,2 --batch 1600,3200,12800,25600 --steps 200 --append --note "$NOTE"
    # IS_ARGS="--skip-is" leaves out the sharded IS rows; the N-process run also times the
    # exact systematic path (--exact); if the sync-free step with its collectives compiled
    # in fails, the run is repeated with them outside the compiled step (--split-collectives)
    # NS_SMC: the particle counts (total) of the SMC rows
    is_args=${IS_ARGS:---ns-is 10000000 100000000}
    ns=${NS_SMC:-1000000 10000000 30000000}
    run scale_smc_1 200 $py benchmarks/scale_smc.py --ns-smc $ns $is_args --repeats 3 --vs-smc --phases --out "$OUT/scale_1.json"
    run scale_smc_2 240 mlx.launch -n 2 --backend nccl --env NCCL_NVLS_ENABLE=0 --python "$(command -v $py)" \
      benchmarks/scale_smc.py --ns-smc $ns $is_args --repeats 3 --count --latency --exact --phases --out "$OUT/scale_2.json"
    grep -q "^rc=0" "$OUT/scale_smc_2.log" || run scale_smc_2s 240 mlx.launch -n 2 --backend nccl --env NCCL_NVLS_ENABLE=0 \
      --python "$(command -v $py)" benchmarks/scale_smc.py --ns-smc $ns $is_args --repeats 3 \
      --count --exact --split-collectives --out "$OUT/scale_2.json"
    run scale_cmp 30 $py benchmarks/scale_smc.py --compare "$OUT/scale_1.json" "$OUT/scale_2.json" --append-results --note "$NOTE"
    ;;
  verify)  # what must hold on a GPU before timing: the halo-paths kernel (loop form) against its
    # statement, the row gathers, NUTS's Gram bookkeeping equalities (session 14 saw 10.3
    # leapfrogs per draw on an H200 against 8.3 on the CPU)
    export PYTEST_ADDOPTS="-p no:cacheprovider"
    run verify_kernels "${TESTS_T:-200}" $py -m pytest -q -rs tests/kernels/test_kernels.py -k "halo or take_rows or two_source"
    run verify_nuts "${TESTS_T:-200}" $py -m pytest -q -rs tests/inference/test_nuts_blocks.py
    ;;
  smc_tests)  # the SMC gather/paths kernels' GPU tests (cold NVRTC compilation: give ≥ 300 s)
    export PYTEST_ADDOPTS="-p no:cacheprovider"
    run gpu_tests "${TESTS_T:-300}" $py -m pytest -q -rs tests/kernels/test_kernels.py tests/inference/test_smc.py \
      tests/inference/test_sharded.py
    ;;
  smc_kernels)  # 2 GPUs: sharded SMC from one to two processes by phase: one process at NS_SMC
    # (and at ONE_K1 with the opt-in one-process paths kernel, GENMLX_KERNELS=1), two at each
    # total of NS_SMC2 (one run each: a run out of memory loses only its own row)
    ns=${NS_SMC:-10000000 15000000}
    run scale1 150 $py benchmarks/scale_smc.py --ns-smc $ns --skip-is --repeats 3 --phases --out "$OUT/scale_1.json"
    [ -n "${ONE_K1:-}" ] && run scale1_k1 120 env GENMLX_KERNELS=1 $py benchmarks/scale_smc.py --ns-smc $ONE_K1 \
      --skip-is --repeats 3 --phases --out "$OUT/scale_1_k1.json"
    # WDIV: more two-process runs at 3·10⁷, one per value, with the sync-free window W = m/WDIV
    # (default: sharded.window_width, 16·√n)
    for wd in ${WDIV:-}; do
      run "scale2_w$wd" 150 mlx.launch -n 2 --backend nccl --env NCCL_NVLS_ENABLE=0 \
        --python "$(command -v $py)" benchmarks/scale_smc.py --ns-smc 30000000 --skip-is --skip-hand --repeats 3 \
        --phases --window-div "$wd" --out "$OUT/scale_2_w$wd.json"
    done
    for n2 in ${NS_SMC2:-30000000}; do
      run "scale2_$n2" 180 mlx.launch -n 2 --backend nccl --env NCCL_NVLS_ENABLE=0 --python "$(command -v $py)" \
        benchmarks/scale_smc.py --ns-smc "$n2" --skip-is --repeats 3 --phases --out "$OUT/scale_2_$n2.json"
      run "scale_cmp_$n2" 30 $py benchmarks/scale_smc.py --compare "$OUT/scale_1.json" "$OUT/scale_2_$n2.json" \
        --append-results --note "$NOTE"
    done
    ;;
  scaling_vec)  # 2 GPUs: sharded SMC on the SSM with STATE_DIM (default 4) independent
    # coordinates, one process at each of NS_SMC, two at each total of NS_SMC2
    d=${STATE_DIM:-4}
    run "vec${d}_1" 200 $py benchmarks/scale_smc.py --state-dim "$d" --ns-smc ${NS_SMC:-5000000 10000000 15000000} \
      --repeats 3 --phases --out "$OUT/vec${d}_1.json"
    for n2 in ${NS_SMC2:-20000000 30000000}; do
      run "vec${d}_2_$n2" 180 mlx.launch -n 2 --backend nccl --env NCCL_NVLS_ENABLE=0 --python "$(command -v $py)" \
        benchmarks/scale_smc.py --state-dim "$d" --ns-smc "$n2" --repeats 3 --phases --out "$OUT/vec${d}_2_$n2.json"
      run "vec${d}_cmp_$n2" 30 $py benchmarks/scale_smc.py --compare "$OUT/vec${d}_1.json" "$OUT/vec${d}_2_$n2.json" \
        --append-results --note "$NOTE"
    done
    ;;
  probes)  # the sharded step probe, with NCCL saying which transport its channels use (P2P
    # over NVLink or SHM through the host: the 2-float gather costs ~86 µs and the 7.5 MB
    # window gather ~203 µs per step, ~64 GB/s — slow for NVLink); IS at large n by part
    run probe_loop 120 env NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P mlx.launch -n 2 --backend nccl \
      --env NCCL_NVLS_ENABLE=0 --python "$(command -v $py)" \
      benchmarks/gpu/probe_sharded_loop.py --per-process 15000000 --chain 30 --repeats 3
    grep -h "µs per step" "$OUT/probe_loop.log"
    grep -hoE "via (P2P/[A-Za-z/]+|SHM[^ ]*|NET[^ ]*)|NVLink[^,]*|P2P[^ ]* (enabled|disabled)" "$OUT/probe_loop.log" \
      | sort | uniq -c | head -20
    run probe_is 120 $py benchmarks/gpu/probe_is.py --ns 1000000 10000000 --repeats 20 --out "$OUT/probe_is.json"
    ;;
  bench1)
    bg_tests
    run is      120 $py benchmarks/bench_is.py --ns 1000 100000 1000000 10000000 --repeats 5 --no-diagnostics --jax-python $py --append-results --note "$NOTE"
    run vae     120 $py benchmarks/bench_vae.py --repeats 9 --numpyro-python $py --append-results --note "$NOTE"
    run smc      60 $py benchmarks/bench_smc.py --repeats 3 --phases --append-results --note "$NOTE"
    run kernels  60 $py benchmarks/bench_kernels.py --append-results --note "$NOTE"
    bg_wait
    ;;
  bench2)
    bg_tests
    run hmc     120 $py benchmarks/bench_hmc.py --numpyro $py --repeats 3 --append-results --note "$NOTE"
    run hmc_cuda 90 $py benchmarks/bench_hmc.py --numpyro $py --numpyro-platform cuda --repeats 3 --transition-rounds 0 --append-results --note "$NOTE"
    # MLX's CUDA backend launches its kernels as CUDA graphs of MLX_MAX_OPS_PER_BUFFER nodes
    # (default 20): the launch-bound HMC transition under other sizes (its kernels are in
    # the PTX cache by now; session 5: no effect on the SMC step at 20 vs 100)
    for m in 20 60 200; do
      run "hmc_ops$m" 60 env MLX_MAX_OPS_PER_BUFFER=$m $py benchmarks/bench_hmc.py --repeats 1 --transition-rounds 0
    done
    bg_wait
    ;;
  nuts)
    # NUTS alone: a cold machine JIT-compiles every block (~15 s per model), and the NumPyro
    # peers run on the CPU (both chain methods) and the GPU
    bg_tests
    run nuts    540 $py benchmarks/bench_nuts.py --numpyro $py --numpyro-platforms cpu,cuda --append-results --note "$NOTE"
    bg_wait
    ;;
  iwae)
    # issue 7: IWAE k = 50 within 10 GPU-minutes, plain gradients on GPU 0 and DReG on GPU 1,
    # each an exclusive GPU; resumable: run again (the next call) to spend the rest of the
    # budget and evaluate (test -log p(x), K = 5000). Run dirs persist under /root/runs.
    # PHASE_S + 200 s must fit the call (probe, start-up, evaluation; the driver records each
    # phase before it runs, so a kill costs only the training since the last checkpoint).
    phase=${2:-500}
    for v in "0 iwae50" "1 dreg50"; do
      set -- $v
      extra=(); [ "$2" = dreg50 ] && extra=(--set objective.kind=dreg)
      CUDA_VISIBLE_DEVICES=$1 timeout $((phase + 200)) $py experiments/iwae/gpu_run.py main --run-dir /root/runs/$2 \
        --budget-s 600 --phase-s "$phase" --batch 400 --step-fill 0.9 --out "$OUT/$2" "${extra[@]}" \
        > "$OUT/$2.log" 2>&1 &
    done
    wait
    tail -n 3 "$OUT"/iwae50.log "$OUT"/dreg50.log
    ;;
  shards)
    # the test files in K shards run side by side on the GPUs (round robin), one pytest per
    # file so a shard that runs out of time still reports every finished file; files whose
    # log under /root/gputests says they finished are skipped (run again to continue)
    mapfile -t all < <(seq 0 $(( $(nvidia-smi -L | wc -l) - 1 )))
    shards "${2:-4}" "${3:-500}" "${all[@]}"
    ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
[ -n "${SAVE_PTX:-}" ] && save_ptx
# at most 8 files come back: the logs and JSON travel as one archive
(cd "$OUT" && logs=$(ls | grep -E '[.](log|json)$') && tar -czf "logs_$part.tgz" $logs && rm -f $logs)
exit 0
