#!/usr/bin/env bash
# The accelerator figures of issue 6 ("Speed and scale"), one command per figure, each under a
# time limit, in the order given on the command line:
#
#   benchmarks/gpu_figures.sh CIFAR_DIR NB201_CSV OUT_DIR WHAT...
#
#   CIFAR_DIR  the CIFAR-10 JPEG tree (CIFAR_DIR/train/<class>/*.jpg, CIFAR_DIR/test/...), e.g. the
#              unpacked ../shared/data/cifar10-jpeg.tar.gz
#   NB201_CSV  NAS-Bench-201's accuracy table (../shared/data/nb201/nats_bench_200ep.csv)
#   WHAT       env          versions, devices, and whether XLA takes dnas's XLA:CPU flag
#              bench-f32    benchmarks/bench_vs_pytorch.py, all three configurations, float32 on
#                           both sides
#              memory       each side's peak memory (host RSS and GPU), float32, in fresh processes
#              bench-bf16   the same with dnas --precision bfloat16 against PyTorch autocast(bfloat16)
#              search-f32   one epoch of `dnas search` (NB201, DARTS, C=16, N=5, batch 64) on the whole
#                           CIFAR-10 training split (25,000 weight + 25,000 architecture images: 390 steps)
#              search-bf16  the same with --precision bfloat16
#              search-gdas  the same epoch with GDAS
#
# Outputs in OUT_DIR: bench_*.json (the benchmark's JSON) and search_*_summary.json /
# search_*_metrics.jsonl (`dnas search`'s summary and metrics). PYTHON (default python3) runs
# everything; BENCH_EXTRA / SEARCH_EXTRA are appended to the benchmark's / the search's flags
# (small smoke runs on a CPU: BENCH_EXTRA="--cells 1 --batch-size 8 --rounds 1 --steps 1").
set -u
if [ $# -lt 4 ]; then
  sed -n '2,25p' "$0"; exit 2
fi
cifar=$1 table=$2 out=$3; shift 3
py=${PYTHON:-python3}
mkdir -p "$out"
# JAX takes 75 % of the GPU's memory by default; the PyTorch side needs some too
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S CMD...: run CMD under a time limit, report its exit status and time
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s): $*"
  local t0; t0=$(date +%s%N)
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
}

search() {  # search TAG FLAGS...: one epoch on CIFAR-10, its summary and metrics copied to OUT
  local tag=$1; shift
  local run=${TMPDIR:-/tmp}/dnas-gpu-figures/search-$tag
  rm -rf "$run"
  # shellcheck disable=SC2086
  step "search-$tag" "${SEARCH_LIMIT:-240}" "$py" -m dnas.cli search --space nb201 --cells 5 --channels 16 \
    --batch-size 64 --epochs 1 --dataset "$cifar" --nb201-table "$table" --no-progress --log-every 50 \
    --compile-cache off --out "$run" "$@" ${SEARCH_EXTRA:-}
  cp "$run/summary.json" "$out/search_${tag}_summary.json" 2>/dev/null
  cp "$run/metrics.jsonl" "$out/search_${tag}_metrics.jsonl" 2>/dev/null
}

for what in "$@"; do
  case $what in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
      "$py" -c "import jax, jaxlib, torch; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices()); \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
      XLA_FLAGS=--xla_cpu_use_fusion_emitters=false "$py" -c "import jax; jax.devices(); print('XLA takes dnas\'s XLA:CPU flag')"
      ;;
    bench-f32)
      # shellcheck disable=SC2086
      step bench-f32 "${BENCH_LIMIT:-330}" "$py" benchmarks/bench_vs_pytorch.py --rounds 6 --steps 10 --warmup 5 \
        --out "$out/bench_f32.json" ${BENCH_EXTRA:-} ;;
    memory)
      # shellcheck disable=SC2086
      step memory "${BENCH_LIMIT:-330}" "$py" benchmarks/bench_vs_pytorch.py --rounds 1 --steps 1 --warmup 1 \
        --memory --out "$out/bench_memory.json" ${BENCH_EXTRA:-} ;;
    bench-bf16)
      # shellcheck disable=SC2086
      step bench-bf16 "${BENCH_LIMIT:-330}" "$py" benchmarks/bench_vs_pytorch.py --rounds 6 --steps 10 --warmup 5 \
        --precision bfloat16 --out "$out/bench_bf16.json" ${BENCH_EXTRA:-} ;;
    search-f32) search f32 --relaxation darts ;;
    search-bf16) search bf16 --relaxation darts --precision bfloat16 ;;
    search-gdas) search gdas --relaxation gdas ;;
    *) echo "unknown figure $what"; exit 2 ;;
  esac
done
