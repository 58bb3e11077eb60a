#!/usr/bin/env bash
# The GPU half of the fast path's checks, in one call of at most 9 minutes (515 s of timed stages; give it a 540 s limit):
#   1. the fast path's gradients on CUDA equal the plain path's (fp32 <= 1e-5 per parameter,
#      TF32 off; float64 too), bf16 stays close, CUDA-graph replay trains exactly like the
#      eager step, the trainer runs two epochs with every lever on (bf16, channels_last, fused
#      neuron and standardisation, CUDA graphs, data on the GPU), and nothing the benchmark imports needs Ray, Optuna or tonic;
#   2. the benchmark at real size (vgg11_ws, batch 128, T 1,2,4,6,20, fp32 and bf16), with profiles and
#      the device's matrix-product rate;
#   3. the device data pipeline (crop, flip, AutoAugment, Cutout on the GPU) against the PIL one.
#   The device pipeline's ops on CUDA are also checked pixel for pixel against the CPU in 1.
# Run from the repository root:  bash bench/gpu_check.sh
# (BENCH_ARGS and BENCH_DATA_ARGS add flags: both --small make a quick dry run on a CPU. LIMIT_SCALE, a whole
#  number, 1 unless set, multiplies each stage's limit: a dry run on a slow CPU, its compile cache empty, outlasts them.)
# Writes into $OUT (default ./bench-out): env.txt, tests.log, bench.jsonl, bench.log, bench.md, bench_data.jsonl
# (its stderr in bench_data.log).
# Exit status 0 only if the tests pass and every benchmark case ran.
set -uo pipefail
scale=${LIMIT_SCALE:-1}
[[ $scale =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check: LIMIT_SCALE must be a whole number >= 1, got '$scale'" >&2; exit 2; }
OUT=${OUT:-./bench-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# The device machine has torch but not this project installed: run it from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

# g++: Inductor builds any host-side kernel with it (the fused neuron's constants are baked in, so none is expected);
# /dev/shm: the CPU loader's workers pass batches through it.
{ nvidia-smi; g++ --version | head -1; df -h /dev/shm
  $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } >"$OUT/env.txt" 2>&1

# Each stage has its own limit (150 + 310 + 45 s), so that a hang in one still leaves the others' results.
# (At 3bfcb5a the whole call took 190 s on the H200, the tests 42 s of it; the benchmark has some 20 more rows since.)
# SIGINT, not SIGTERM, at the limit: pytest then still prints its summary and durations; SIGKILL 10 s
# later, as a hang in native code (a CUDA sync) does not return to Python to see the SIGINT.
timeout -s INT -k 10 $((150 * scale)) $PY -m pytest -rs --durations=12 -p no:cacheprovider tests/test_augment.py tests/test_fast_path.py -k "cuda or imports" 2>&1 \
  | tee "$OUT/tests.log" || status=1
# bench.jsonl gets every row as soon as it is measured: a run cut short keeps what it measured.
# (--out appends: a second check into the same $OUT starts the file afresh, not mixed with the first.)
rm -f "$OUT/bench.jsonl"
timeout $((310 * scale)) $PY -m ndot.bench --profile ${BENCH_ARGS:-} --out "$OUT/bench.jsonl" >"$OUT/bench.log" 2>&1 || status=1
$PY -m ndot.bench --table "$OUT/bench.jsonl" | tee "$OUT/bench.md"
# At most 8 loader processes: each holds its prefetched batches in /dev/shm, which containers keep small.
workers=$(( $(nproc) < 8 ? $(nproc) : 8 ))
timeout $((45 * scale)) $PY -m ndot.bench.data --only cifar --workers "$workers" ${BENCH_DATA_ARGS:-} 2>"$OUT/bench_data.log" \
  | tee "$OUT/bench_data.jsonl" || status=1
echo "gpu_check: exit status $status"
exit $status
