#!/usr/bin/env bash
# A real single-node Slurm on this machine (Debian slurm-wlm + munge, no systemd), for tests and laptops.
#
#   scripts/slurm-local.sh up      start munged, slurmctld and slurmd; print the SLURM_CONF line to export
#   scripts/slurm-local.sh down    cancel its jobs and stop exactly the daemons `up` started (by their pid files)
#   scripts/slurm-local.sh status  show whether it is up
#
# Everything lives in one state folder ($SLURM_LOCAL_DIR, default /tmp/slurm-local-<uid>): its own munge key
# and socket, slurm.conf, spool, logs and pid files, so nothing under /etc is touched and a second copy can
# run beside it with another folder and port ($SLURM_LOCAL_PORT, default 6817; slurmd uses the next one).
# Settings that work on these machines (docs/DESIGN.md, "Scale"): proctrack/linuxproc, task/none, no
# accounting, NodeName = `hostname -s`. Without accounting `sacct` fails; submitit then warns and still
# collects every result from its pickles.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local-$(id -u)}"
PORT="${SLURM_LOCAL_PORT:-6817}"
PARTITION="${SLURM_LOCAL_PARTITION:-local}"
# GPUs the node advertises (GRES without device files: Slurm counts and grants them, nothing binds them), so
# that per-job GPU requests are scheduled on a machine without GPUs (tests). 0: none.
GPUS="${SLURM_LOCAL_GPUS:-0}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin"
DAEMONS=(slurmd slurmctld munged)  # stop order: the node, the controller, then authentication

die() { echo "slurm-local: $*" >&2; exit 1; }

need_binaries() {
    local missing=()
    for b in munged slurmctld slurmd sbatch sinfo scontrol; do command -v "$b" >/dev/null || missing+=("$b"); done
    ((${#missing[@]} == 0)) || die "missing ${missing[*]}; install them with: apt-get install -y slurm-wlm munge"
}

# The pid in DIR/<name>.pid when that process is alive and is <name> (a recycled pid is not ours).
our_pid() {
    local name=$1 pid
    [[ -f "$DIR/$name.pid" ]] || return 1
    pid=$(tr -dc 0-9 <"$DIR/$name.pid")
    [[ -n "$pid" && -r /proc/$pid/comm && "$(cat /proc/$pid/comm)" == "$name" ]] || return 1
    echo "$pid"
}

write_conf() {
    local node cpus mem_mb user
    node=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # leave 10% to the system
    user=$(id -un)
    cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh; rewritten on every \`up\`.
ClusterName=local
SlurmctldHost=$node
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
InactiveLimit=0
KillWait=10
MinJobAge=600
SlurmdTimeout=60
$( ((GPUS > 0)) && echo "GresTypes=gpu" )
NodeName=$node CPUs=$cpus RealMemory=$mem_mb $( ((GPUS > 0)) && echo "Gres=gpu:$GPUS" ) State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    if ((GPUS > 0)); then
        # Slurm drops a gpu GRES without device files; character devices nothing uses stand in for them
        local files=(/dev/null /dev/zero /dev/full /dev/random /dev/urandom)
        ((GPUS <= ${#files[@]})) || die "SLURM_LOCAL_GPUS=$GPUS: at most ${#files[@]} stand-in GPUs"
        local list
        list=$(IFS=,; echo "${files[*]:0:GPUS}")
        echo "NodeName=$node Name=gpu File=$list" >"$DIR/gres.conf"
    else
        rm -f "$DIR/gres.conf"
    fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for ((i = 0; i < seconds * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "$what did not come up within ${seconds}s; see the logs in $DIR"
}

node_idle() { [[ "$(sinfo -h -N -o %t 2>/dev/null | head -1)" =~ ^(idle|mix|alloc)$ ]]; }

up() {
    need_binaries
    if our_pid slurmctld >/dev/null && our_pid slurmd >/dev/null && our_pid munged >/dev/null; then
        echo "slurm-local: already up ($DIR)" >&2
    else
        down quiet  # a half-started cluster from an earlier run: start clean
        mkdir -p "$DIR/ctld" "$DIR/spool"
        chmod 700 "$DIR"
        if [[ ! -s "$DIR/munge.key" ]]; then
            (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge.key")
        fi
        munged --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
            --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" --force
        wait_for 10 munged our_pid munged
        write_conf
        slurmctld -i
        wait_for 20 slurmctld scontrol ping
        slurmd
        wait_for 30 "slurmd (node $(hostname -s))" node_idle
    fi
    sinfo >&2
    echo "export SLURM_CONF=$CONF"
}

down() {
    local quiet=${1:-}
    if [[ -f "$CONF" ]] && our_pid slurmctld >/dev/null; then
        scancel --full --partition="$PARTITION" >/dev/null 2>&1 || true  # jobs die with their cluster
        for ((i = 0; i < 50; i++)); do
            [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.2
        done
    fi
    for name in "${DAEMONS[@]}"; do
        local pid
        pid=$(our_pid "$name") || { rm -f "$DIR/$name.pid"; continue; }
        kill -TERM "$pid"
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        rm -f "$DIR/$name.pid"
        [[ -n "$quiet" ]] || echo "slurm-local: stopped $name ($pid)" >&2
    done
}

status() {
    local all=0
    for name in "${DAEMONS[@]}"; do
        if pid=$(our_pid "$name"); then echo "$name: running ($pid)"; else echo "$name: stopped"; all=1; fi
    done
    ((all == 0)) && sinfo
    return $all
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: $0 up|down|status" ;;
esac
