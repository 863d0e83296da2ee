#!/bin/bash
# Classical SR x4 (paper Table 2): one experiment, one node, 8 GPUs. Default: configs/cisr_niqe.toml.
# Usage, environment and requeueing: slurm/common.sh. Every experiment of the paper: python slurm/launch.py --study paper
#SBATCH --job-name=lossagent-cisr
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --mem=512G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
# 8 CPUs and 64G per GPU; stdout and stderr both go to --output. The time limit leaves room over the
# expected 7.3 h on 8 A100s (launch.py --dry-run); a run that needs longer is requeued and resumes.

CONFIG=${CONFIG:-configs/cisr_niqe.toml}
REPO=${LOSSAGENT_DIR:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
if [ ! -f "$REPO/slurm/common.sh" ]; then
    echo "error: $REPO is not the LossAgent repository: submit from it, or set LOSSAGENT_DIR" >&2
    exit 2
fi
source "$REPO/slurm/common.sh"
