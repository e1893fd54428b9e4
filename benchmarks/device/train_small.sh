#!/usr/bin/env bash
# One self-contained GPU call of `llarva train-small` (issue 9): record the demos, train a small
# LLaVA from random initialisation, evaluate it and the scripted expert on the same 25 episodes.
#
#   bash benchmarks/device/train_small.sh reach_target               # on the device (results in $OUT)
#   bash benchmarks/device/train_small.sh sweep_to_dustpan_of_size
#   OUT=/tmp/out bash benchmarks/device/train_small.sh reach_target --toy   # CPU dry run, toy scale, no setup
#
# Further arguments go to `llarva train-small` (e.g. --max-steps N to repeat a run step for step).
# $OUT receives, as they are made (so a run stopped by the time limit still returns them):
#   train_small_<task>_model.tar    the checkpoint folder (transformers layout, bf16)
#   train_small_<task>.json         summary: options, seeds, model size, training log, success rates
#   train_small_<task>_eval.json    evaluate()'s results for the trained policy (what `llarva eval --results` writes)
#   train_small_<task>_expert.json  the scripted expert on the same episodes
#   train_small_<task>_rollout.mp4  one evaluation episode (the first success, else episode 0)
#   train_small_<task>.log          the console output
set -eo pipefail
task=${1:?usage: train_small.sh TASK [--toy] [llarva train-small options]}
shift
toy=0
if [ "${1:-}" = "--toy" ]; then toy=1; shift; fi
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"

if [ $toy = 0 ]; then
  source benchmarks/device/setup.sh
  python=python3
else
  python=${PYTHON:-python}
fi
export CUBLAS_WORKSPACE_CONFIG=:4096:8 TQDM_MININTERVAL=10 HF_HUB_OFFLINE=1

# Demos per task: demos are cheap on 16 cores (about a minute for these with 12 processes).
case $task in
  reach_target) demos=1000 ;;
  sweep_to_dustpan_of_size | sweep_to_dustpan) demos=500 ;;
  *) demos=200 ;;
esac

if [ $toy = 1 ]; then
  args=(--demos 2 --size toy --max-steps 3 --batch-size 8 --processes 2
        --eval-episodes 2 --eval-num-envs 2 --eval-episode-length 5)
else
  # The whole call must end within the device's 10 minutes: the run gets what is left of
  # ${TOTAL_SECONDS:-570} s after setup, and training stops early enough to leave 150 s to evaluate.
  run_seconds=$(( ${TOTAL_SECONDS:-570} - SECONDS - 10 ))
  args=(--demos $demos --processes 12 --train-seconds 330 --run-seconds $run_seconds
        --eval-reserve-seconds 150 --eval-num-envs 10)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

$python -m llarva_policy.cli train-small --task "$task" --out "${WORK:-/tmp/train_small}/$task" --export "$OUT" \
  "${args[@]}" "$@" 2>&1 | tee "$OUT/train_small_${task}.log"
