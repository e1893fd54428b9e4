#!/usr/bin/env bash
# `llarva train-small` (issue 9) on the GPU for one or more tasks at once: record the demos, train
# a small LLaVA from random initialisation. The tasks run side by side (the CPU cores are split
# between their demo recorders; the trainings share the GPU).
#
# By default the training takes what is left of one device call (10 minutes) after the demos, and
# finishes in it. TRAIN_SECONDS=960 makes it longer than one call: then each call runs until
# ${TOTAL_SECONDS:-530} s have passed and leaves its state in ${WORK:-/tmp/train_small}; the same
# command run again on the same (still warm) machine continues from there, reusing the demos, the
# tokenized data and the compiled model, if it comes within 30 s of the last call's end (the lent
# machine is given back then; the state, about 80 MB with the optimizer, is more than a call can
# bring back, 64 MB). In practice the next call has mostly found a fresh machine (rounds 15-17), so
# give every call after the first the checkpoint the last one returned: unpack its model tar into an
# ignored folder, carry it and add `--init-from FOLDER/train_small_<task>_model` after `--` (the
# weights, fresh optimizer moments; a warm machine's exact state is still used first). A fresh call
# records and prepares the data again first, about 245 s for round 17's 3,000 + 800 demos; with
# `--init-from` it replays a DAgger round's takeover attempts from the checkpoint's
# takeover_driven_starts.npz instead of driving them again (86 s of those 245).
# The carried folders (.gl .whl .gymr) come from benchmarks/device/prepare.sh, run here first.
#
#   bash benchmarks/device/train_small.sh reach_target sweep_to_dustpan_of_size       # on the device
#   TRAIN_SECONDS=960 bash benchmarks/device/train_small.sh reach_target             # 3 calls in a row
#   bash benchmarks/device/train_small.sh reach_target -- --max-steps 2900            # repeat a run step for step
#   OUT=/tmp/out bash benchmarks/device/train_small.sh reach_target --toy              # CPU dry run, toy scale
#   WORK=/tmp/dagger bash benchmarks/device/train_small.sh reach_target -- --variation 0 \
#       --driver .r8/model --driver .r10/model --takeover-demos 400 --takeover-num-envs 64   # a DAgger round
# (each --driver, an earlier round's model, drives 400 more episodes that the expert finishes,
# batched on the GPU; the next round into the same WORK with one --driver more reuses them)
#   TRAIN_SECONDS=280 bash benchmarks/device/train_small.sh reach_target -- --variation 0 --size small-swin \
#       --driver /tmp/r18model --takeover-demos 288 --takeover-steps 60 --takeover-weight 5 \
#       --finetune-from /tmp/r18model --lr 3e-4          # a DAgger round that goes on from its driver
# (`--finetune-from`: a finished model's weights, a schedule of its own; a driver's steps driven
# elsewhere come along as <WORK>/<task>/takeover/<task>/driven_starts.npz, put there before the call)
#   TRAIN_SECONDS=600 bash benchmarks/device/train_small.sh reach_target -- --variation 0 --size small-swin \
#       --takeover-demos 500 --takeover-steps 60 --takeover-num-envs 64 --takeover-weight 3 \
#       --dagger-rounds 3 --dagger-seconds 200 --dagger-lr 3e-4      # a training and 3 DAgger rounds, one command
# (the same command in every call continues the chain; a fresh machine: add --dagger-from the unpacked
# train_small_<task>_round<k>_model.tar the last call returned)
#
# The evaluation is not part of the GPU calls: `llarva eval` runs the checkpoint on any machine
# (examples/train_small.md gives the commands; the rollouts are what costs time, not the model).
# Arguments after `--` go to every `llarva train-small`.
# $OUT receives, per task, as they are made (so a call stopped by the time limit still returns them):
#   train_small_<task>_model.tar    the checkpoint folder (transformers layout, bf16)
#   train_small_<task>.json         summary: options, seeds, model size, training log
#   train_small_<task>.log          the console output
set -eo pipefail
tasks=()
while [ $# -gt 0 ] && [ "$1" != "--" ] && [ "$1" != "--toy" ]; do tasks+=("$1"); shift; done
[ ${#tasks[@]} -gt 0 ] || { echo "usage: train_small.sh TASK [TASK ...] [--toy] [-- train-small options]"; exit 2; }
toy=0
if [ "${1:-}" = "--toy" ]; then toy=1; shift; fi
if [ "${1:-}" = "--" ]; then shift; fi
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"

if [ $toy = 0 ]; then
  source benchmarks/device/setup.sh
  python=python3
else
  python=${PYTHON:-python}
fi
export CUBLAS_WORKSPACE_CONFIG=:4096:8 TQDM_MININTERVAL=10 HF_HUB_OFFLINE=1

# The recipe: LLARVA's visual trace before the action, with 3 points (now, half-way, the end) and
# its two future points weighted 10 in the loss (with 10 points, teacher forcing gives each point
# away from the ones before it: train_small.goal_span), every episode's first 5 steps drawn 4 times
# per epoch (where the image alone says where to go), and demos recorded with DART noise injection
# (per task below). Not
# LLARVA's history noise: a model trained on noisy histories misreads the exact ones of a rollout.
# Batch 512 without deterministic kernels: faster per sample than batch 128 with them
# (benchmarks/train_small_speed.py measures it). No --compile here: on the H200 it trains
# small-swin at batch 512 1.27x as fast but its first step takes 91 s, most of a 3-5 minute
# training (benchmarks/results/train_small_speed_small_swin_h200.json).
# (Shadows, --render-quality high, made recording 10x slower on the device's renderer with
# MuJoCo's 4096 px shadow map; with the 1024 px map since, 3,000 high demos took 60 s on the H200,
# about 48 a second against fast's 55.)
recipe=(--visual-trace --trace-points 3 --goal-weight 10 --goal-points future --early-steps 5 --early-weight 4
        --eval-episodes 0 --batch-size 512 --no-deterministic --train-seconds "${TRAIN_SECONDS:-fit}")
processes=$(( (${DEMO_CORES:-14}) / ${#tasks[@]} ))

pids=()
for task in "${tasks[@]}"; do
  case $task in   # demos per task (a minute or so of the host's cores) and DART noise
    reach_target) demos=${REACH_DEMOS:-2000} noise=0.3 ;;
    sweep_to_dustpan_of_size | sweep_to_dustpan) demos=${SWEEP_DEMOS:-1000} noise=0.2 ;;   # 0.4 fails the expert 60% of the time
    *) demos=200 noise=0.2 ;;
  esac
  if [ $toy = 1 ]; then
    args=(--demos 2 --size toy --max-steps 3 --batch-size 8 --processes 2 --train-seconds 60 --trace-points 3)
  else
    # The call must end within the device's 10 minutes: each run gets what is left of
    # ${TOTAL_SECONDS:-530} s after setup, less a margin for the last checkpoint.
    run_seconds=$(( ${TOTAL_SECONDS:-530} - SECONDS - 10 ))
    args=(--demos $demos --action-noise $noise --processes $processes --run-seconds $run_seconds
          --eval-reserve-seconds 25)
  fi
  $python -m llarva_policy.cli train-small --task "$task" --out "${WORK:-/tmp/train_small}/$task" --export "$OUT" \
    "${recipe[@]}" "${args[@]}" "$@" > "$OUT/train_small_${task}.log" 2>&1 &
  pids+=($!)
done
[ $toy = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 15 "$OUT"/train_small_*.log
exit $status
