#!/usr/bin/env bash
# The first run on a CUDA GPU, in under 10 minutes. Installs nothing: it needs `make install`'s .venv with a
# CUDA build of torch. Four steps, each under a time limit (560 s in all); a step that fails or runs out of
# time is named at the end and the next still runs:
#   1. bench/device.py on the default model: fp32 vs bf16, eager vs --compile where the server has it;
#   2. bench/random_model.py: a random Llama of Llama-3-8B's shape in bf16, written once to $MODEL_DIR;
#   3. bench/device.py on it in bf16: decode step at batch 1/32/64 against the weight-read bound, eager vs
#      --compile;
#   4. bench/run.py's P1 and P2 on it (--quick, no raw/peft baselines).
# Every figure prints as `NAME value target PASS/FAIL|INFO`; the JSON files and the servers' logs go to $OUT.
# See bench/README.md.
#
#     bench/gpu_recipe.sh 2>bench/results/gpu.log | tee bench/results/gpu-figures.txt
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-bench/results/gpu}
MODEL_DIR=${MODEL_DIR:-/tmp/llama-8b-random}
mkdir -p "$OUT"

"$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__}: this recipe is for a GPU")
print(f"# GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
' || exit 1

failed=()
step() {  # step NAME SECONDS COMMAND...: SIGTERM after SECONDS (the benches then stop their servers), KILL 10 s later
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" || failed+=("$name (exit $?)")
  echo "== $name took $((SECONDS - t0))s" >&2
}

step device-default 180 "$PY" bench/device.py --device cuda --rounds 2 --start-together \
  --logs "$OUT/logs-default" --out "$OUT/device-default.json"

if [ ! -f "$MODEL_DIR/tokenizer_config.json" ]; then  # random_model.py writes the tokenizer last
  if [ -e "$MODEL_DIR" ]; then
    failed+=("random-8b ($MODEL_DIR exists but is incomplete: remove it and run again)")
  else
    step random-8b 90 "$PY" bench/random_model.py "$MODEL_DIR"
  fi
fi

if [ -f "$MODEL_DIR/tokenizer_config.json" ]; then
  step device-8b 180 "$PY" bench/device.py --device cuda --model "$MODEL_DIR" --dtypes bfloat16 \
    --batches 1,32,64 --rounds 2 --start-together --logs "$OUT/logs-8b" --out "$OUT/device-8b.json"
  step run-8b 110 "$PY" bench/run.py --model "$MODEL_DIR" --only throughput,p2 --no-baselines --quick \
    --out "$OUT/run-8b.json"
fi

if [ ${#failed[@]} -gt 0 ]; then
  printf '# FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "# all steps done; JSON in $OUT"
