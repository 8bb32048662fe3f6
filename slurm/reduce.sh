#!/usr/bin/env bash
# Reduce a stage's folds to the model that seeds the next stage, once every fold is done.
#
#   sbatch --dependency=afterok:<array job id> slurm/reduce.sh runs/X/stage1 [reduce_folds options]
#
# Writes runs/X/stage1/reduced/ (see tools/reduce_folds.py); ./launch cv submits it after each
# stage's array and makes the next stage's array wait for it. Processes: the node's GPUs, or
# SEG_PROCS_PER_NODE on a CPU node (evaluation is exact whatever their number).
#SBATCH --job-name=seg-reduce
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

PY=${SEG_PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
STAGE_DIR=${1:?"usage: sbatch --dependency=afterok:JOB slurm/reduce.sh runs/X/stageS [options]"}
shift
export PYTHONUNBUFFERED=1
export WANDB_MODE=${WANDB_MODE:-offline}
PROCS=${SLURM_GPUS_ON_NODE:-${SEG_PROCS_PER_NODE:-1}}
echo "reduce.sh: job ${SLURM_JOB_ID:-} $STAGE_DIR with $PROCS process(es)"
if (( PROCS == 1 )); then
    exec "$PY" tools/reduce_folds.py "$STAGE_DIR" "$@"
fi
exec "$PY" -m accelerate.commands.launch --multi_gpu --mixed_precision no --dynamo_backend no \
    --num_machines 1 --num_processes "$PROCS" --main_process_port $((20000 + ${SLURM_JOB_ID:-$$} % 20000)) \
    tools/reduce_folds.py "$STAGE_DIR" "$@"
