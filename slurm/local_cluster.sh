#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for the tests and for trying the sbatch scripts on a laptop.
#
#   slurm/local_cluster.sh start    # as root: installs the Debian packages if missing, starts the daemons
#   eval "$(slurm/local_cluster.sh env)"   # points sbatch/squeue/scontrol at this cluster (SLURM_CONF)
#   sbatch --wrap hostname
#   slurm/local_cluster.sh status   # exit 0 when all three daemons run and the node takes jobs
#   slurm/local_cluster.sh stop     # cancels its jobs, then ends exactly the daemons `start` started (pid files)
#
# munged, slurmctld and slurmd run as root with their key, configuration, state, pid files and logs in
# DUPMAE_SLURM_DIR (default /tmp/dupmae-slurm); nothing under /etc is used, so a system SLURM or munge is
# left alone. The node is `localhost` with CPUs = nproc and 90% of the memory; no cgroups, no accounting
# database (use `scontrol show job`, not sacct). Every command is idempotent.
# Environment: DUPMAE_SLURM_DIR, DUPMAE_SLURM_CTLD_PORT (6817), DUPMAE_SLURM_SLURMD_PORT (6818).
set -euo pipefail
umask 022  # munged refuses group- or world-writable key and socket folders

DIR=${DUPMAE_SLURM_DIR:-/tmp/dupmae-slurm}
CTLD_PORT=${DUPMAE_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${DUPMAE_SLURM_SLURMD_PORT:-6818}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
export SLURM_CONF=$CONF
DAEMONS=(munged slurmctld slurmd)  # start order; stop goes in reverse

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

pid_file() { echo "$DIR/run/$1.pid"; }

# The pid in $1's pid file when that process is alive and is $1; nothing otherwise (stale files are ignored).
running_pid() {
    local file pid
    file=$(pid_file "$1")
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1"* ]] || return 1
    echo "$pid"
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root to install them, or install them yourself"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$DIR"/{munge,state,spool,run,log}
    chmod 700 "$DIR/munge"
    [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh; rewritten on every start.
ClusterName=dupmae
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$SOCKET,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Schedule every few seconds so a requeued job starts soon after it becomes eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Jobs may requeue themselves (scontrol requeue) and are requeued on node failure.
JobRequeue=1
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database).
MinJobAge=600
KillWait=30
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemon() {
    local name=$1
    shift
    running_pid "$name" >/dev/null && return 0
    "$@" || die "$name failed to start; see $DIR/log/$name.log"
    for _ in $(seq 50); do
        running_pid "$name" >/dev/null && return 0
        sleep 0.1
    done
    die "$name did not write $(pid_file "$name"); see $DIR/log/$name.log"
}

# Wait until the node takes jobs; bring it back if a previous run left it down or drained.
wait_for_node() {
    local state
    for _ in $(seq 120); do
        state=$(sinfo --noheader --nodes=localhost --format=%T 2>/dev/null || true)
        case $state in
            idle* | mixed* | allocated* | completing*) return 0 ;;
            down* | drain*) scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node localhost is '${state:-unknown}' after 60 s; see $DIR/log/slurmd.log and slurmctld.log"
}

start() {
    install_packages
    if ! running_pid slurmctld >/dev/null || ! running_pid slurmd >/dev/null; then
        write_config
    fi
    start_daemon munged munged --socket="$SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$(pid_file munged)" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force
    start_daemon slurmctld slurmctld -f "$CONF"
    start_daemon slurmd slurmd -f "$CONF" -N localhost
    wait_for_node
    echo "cluster up in $DIR; run: export SLURM_CONF=$CONF"
}

# Cancel every job of this cluster and wait until the node has let them go, so no task outlives slurmd.
cancel_jobs() {
    running_pid slurmctld >/dev/null && running_pid slurmd >/dev/null || return 0
    local jobs
    jobs=$(squeue --noheader --format=%i 2>/dev/null) || return 0
    [[ -n $jobs ]] || return 0
    # shellcheck disable=SC2086
    scancel $jobs
    for _ in $(seq 120); do
        [[ -z $(squeue --noheader --format=%i 2>/dev/null) ]] && return 0
        sleep 0.5
    done
    echo "local_cluster.sh: jobs still ending after 60 s: $(squeue --noheader --format=%i | xargs)" >&2
}

stop() {
    local i name pid
    cancel_jobs
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        pid=$(running_pid "$name") || { rm -f "$(pid_file "$name")"; continue; }
        kill -TERM "$pid"
        for _ in $(seq 100); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        [[ -d /proc/$pid ]] && kill -KILL "$pid"
        rm -f "$(pid_file "$name")"
        echo "stopped $name ($pid)"
    done
}

status() {
    local name pid ok=0
    for name in "${DAEMONS[@]}"; do
        if pid=$(running_pid "$name"); then echo "$name: running ($pid)"; else echo "$name: stopped"; ok=3; fi
    done
    if ((ok == 0)); then
        sinfo --nodes=localhost || ok=3
    fi
    return $ok
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 start|stop|status|env" ;;
esac
