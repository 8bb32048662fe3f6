#!/usr/bin/env bash
# One fold of one stage, over every node of the job: one `accelerate launch` per node.
#
#   sbatch --array=0-4 [--nodes 2 --gpus-per-node 4] slurm/fold.sh configs/X.yaml \
#       [--stage S] [--init-from runs/X/stage{S-1}/reduced/model.safetensors] [key=value ...]
#
# The array task id is the fold (or set SEG_FOLD). Processes per node: the node's GPUs, or
# SEG_PROCS_PER_NODE on CPU-only nodes (default 1; gloo). Python: SEG_PYTHON, else the
# project's .venv, else python3 on PATH. ./launch cv submits this for every stage.
#
# Time limits and preemption: Slurm signals this script (USR1, 3 minutes before the limit;
# TERM on preemption); it passes USR1 to the training processes, which save their state,
# write PREEMPTED in the fold's folder and exit. The job then requeues itself, and the
# rerun resumes from the saved state (seg/train.py --resume auto). Slurm signals every
# process of a step, so the launchers, data workers and wandb's service are started with
# USR1 ignored: only the training processes, which handle it, react. (A preemption's own
# TERM reaches them all; with a short grace time the rerun resumes from the last state.)
#SBATCH --job-name=seg-fold
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@180
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"  # Slurm runs a copy of this script from its spool folder

PY=${SEG_PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
FOLD=${SEG_FOLD:-${SLURM_ARRAY_TASK_ID:?"submit as an array (sbatch --array=0-4 ...) or set SEG_FOLD"}}
CONFIG=${1:?"usage: sbatch --array=0-4 slurm/fold.sh configs/X.yaml [--stage S] [key=value ...]"}
shift
export PYTHONUNBUFFERED=1
export WANDB_MODE=${WANDB_MODE:-offline}  # compute nodes rarely reach the internet: wandb sync later
# A preempted fold exits 0 here, not 75: torchrun reports a child's 75 as a failure with a
# traceback (and srun as "Exited with exit code 1"); this script reads PREEMPTED instead.
export SEG_PREEMPTED_EXIT=0

RUN_DIR=$("$PY" seg/train.py --config "$CONFIG" --fold "$FOLD" "$@" --print-run-dir)
NODES=${SLURM_JOB_NUM_NODES:-1}
PER_NODE=${SLURM_GPUS_ON_NODE:-${SEG_PROCS_PER_NODE:-1}}
# The first node's address as Slurm knows it (node names need not resolve in DNS), and a
# port of this job's own, so that folds sharing a node don't meet at one rendezvous.
HEAD=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname -s)}" | head -n 1)
export MAIN_ADDR=$(scontrol show node "$HEAD" | grep -oP 'NodeAddr=\K\S+' || echo 127.0.0.1)
export MAIN_PORT=$((20000 + ${SLURM_JOB_ID:-$$} % 20000))
export PY NODES PER_NODE
echo "fold.sh: job ${SLURM_JOB_ID:-} fold $FOLD restart ${SLURM_RESTART_COUNT:-0}:" \
    "$NODES node(s) x $PER_NODE process(es), main $MAIN_ADDR:$MAIN_PORT, run $RUN_DIR"

# This job as scancel and scontrol must name it: an array task's own job id can be the array's
# id (task 13_1's was 13), which they take as every task of the array.
JOB=${SLURM_JOB_ID:-}
if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
fi

STARTED=$(mktemp)  # a PREEMPTED marker older than this is not this run's
trap 'rm -f "$STARTED"' EXIT
stop() {  # ask every training process to save and stop (seg/train.py treats USR1 so)
    echo "fold.sh: $1 received: asking the fold to save its state and stop"
    scancel --signal=USR1 "$JOB" 2>/dev/null || true  # every step, not this script
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM

# One launcher per node; machine rank = the node's index in the job.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '
    trap "" USR1  # inherited as ignored by everything below but seg/train.py (see the top)
    if (( NODES * PER_NODE == 1 )); then exec "$PY" seg/train.py "$@"; fi
    exec "$PY" -m accelerate.commands.launch --multi_gpu --mixed_precision no --dynamo_backend no \
        --num_machines "$NODES" --machine_rank "$SLURM_NODEID" --num_processes $((NODES * PER_NODE)) \
        --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" seg/train.py "$@"
' fold.sh --config "$CONFIG" --fold "$FOLD" "$@" &
SRUN=$!
# A trapped signal interrupts `wait`: wait again until srun has really ended, then take its
# exit status (bash keeps it for a waited-for background job).
while kill -0 "$SRUN" 2>/dev/null; do wait "$SRUN" || true; done
code=0
wait "$SRUN" || code=$?

MARKER="$RUN_DIR/PREEMPTED"
if [[ $code -eq 75 || ( -f $MARKER && $MARKER -nt $STARTED ) ]]; then
    # `scontrol requeue` TERMs this script: that is the requeue itself, not a new preemption
    trap '' TERM USR1
    step=$(grep -oP '"step": \K[0-9]+' "$MARKER" 2>/dev/null || echo "?")
    if ! scontrol requeue "$JOB"; then
        echo "fold.sh: preempted at step $step, state saved, but the requeue failed: submit this fold again"
        exit 1
    fi
    echo "fold.sh: preempted at step $step, state saved, requeued (Slurm starts it again in about 2 minutes)"
    exit 0
fi
echo "fold.sh: training exited with $code"
exit "$code"
