#!/usr/bin/env bash
# The same two-stage recipe as run_all.sh on one GPU, with a larger batch and a shorter budget:
# how the shipped Jobs/models/dllava-scenes was trained (an H100 lent to the session; the CPU plan
# in run_all.sh is the reproducible default). Writes the logs, the validation summaries, the export
# (a tarball) and the PyTorch test evaluation to $OUT.
#   bash Scripts/train/run_gpu.sh [STAGE1_MIN] [STAGE2_MIN] [WORKERS]
set -uo pipefail
S1=${1:-5.5}; S2=${2:-1.5}; WORKERS=${3:-15}
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# The recipe pins transformers 4.57.6; a machine with another version gets the carried wheels.
if ! python3 -c "import transformers, sys; sys.exit(transformers.__version__ != '4.57.6')" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ../../.whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
RUN=/tmp/gpu_run
COMMON=(--batch 64 --device cuda --workers "$WORKERS" --log-every 100 --eval-scenes 64 --ckpt-minutes 100 --val-every-minutes 100)
python3 train.py --stage 1 --run-dir $RUN/stage1 --preset full --minutes "$S1" "${COMMON[@]}" 2>&1 | tail -30
cp $RUN/stage1/log.txt "$OUT/stage1_log.txt"; cp $RUN/stage1/val.json "$OUT/stage1_val.json"
python3 train.py --stage 2 --run-dir $RUN/stage2 --init $RUN/stage1/final.pt --minutes "$S2" "${COMMON[@]}" 2>&1 | tail -20
cp $RUN/stage2/log.txt "$OUT/stage2_log.txt"; cp $RUN/stage2/val.json "$OUT/stage2_val.json"
python3 export.py --final $RUN/stage2/final.pt --out $RUN/export && tar -C $RUN -cf "$OUT/export.tar" export
python3 eval_reference.py --model $RUN/export --split test --count 100 --threads 12 --json "$OUT/eval_test_full.json" 2>&1 | tail -20
