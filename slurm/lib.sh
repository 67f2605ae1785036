# Shared by the slurm/*.sbatch scripts (sourced, not run): per-job log folder, rendezvous, preemptible steps.
#
# SLURM copies a batch script to its spool folder before running it, so the scripts find the repository
# through SLURM_SUBMIT_DIR (submit from the repository root) or REPO.

# cd to the repository, pick the Python, and send this script's output to LOG_ROOT/<job name>-<job id>/.
job_setup() {
    REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$REPO" || exit 1
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x .venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
    fi
    LOG_DIR=${LOG_ROOT:-$REPO/logs}/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-local}
    mkdir -p "$LOG_DIR"
    echo "logs: $LOG_DIR"
    exec >>"$LOG_DIR/batch.log" 2>&1
    # srun one task per slot of the allocation, each with RANK/LOCAL_RANK/WORLD_SIZE from SLURM's variables (the
    # stages read them as under torchrun), rank r writing to LOG_DIR/rank-r.log; one failing rank ends all.
    # An array, not a function, so that `"${SRUN_RANKS[@]}" cmd &` makes $! the pid of srun itself.
    SRUN_RANKS=(srun --kill-on-bad-exit=1 --output="$LOG_DIR/rank-%t.log" --open-mode=append
        bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' rank)
    # torch starts one thread per core in every process unless told how many cores the task owns.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    echo "=== $(date -Is) job ${SLURM_JOB_ID:-} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "${SLURM_NTASKS:-1} tasks, python $PYTHON, repo $REPO"
}

# job_port JOB_ID FIRST LAST: a rendezvous port derived from the job id (two jobs sharing a node rarely collide),
# outside the kernel's ephemeral range FIRST-LAST (net.ipv4.ip_local_port_range, both ends included): the kernel
# hands those ports to outgoing connections, so one may hold the port when rank 0 binds it. Ports 10000 up to
# FIRST (10000-32767 with the default 32768-60999); if fewer than 1000 are left there, those above LAST.
job_port() {
    local id=$1 first=$2 last=$3 floor=10000
    if ((first - floor >= 1000)); then
        echo $((floor + id % (first - floor)))
    elif ((65535 - last >= 1000)); then
        echo $((last + 1 + id % (65535 - last)))
    else
        return 1
    fi
}

# torch.distributed's env:// rendezvous: rank 0 listens on the first node of the allocation, where this batch
# script runs, so its ephemeral range is the one read here. MASTER_ADDR and MASTER_PORT are kept when set.
rendezvous() {
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    if [[ -z ${MASTER_PORT:-} ]]; then
        local first=32768 last=60999
        read -r first last </proc/sys/net/ipv4/ip_local_port_range
        if ! MASTER_PORT=$(job_port "$SLURM_JOB_ID" "$first" "$last"); then
            echo "error: the ephemeral port range $first-$last leaves under 1000 ports outside it; set MASTER_PORT" \
                "to a port reserved in net.ipv4.ip_local_reserved_ports" >&2
            exit 2
        fi
    fi
    export MASTER_ADDR MASTER_PORT
    echo "rendezvous: $MASTER_ADDR:$MASTER_PORT, world size $SLURM_NTASKS"
}

_on_usr1() {
    echo "=== $(date -Is) batch shell got USR1: forwarding it to the training step"
    PREEMPTED=1
    [[ -n ${STEP_PID:-} ]] && kill -USR1 "$STEP_PID"
}

_on_term() {
    # SLURM sends SIGTERM to the tasks itself (scancel, preemption); keep waiting so they can checkpoint.
    echo "=== $(date -Is) batch shell got TERM: waiting for the step to checkpoint"
}

# SRUN_RANKS for a command that checkpoints and exits 0 on USR1 and resumes by itself (--resume auto). When USR1
# arrives (--signal=B:USR1@120, or `scancel --signal=USR1 --batch JOBID`), the tasks get it, checkpoint and
# exit; then the job requeues itself and its next run resumes. Returns the step's exit status otherwise.
run_preemptible_step() {
    PREEMPTED=0
    STEP_PID=
    trap _on_usr1 USR1
    trap _on_term TERM
    "${SRUN_RANKS[@]}" "$@" &
    STEP_PID=$!
    ((PREEMPTED)) && kill -USR1 "$STEP_PID"
    local rc
    # `wait` returns early whenever a trapped signal arrives; wait again until the step really ended.
    while :; do
        wait "$STEP_PID"
        rc=$?
        kill -0 "$STEP_PID" 2>/dev/null || break
    done
    trap - USR1 TERM
    echo "=== $(date -Is) step ended with exit status $rc"
    if ((PREEMPTED)); then
        # Requeue whatever the status: a rank that died before it could checkpoint loses only the steps since
        # the last checkpoint, which the next run redoes from there.
        echo "=== requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "=== requeue refused (submitted with --no-requeue?): submit the same command again to resume"
        exit 1
    fi
    return "$rc"
}
