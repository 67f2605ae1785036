#!/usr/bin/env bash
# A real SLURM cluster on one machine, for the tests and for trying the sbatch scripts on a laptop.
#
#   slurm/local_cluster.sh start [--nodes N]  # as root: installs the Debian packages if missing, starts the daemons
#   eval "$(slurm/local_cluster.sh env)"       # points sbatch/squeue/scontrol at this cluster (SLURM_CONF)
#   sbatch --wrap hostname
#   slurm/local_cluster.sh status   # exit 0 when every daemon runs and all N nodes are idle
#   slurm/local_cluster.sh exec NODE CMD...   # CMD inside NODE's namespaces (its network, hostname, mounts)
#   slurm/local_cluster.sh stop     # cancels its jobs, ends exactly the daemons `start` started (pid files),
#                                   # removes the namespaces, links and per-node files it made
#
# One node (the default): `localhost`, slurmd in the machine's own namespaces, as a plain workstation.
# N > 1 nodes: node1..nodeN, each a network namespace (`ip netns`, named dupmae-<ctld port>-<node>) with its own
# hostname (a UTS namespace), its own mount namespace where /etc/hosts lists the cluster and /etc/resolv.conf
# fails fast, and one veth `eth0` with the address 10.213.S.(10+i)/24 on a bridge (dm<ctld port>br) whose root-
# namespace end, 10.213.S.1, is the controller's address (S = ctld port mod 256). The namespaces have no route out:
# the subnet is the only one they reach. munged and slurmctld run in the root namespace; one munged serves all.
# Key, configuration, state, pid files and logs live in DUPMAE_SLURM_DIR (default /tmp/dupmae-slurm); nothing
# under /etc is touched, so a system SLURM or munge is left alone. Each node has CPUs = nproc and 90% of the
# memory (oversubscribed across nodes); no cgroups, no accounting database (use `scontrol show job`, not sacct).
# Every command is idempotent. Environment: DUPMAE_SLURM_DIR, DUPMAE_SLURM_CTLD_PORT (6817),
# DUPMAE_SLURM_SLURMD_PORT (6818): two clusters with their own folder and ports run side by side.
set -euo pipefail
umask 022  # munged refuses group- or world-writable key and socket folders

DIR=${DUPMAE_SLURM_DIR:-/tmp/dupmae-slurm}
CTLD_PORT=${DUPMAE_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${DUPMAE_SLURM_SLURMD_PORT:-6818}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
NODES_FILE=$DIR/nodes  # the node count of the cluster `start` made; status, exec and stop read it
export SLURM_CONF=$CONF
# Multi-node network: names made from the controller port, so that two clusters do not share a name or subnet.
SUBNET=10.213.$((CTLD_PORT % 256))
CTLD_ADDR=$SUBNET.1
BRIDGE=dm${CTLD_PORT}br

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

pid_file() { echo "$DIR/run/$1.pid"; }

# The pid in pid file $1 when that process is alive and its command is $2 (default $1); nothing otherwise.
running_pid() {
    local file pid
    file=$(pid_file "$1")
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "${2:-$1}"* ]] || return 1
    echo "$pid"
}

node_count() { if [[ -s $NODES_FILE ]]; then cat "$NODES_FILE"; else echo 1; fi; }

# The node names of an N-node cluster: localhost alone, or node1..nodeN.
node_names() {
    if (($1 == 1)); then echo localhost; else seq -f 'node%g' 1 "$1"; fi
}

netns_of() { echo "dupmae-$CTLD_PORT-$1"; }
node_addr() { echo "$SUBNET.$((10 + ${1#node}))"; }

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
    local n=$1 cpus mem_mb node ctld
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$DIR"/{munge,state,spool,run,log}
    chmod 700 "$DIR/munge"
    [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
    # slurmctld starts only where its host name matches SlurmctldHost: the root namespace's own name on N nodes.
    if ((n == 1)); then ctld="localhost(127.0.0.1)"; else ctld="$(hostname -s)($CTLD_ADDR)"; fi
    {
        cat <<EOF
# Written by slurm/local_cluster.sh; rewritten on every start.
ClusterName=dupmae
SlurmctldHost=$ctld
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$SOCKET,cred_expire=5
StateSaveLocation=$DIR/state
# %n: each node's slurmd has its own spool, pid file and log
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
# A node that stops answering is DOWN after about 3 x 10 s (its running jobs requeue with --requeue).
SlurmdTimeout=10
# Jobs may requeue themselves (scontrol requeue) and are requeued on node failure.
JobRequeue=1
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database).
MinJobAge=600
# Tasks get SIGKILL 10 s after SIGTERM (cancel, time limit, a job requeued from a lost node).
KillWait=10
EOF
        for node in $(node_names "$n"); do
            if ((n == 1)); then
                echo "NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
            else
                echo "NodeName=$node NodeHostname=$node NodeAddr=$(node_addr "$node") CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
            fi
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
}

