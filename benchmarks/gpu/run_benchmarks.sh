#!/usr/bin/env bash
# The GPU benchmark batch (issue 8), run on the GPU machine from the repository root after
# MLX's CUDA build is installed (../shared/gpu/README.md). Peers (JAX, NumPyro, Flax) are the
# GPU machine's own python3 packages. Each benchmark appends its section to
# benchmarks/RESULTS.md; a copy of that file and the logs go to $OUT when it is set.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
NOTE="${NOTE:-GPU machine: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)}"
OUT="${OUT:-/tmp/genmlx-gpu-bench}"; mkdir -p "$OUT"
py=python3
run() {  # run NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name"
  timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25
}
run is    200 $py benchmarks/bench_is.py --ns 1000 100000 1000000 10000000 --repeats 5 --no-diagnostics --jax-python $py --append-results --note "$NOTE"
run vae   150 $py benchmarks/bench_vae.py --repeats 9 --numpyro-python $py --append-results --note "$NOTE"
run hmc   120 $py benchmarks/bench_hmc.py --numpyro $py --repeats 3 --append-results --note "$NOTE"
run smc    60 $py benchmarks/bench_smc.py --repeats 3 --append-results --note "$NOTE"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
