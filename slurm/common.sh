# The body shared by slurm/cisr.sh, slurm/risr.sh and slurm/air.sh: each sets its #SBATCH header and the default
# CONFIG, then sources this file. One job = one experiment = one node; its GPUs train one run with DDP (torchrun).
#
#   mkdir -p runs/slurm                        # SLURM writes the job's log there and does not create folders
#   sbatch slurm/cisr.sh                       # the header's resources: one node, 8 GPUs
#   CONFIG=configs/cisr_maniqa.toml sbatch slurm/cisr.sh --set train.batch_size=16
#   sbatch -p PART -A ACC slurm/cisr.sh        # or export SBATCH_PARTITION=PART SBATCH_ACCOUNT=ACC
#   GPUS=4 slurm/cisr.sh                       # run outside a job, the script submits itself with resources for
#                                              # 4 GPUs (CPUS, MEM: default 8 CPUs and 64G per GPU)
#   GPUS=0 slurm/cisr.sh                       # a CPU job: no GPU request, one process (DEVICE=cpu: GPUS processes)
#   SBATCH_GRES=none GPUS=1 sbatch -c 4 --mem=16G slurm/cisr.sh   # a CPU job with plain sbatch (SBATCH_GRES
#                                              # and the command line override the header)
#
# Environment: CONFIG (the experiment), GPUS (processes; in a job the default is the number of GPUs allocated),
# PYTHON (default `python`, e.g. PYTHON=.venv/bin/python), LOSSAGENT_DIR (the repository; default: the folder
# sbatch was called from). Arguments after the script name go to lossagent.py.
#
# Requeue: 300 s before the time limit SLURM sends USR1 to this script (#SBATCH --signal=B:USR1@300). It stops the
# training, requeues the job, and the rerun resumes from the last finished stage (runs/<name>/ckpt/last.pt): the
# work of the unfinished stage is lost, nothing else. The log continues in the same file (--open-mode=append).

if [ -z "${SLURM_JOB_ID:-}" ]; then
    # Not inside a job: submit this script with resources for $GPUS, from the repository.
    script=$(realpath "$0")
    cd "$REPO" || exit 2
    export CONFIG GPUS=${GPUS:-8}
    if [ "$GPUS" = 0 ] || [ "${DEVICE:-}" = cpu ]; then
        request=(--gres=none --cpus-per-task="${CPUS:-8}" --mem="${MEM:-32G}")
    else
        request=(--gres=gpu:"$GPUS" --cpus-per-task="${CPUS:-$((8 * GPUS))}" --mem="${MEM:-$((64 * GPUS))G}")
    fi
    [ -n "${SBATCH_OUTPUT:-}" ] || mkdir -p runs/slurm  # the header's log folder, unless the log goes elsewhere
    exec sbatch "${request[@]}" "$script" "$@"
fi

cd "$REPO" || exit 2
if [ ! -f "$CONFIG" ]; then
    echo "error: config $CONFIG not found in $PWD (CONFIG is relative to the repository)" >&2
    exit 2
fi
ranks=${GPUS:-${SLURM_GPUS_ON_NODE:-1}}
[ "$ranks" -gt 0 ] || ranks=1
echo "$(date '+%F %T') job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $ranks process(es)," \
     "$CONFIG $*"

child=
requeue() {
    echo "$(date '+%F %T') time limit near: stopping the run, requeueing job $SLURM_JOB_ID"
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null  # torchrun passes it on to every rank
        wait "$child"
    fi
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "scontrol requeue failed: resubmit the same command, the run resumes from its last finished stage" >&2
    exit 1
}
trap requeue USR1

# In the background, so that the shell can run the trap while the training runs (bash defers traps until a
# foreground command returns, but `wait` returns at once when a trapped signal arrives).
"${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$ranks" \
    lossagent.py --config "$CONFIG" "$@" &
child=$!
wait "$child"