# The bridge, and per node a network namespace with one veth on it; the per-node hosts and resolv.conf files.
make_network() {
    local n=$1 node ns other
    other=$(ip -o -4 addr show to "$SUBNET.0/24" | awk -v b="$BRIDGE" '$2 != b {print $2}')
    [[ -z $other ]] || die "$SUBNET.0/24 is already used by $other; choose another DUPMAE_SLURM_CTLD_PORT"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    mkdir -p "$DIR/net"
    {
        echo "127.0.0.1 localhost"
        echo "$CTLD_ADDR $(hostname -s)"
        for node in $(node_names "$n"); do echo "$(node_addr "$node") $node"; done
    } >"$DIR/net/hosts"
    # The machine's resolver is out of reach from the namespaces: unknown names fail at once instead of in 20 s.
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$DIR/net/resolv.conf"
    for node in $(node_names "$n"); do
        ns=$(netns_of "$node")
        [[ -e /run/netns/$ns ]] || ip netns add "$ns"
        if ! ip link show "$BRIDGE-${node#node}" >/dev/null 2>&1; then
            ip link add "$BRIDGE-${node#node}" type veth peer name eth0 netns "$ns"
            ip -n "$ns" addr add "$(node_addr "$node")/24" dev eth0
        fi
        ip link set "$BRIDGE-${node#node}" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
}

start_daemon() {
    local name=$1 comm=$2
    shift 2
    running_pid "$name" "$comm" >/dev/null && return 0
    "$@" || die "$name failed to start; see $DIR/log/$name.log"
    for _ in $(seq 50); do
        running_pid "$name" "$comm" >/dev/null && return 0
        sleep 0.1
    done
    die "$name did not write $(pid_file "$name"); see $DIR/log/$name.log"
}

# slurmd for one node: on N > 1 nodes inside the node's network namespace (nsenter, not `ip netns exec`, which
# remounts /sys and hides the cgroup folder slurmd reads), with a hostname and mounts of its own (unshare).
start_slurmd() {
    local node=$1 n=$2
    if ((n == 1)); then
        start_daemon "slurmd-$node" slurmd slurmd -f "$CONF" -N "$node"
        return
    fi
    mkdir -p "$DIR/spool/$node"
    start_daemon "slurmd-$node" slurmd nsenter --net="/run/netns/$(netns_of "$node")" \
        unshare --uts --mount --propagation private sh -ec \
        'hostname "$1"; mount --bind "$2/net/hosts" /etc/hosts; mount --bind "$2/net/resolv.conf" /etc/resolv.conf
         exec slurmd -f "$3" -N "$1"' slurmd "$node" "$DIR" "$CONF"
}

# Wait until all nodes take jobs; bring back a node that a previous run left down or drained.
wait_for_nodes() {
    local n=$1 states node
    for _ in $(seq 120); do
        states=$(sinfo --noheader --Node --format='%N %T' 2>/dev/null || true)
        # a trailing * is a node that does not answer (yet)
        if [[ $(grep -cE ' (idle|mixed|allocated|completing)$' <<<"$states") == "$n" ]]; then return 0; fi
        for node in $(awk '$2 ~ /^(down|drain)/ {print $1}' <<<"$states"); do
            scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        done
        sleep 0.5
    done
    die "nodes not up after 60 s: $(xargs <<<"$states"); see $DIR/log/slurmd-*.log and slurmctld.log"
}

any_daemon_running() {
    local node
    running_pid munged >/dev/null || running_pid slurmctld >/dev/null && return 0
    for node in $(node_names "$(node_count)"); do running_pid "slurmd-$node" slurmd >/dev/null && return 0; done
    return 1
}

all_slurmd_running() {
    local node
    for node in $(node_names "$1"); do running_pid "slurmd-$node" slurmd >/dev/null || return 1; done
}

