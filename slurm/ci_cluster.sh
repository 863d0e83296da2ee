#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for CI and for trying the sbatch scripts without a cluster.
#
#   eval "$(slurm/ci_cluster.sh start)"   # starts munged, slurmctld and slurmd; prints `export SLURM_CONF=...`
#   slurm/ci_cluster.sh status            # sinfo of the running cluster
#   slurm/ci_cluster.sh stop              # stops the daemons this script started
#
# Needs root (munged runs as user munge, the SLURM daemons as root). The node has no GPUs, so jobs must not
# request any: submit with GPUS=1 SBATCH_GRES=none (see slurm/train.sbatch). Everything the cluster writes
# (state, spool, logs, pid files, slurm.conf) lives in $LOSSAGENT_SLURM_DIR (default /tmp/lossagent-slurm).
# When sbatch is missing, `start` installs the Debian packages first (apt-get, so root and a package mirror).
set -euo pipefail

DIR=${LOSSAGENT_SLURM_DIR:-/tmp/lossagent-slurm}
CONF=$DIR/slurm.conf

log() { echo "ci_cluster: $*" >&2; }

install_slurm() {
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    log "installing slurmctld slurmd slurm-client munge"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >&2
}

start_munge() {
    # One munge daemon per machine: reuse a working one (a credential round trip proves it).
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not start (see /var/log/munge/munged.log)"
    exit 1
}

write_conf() {
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    # RealMemory in MB, leaving a quarter for the system; jobs are placed by CPUs only (CR_CPU).
    memory=$(awk '/MemTotal/ {print int($2 / 1024 * 3 / 4)}' /proc/meminfo)
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF" <<EOF
ClusterName=lossagent-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${LOSSAGENT_SLURMCTLD_PORT:-6817}
SlurmdPort=${LOSSAGENT_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Short timers so that tests do not wait: a finished job leaves squeue soon, a killed one is cleaned up fast.
MinJobAge=300
KillWait=5
SchedulerParameters=sched_interval=2
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install_slurm
    if [ -f "$CONF" ] && SLURM_CONF=$CONF sinfo >/dev/null 2>&1; then
        log "already running ($CONF)"
        echo "export SLURM_CONF=$CONF"
        return
    fi
    start_munge
    write_conf
    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    for _ in $(seq 100); do
        if [ "$(SLURM_CONF=$CONF sinfo -h -o %t 2>/dev/null)" = "idle" ]; then
            log "up: $(SLURM_CONF=$CONF sinfo -h -o '%P %D node(s) %c CPUs %t')"
            echo "export SLURM_CONF=$CONF"
            return
        fi
        sleep 0.2
    done
    log "the node did not become idle; logs: $DIR/slurmctld.log $DIR/slurmd.log"
    SLURM_CONF=$CONF sinfo >&2 || true
    exit 1
}

stop() {
    # Only the daemons whose pid files this cluster wrote; munged stays (other users of the machine may need it).
    for daemon in slurmd slurmctld; do
        if [ -f "$DIR/$daemon.pid" ]; then
            kill "$(cat "$DIR/$daemon.pid")" 2>/dev/null || true
        fi
    done
    for daemon in slurmd slurmctld; do
        for _ in $(seq 50); do
            [ -f "$DIR/$daemon.pid" ] && kill -0 "$(cat "$DIR/$daemon.pid")" 2>/dev/null || break
            sleep 0.1
        done
        rm -f "$DIR/$daemon.pid"
    done
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF=$CONF sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
