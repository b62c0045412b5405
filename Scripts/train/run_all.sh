#!/usr/bin/env bash
# The whole pipeline: tokenizer -> stage 1 -> stage 2 -> export -> reference evaluation.
# Re-running it resumes: a finished stage is skipped, an interrupted one continues from its
# checkpoint (train.py --resume), export and evaluation are redone.
#
#   Scripts/train/run_all.sh                 # full run, about 90 minutes on 2 cores
#   SMOKE=1 Scripts/train/run_all.sh         # tiny model, a few minutes, proves every stage
#
# Environment: RUN (run directory, default Scripts/train/runs/full or runs/smoke), PYTHON,
# PRESET, STAGE1_MIN, STAGE2_MIN, BATCH, SEED, EVAL_COUNT, THREADS.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"
PY=${PYTHON:-/work/venv/bin/python}
NICE="nice -n ${NICENESS:-10}"
SEED=${SEED:-1234}
THREADS=${THREADS:-2}
if [[ "${SMOKE:-0}" == 1 ]]; then
  RUN=${RUN:-$HERE/runs/smoke}
  PRESET=${PRESET:-smoke}
  S1=(--steps ${STAGE1_STEPS:-60} --train-scenes 300 --batch ${BATCH:-4} --ckpt-minutes 0.5 --log-every 5 --eval-scenes 4)
  S2=(--steps ${STAGE2_STEPS:-30} --train-scenes 300 --batch ${BATCH:-4} --ckpt-minutes 0.5 --log-every 5 --eval-scenes 4)
  EVAL_COUNT=${EVAL_COUNT:-4}
else
  RUN=${RUN:-$HERE/runs/full}
  PRESET=${PRESET:-full}
  S1=(--minutes ${STAGE1_MIN:-60} --batch ${BATCH:-8} --eval-scenes 16)
  S2=(--minutes ${STAGE2_MIN:-22} --batch ${BATCH:-8} --eval-scenes 32)
  EVAL_COUNT=${EVAL_COUNT:-100}
fi
mkdir -p "$RUN"
exec > >(tee -a "$RUN/pipeline.log") 2>&1
echo "== $(date -u +%FT%TZ) run_all: RUN=$RUN PRESET=$PRESET SEED=$SEED"
export PYTHONWARNINGS=ignore
if [[ ! -f tokenizer/tokenizer.model ]]; then
  $NICE "$PY" train_tokenizer.py --out tokenizer
fi
$NICE "$PY" scenes.py --split val --count 6 --out "$RUN/samples" >/dev/null
$NICE "$PY" train.py --stage 1 --run-dir "$RUN/stage1" --preset "$PRESET" --seed "$SEED" --threads "$THREADS" --resume "${S1[@]}"
$NICE "$PY" train.py --stage 2 --run-dir "$RUN/stage2" --init "$RUN/stage1/final.pt" --seed "$SEED" --threads "$THREADS" --resume "${S2[@]}"
$NICE "$PY" export.py --final "$RUN/stage2/final.pt" --out "$RUN/export"
$NICE "$PY" eval_reference.py --model "$RUN/export" --split test --count "$EVAL_COUNT" --threads "$THREADS" --json "$RUN/eval_test_full.json"
echo "== $(date -u +%FT%TZ) run_all done: export in $RUN/export, test results in $RUN/eval_test_full.json"
