#!/usr/bin/env bash
# The same two-stage recipe as run_all.sh on one GPU, with a larger batch and a shorter budget:
# how the shipped Jobs/models/dllava-scenes was trained (an H100 lent to the session; the CPU plan
# in run_all.sh is the reproducible default). Writes the export as a tarball and the logs to $OUT.
#   bash Scripts/train/run_gpu.sh [STAGE1_MIN] [STAGE2_MIN]
set -uo pipefail
S1=${1:-4.5}; S2=${2:-1.5}
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# The recipe pins transformers 4.57.6; a machine with another version gets the carried wheels.
if ! python3 -c "import transformers, sys; sys.exit(transformers.__version__ != '4.57.6')" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ../../.whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
RUN=/tmp/gpu_run
python3 train.py --stage 1 --run-dir $RUN/stage1 --preset full --batch 64 --minutes "$S1" --device cuda --workers 14 \
    --log-every 100 --eval-scenes 64 --ckpt-minutes 100 --val-every-minutes 100 2>&1 | tail -25
python3 train.py --stage 2 --run-dir $RUN/stage2 --init $RUN/stage1/final.pt --batch 64 --minutes "$S2" --device cuda --workers 14 \
    --log-every 100 --eval-scenes 64 --ckpt-minutes 100 --val-every-minutes 100 2>&1 | tail -25
cp $RUN/stage1/log.txt "$OUT/stage1_log.txt"; cp $RUN/stage2/log.txt "$OUT/stage2_log.txt"
python3 export.py --final $RUN/stage2/final.pt --out $RUN/export && tar -C $RUN -cf "$OUT/export.tar" export
python3 eval_reference.py --model $RUN/export --split test --count 100 --threads 12 --json "$OUT/eval_test_full.json" 2>&1 | tail -20
