#!/usr/bin/env bash
# train.py on every GPU of every node of a Slurm job through `accelerate launch`, or on this machine alone.
#
#   # from the checkout's root:
#   sbatch --nodes 2 --ntasks-per-node 1 --gpus-per-node 8 --cpus-per-task 96 scripts/launch.sh \
#       experiment=paper_gka_s data.root=/data/imagenet resume=auto hydra.run.dir=/scratch/$USER/gka_s
#   NPROC=2 bash scripts/launch.sh model=gka shape=fmnist      # one machine, 2 processes (CPU: gloo)
#
# One task per node: Slurm starts this script once on each node (srun below), and each starts the node's
# processes. Accelerate does not read Slurm's variables, so they are passed on here: the number of machines
# (SLURM_NNODES), this node's rank (SLURM_NODEID), the main node's address (the job's first host) and a port;
# processes per node: NPROC, else the node's GPUs (SLURM_GPUS_ON_NODE, nvidia-smi), else 1.
# What goes where: Hydra's overrides (everything after the script's name) choose the model, data, recipe,
# epochs, batch per process, precision (mixed_precision=) and the run folder; this script and Accelerate
# decide the processes and machines. A preempted or timed-out job gets SIGTERM, which reaches every process:
# each checkpoints at the next update and exits 75; requeued, `resume=auto` with the same hydra.run.dir
# continues it exactly (docs/reliability.md). `mixed_precision=auto` (the default) follows `accelerate launch
# --mixed_precision` / an `accelerate config` file when the script is started through one (see README).
#SBATCH --job-name=vit-gka
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
set -euo pipefail
# the checkout: under sbatch $0 is Slurm's copy of this script in its spool folder, so the folder sbatch was
# called from (the checkout's root, on a file system every node sees)
ROOT=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$ROOT"
[ -f train.py ] || { echo "error: run sbatch from the vit-gka checkout's root (no train.py in $ROOT)" >&2; exit 2; }
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

gpus() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 0; }
NNODES=${SLURM_NNODES:-1}
NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-$(gpus)}}
[ "${NPROC:-0}" -ge 1 ] || NPROC=1
PORT=${MAIN_PROCESS_PORT:-29500}
MAIN=${MAIN_PROCESS_IP:-127.0.0.1}
if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
    MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

launch() {  # on one node: its rank is SLURM_NODEID under srun, 0 otherwise
    local args=(--num_machines "$NNODES" --machine_rank "${SLURM_NODEID:-0}" --num_processes $((NNODES * NPROC))
                --main_process_ip "$MAIN" --main_process_port "$PORT")
    # --multi_gpu also on a CPU machine: train.py then runs gloo CPU processes (--cpu would want MPI)
    [ $((NNODES * NPROC)) -gt 1 ] && args=(--multi_gpu "${args[@]}")
    exec "$PY" -m accelerate.commands.launch "${args[@]}" train.py "$@"
}

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${VIT_GKA_ON_NODE:-}" ] && [ "$NNODES" -gt 1 ]; then
    # the batch script runs on the first node only: start one copy of this script per node
    VIT_GKA_ON_NODE=1 exec srun --ntasks-per-node 1 --kill-on-bad-exit=1 bash "$ROOT/scripts/launch.sh" "$@"
fi
launch "$@"
