#!/usr/bin/env bash
# A real one-host SLURM cluster for CI and for trying the sbatch templates: Debian's slurm-wlm + munge, a minimal
# slurm.conf without cgroups (containers and VMs rarely allow them), daemons started by hand (no systemd needed).
#
#   scripts/slurm/local-cluster.sh start    # install if needed, configure, start munged/slurmctld/slurmd, wait idle
#   scripts/slurm/local-cluster.sh status   # sinfo + squeue
#   scripts/slurm/local-cluster.sh stop     # stop the three daemons by the pids in their pid files
#
# Needs root (slurmd runs jobs as their submitting user, and the packages install system-wide).
# State, logs and pid files live in $POLYFORMER_SLURM_DIR (default /tmp/polyformer-slurm); the config is written to
# /etc/slurm/slurm.conf so that sbatch/srun/sinfo find it without SLURM_CONF. An existing slurm.conf that this
# script did not write is never overwritten.
set -euo pipefail

STATE_DIR="${POLYFORMER_SLURM_DIR:-/tmp/polyformer-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by polyformer scripts/slurm/local-cluster.sh"
HOST="$(hostname -s)"
MUNGE_PID=/run/munge/munged.pid

log() { echo "local-cluster: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' postinst scripts try to start services; without systemd that fails harmlessly.
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "$CONF exists and was not written by this script; refusing to replace it"
        exit 1
    fi
    mkdir -p /etc/slurm "$STATE_DIR/state" "$STATE_DIR/spool"
    cat >"$CONF" <<EOF
$MARKER
ClusterName=polyformer
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# No cgroups: track processes by parent pid and bind no CPUs, which works in containers and VMs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
# Lightning requeues a job on SIGUSR1 with 'scontrol requeue'; that needs requeueing allowed.
JobRequeue=1
ReturnToService=2
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if [[ -f "$MUNGE_PID" ]] && kill -0 "$(cat "$MUNGE_PID")" 2>/dev/null; then
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged  # daemonizes and writes $MUNGE_PID
}

wait_idle() {
    for _ in $(seq 1 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle; then
            log "cluster up: $(sinfo -h -N -o '%N %c CPUs %T')"
            return
        fi
        sleep 0.5
    done
    log "the node did not become idle in 30 s; logs in $STATE_DIR"
    sinfo -N -l >&2 || true
    tail -n 20 "$STATE_DIR"/slurm*.log >&2 || true
    exit 1
}

start() {
    install_packages
    write_config
    start_munge
    # -c: clear the saved state (jobs of an earlier run), so a restarted cluster starts empty and idle.
    if ! { [[ -f "$STATE_DIR/slurmctld.pid" ]] && kill -0 "$(cat "$STATE_DIR/slurmctld.pid")" 2>/dev/null; }; then
        slurmctld -c
    fi
    if ! { [[ -f "$STATE_DIR/slurmd.pid" ]] && kill -0 "$(cat "$STATE_DIR/slurmd.pid")" 2>/dev/null; }; then
        slurmd
    fi
    wait_idle
}

stop_pidfile() {
    local name="$1" pidfile="$2"
    [[ -f "$pidfile" ]] || return 0
    local pid
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -9 "$pid"
        fi
    fi
    rm -f "$pidfile"
}

stop() {
    # Jobs first, so slurmd does not leave their processes behind.
    if command -v scancel >/dev/null && [[ -f "$STATE_DIR/slurmctld.pid" ]]; then
        scancel --full --user "$(id -un)" 2>/dev/null || true
    fi
    stop_pidfile slurmd "$STATE_DIR/slurmd.pid"
    stop_pidfile slurmctld "$STATE_DIR/slurmctld.pid"
    stop_pidfile munged "$MUNGE_PID"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo -N -l && squeue ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