start() {
    local n=1 node
    while (($#)); do
        case $1 in
            --nodes) n=${2:-}; shift 2 || die "--nodes needs a number" ;;
            --nodes=*) n=${1#--nodes=}; shift ;;
            *) die "start: unknown option $1" ;;
        esac
    done
    [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 200)) || die "--nodes must be a number from 1 to 200, not '$n'"
    [[ $(id -u) == 0 ]] || die "start needs root (daemons as root; namespaces on --nodes > 1)"
    install_packages
    if any_daemon_running && [[ $(node_count) != "$n" ]]; then
        die "a $(node_count)-node cluster runs in $DIR; stop it before starting one of $n nodes"
    fi
    if ! running_pid slurmctld >/dev/null || ! all_slurmd_running "$n"; then
        write_config "$n"
    fi
    echo "$n" >"$NODES_FILE"
    ((n == 1)) || make_network "$n"
    start_daemon munged munged munged --socket="$SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$(pid_file munged)" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force
    start_daemon slurmctld slurmctld slurmctld -f "$CONF"
    for node in $(node_names "$n"); do start_slurmd "$node" "$n"; done
    wait_for_nodes "$n"
    echo "cluster of $n node(s) up in $DIR; run: export SLURM_CONF=$CONF"
}

# Cancel every job of this cluster and wait until the nodes have let them go, so no task outlives slurmd.
cancel_jobs() {
    running_pid slurmctld >/dev/null || return 0
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

# End daemons given as NAME:COMMAND pairs: TERM to all at once, then KILL whatever still runs after 10 s.
stop_daemons() {
    local entry name pid pids=() names=() i
    for entry in "$@"; do
        name=${entry%%:*}
        if pid=$(running_pid "$name" "${entry#*:}"); then
            kill -TERM "$pid"
            pids+=("$pid")
            names+=("$name")
        else
            rm -f "$(pid_file "$name")"
        fi
    done
    for i in "${!pids[@]}"; do
        for _ in $(seq 100); do
            [[ -d /proc/${pids[i]} ]] || break
            sleep 0.1
        done
        [[ -d /proc/${pids[i]} ]] && kill -KILL "${pids[i]}"
        rm -f "$(pid_file "${names[i]}")"
        echo "stopped ${names[i]} (${pids[i]})"
    done
}

# Remove a node's namespace; a step that outlived its slurmd (a node cut off mid-job) is ended first.
remove_netns() {
    local ns=$1 pids
    [[ -e /run/netns/$ns ]] || return 0
    pids=$(ip netns pids "$ns" 2>/dev/null | xargs)
    if [[ -n $pids ]]; then
        echo "ending processes left in $ns: $pids"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    fi
    ip netns del "$ns"
}

stop() {
    local n node
    n=$(node_count)
    [[ $(id -u) == 0 ]] || die "stop needs root"
    cancel_jobs
    # shellcheck disable=SC2046
    stop_daemons $(node_names "$n" | sed 's/.*/slurmd-&:slurmd/')
    stop_daemons slurmctld:slurmctld
    stop_daemons munged:munged
    if ((n > 1)); then
        for node in $(node_names "$n"); do
            remove_netns "$(netns_of "$node")"
            ip link del "$BRIDGE-${node#node}" 2>/dev/null || true  # gone with its namespace, unless a step held it
        done
        ip link del "$BRIDGE" 2>/dev/null || true
        rm -rf "$DIR/net"
        for node in $(node_names "$n"); do rm -rf "$DIR/spool/$node"; done
        echo "removed $n namespaces and $BRIDGE"
    fi
    rm -f "$NODES_FILE"
}

status() {
    local n name node pid ok=0 states
    n=$(node_count)
    for name in munged slurmctld; do
        if pid=$(running_pid "$name"); then echo "$name: running ($pid)"; else echo "$name: stopped"; ok=3; fi
    done
    for node in $(node_names "$n"); do
        if pid=$(running_pid "slurmd-$node" slurmd); then echo "slurmd $node: running ($pid)"; else
            echo "slurmd $node: stopped"; ok=3; fi
    done
    if ((ok == 0)); then
        states=$(sinfo --noheader --Node --format='%N %T') || return 3
        echo "$states"
        [[ $(grep -c ' idle$' <<<"$states") == "$n" ]] || ok=3
    fi
    return $ok
}

# Run a command inside a node's namespaces: those of its slurmd (network, hostname, mounts).
exec_in() {
    local node=${1:-} pid
    [[ -n $node ]] && shift || die "usage: $0 exec NODE CMD..."
    pid=$(running_pid "slurmd-$node" slurmd) || die "no slurmd runs for node '$node'"
    (($#)) || set -- bash
    if [[ $node == localhost ]]; then exec "$@"; fi
    exec nsenter --target "$pid" --net --uts --mount -- "$@"
}

case ${1:-} in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    exec) shift; exec_in "$@" ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 start [--nodes N]|stop|status|exec NODE CMD...|env" ;;
esac
