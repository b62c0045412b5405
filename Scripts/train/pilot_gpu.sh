#!/usr/bin/env bash
# Pilot of the CPU plan on a GPU machine (device tool): the same model, batch and step counts as
# the ~90-minute 2-core run, to measure the accuracy that schedule reaches, plus a clean 2-thread
# CPU timing of the full-size model. Not part of the pipeline.
#   bash Scripts/train/pilot_gpu.sh STAGE1_STEPS STAGE2_STEPS   (writes logs to $OUT)
# The device image has transformers 5.x: carry wheels of transformers 4.57.6, tokenizers 0.22.2
# and huggingface_hub 0.36.2 (see /work/.library/device/README.md) and install them first.
# Untested: the device tool sends the session's original checkout, not this worktree.
set -uo pipefail
S1=${1:-1800}; S2=${2:-800}
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
nproc
python3 train.py --stage 1 --run-dir /tmp/time --preset full --batch 8 --time-steps 20 --threads 2 2>&1 | tail -1 | tee $OUT/cpu_timing_2threads.json
python3 train.py --stage 1 --run-dir /tmp/p/s1 --preset full --batch 8 --steps $S1 --device cuda --workers 12 \
  --log-every 100 --eval-scenes 96 --ckpt-minutes 100 --val-every-minutes 100
python3 train.py --stage 2 --run-dir /tmp/p/s2 --init /tmp/p/s1/final.pt --batch 8 --steps $S2 --device cuda --workers 12 \
  --log-every 100 --eval-scenes 96 --ckpt-minutes 100 --val-every-minutes 100
cp /tmp/p/s1/log.txt $OUT/stage1_log.txt; cp /tmp/p/s2/log.txt $OUT/stage2_log.txt
cp /tmp/p/s1/val.json $OUT/stage1_val.json; cp /tmp/p/s2/val.json $OUT/stage2_val.json
python3 export.py --final /tmp/p/s2/final.pt --out /tmp/p/export
python3 eval_reference.py --model /tmp/p/export --count 100 --threads 8 --json $OUT/eval_test_full.json | tail -15
