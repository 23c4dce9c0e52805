#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying run_with_submitit.py (and for its tests).
#
#   sudo tests/slurm/cluster.sh up /tmp/slurm        # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
#   export SLURM_CONF=/tmp/slurm/slurm.conf; sinfo; python run_with_submitit.py --partition debug ...
#   sudo tests/slurm/cluster.sh down /tmp/slurm      # cancels its jobs, stops its daemons
#
# Needs root (slurmd starts the jobs) and Debian's packages: apt-get install slurmctld slurmd slurm-client munge.
# Everything (config, state, logs, its own munged and key) lives in DIR, so several clusters can run side by
# side on different ports: SLURM_CTLD_PORT, SLURM_D_PORT (default 6817, 6818) and SLURM_FIRST_JOB_ID choose
# them. The node is this host, declared with SLURM_CPUS CPUs (default 8, more than a laptop may have: the
# declared node is used as written) and SLURM_GPUS placeholder "GPUs" as generic resources (default 2; 0: a
# cluster without GPUs), so GPU job scripts are accepted; their tasks run on the CPU. Partitions: debug
# (default) and acct, which only account "dino" may use (a cluster without an accounting database knows no
# account, so acct refuses every job); both have a 60-minute time limit, enforced at submission.
# SLURM_NODES=2 declares two nodes on this host, each with its own slurmd (slurmd -N NAME) on its own port
# (SLURM_D_PORT and the next one), spool folder, pid file and log: the host's name and "localhost", two names
# that resolve to this machine, so that a multi-node job's tasks find their master by its node name.
set -euo pipefail

usage() { echo "usage: $0 up|down DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(realpath -m "$2")
conf=$dir/slurm.conf
wait_s=${SLURM_WAIT_S:-120}  # bounded waits, generous for a busy machine
polls=$((wait_s * 10))  # each wait checks every 0.1 s, so that a quick start or stop is not rounded up to 1 s

fail() { echo "error: $*" >&2; exit 1; }

# Start one daemon and wait for its pid file; on failure show the end of its log.
start_daemon() {
    local name=$1 pidfile=$2 log=$3; shift 3
    "$@" || { tail -n 20 "$log" >&2 2>/dev/null; fail "$name did not start (log: $log)"; }
    for _ in $(seq "$polls"); do [[ -s $pidfile ]] && return 0; sleep 0.1; done
    tail -n 20 "$log" >&2 2>/dev/null
    fail "$name wrote no pid file $pidfile within ${wait_s}s (log: $log)"
}

# The cluster's node names: this host, then (SLURM_NODES=2) "localhost".
node_names() {
    local host
    host=$(hostname -s)
    if ((${SLURM_NODES:-1} == 1)); then echo "$host"; else echo "$host localhost"; fi
}

write_config() {
    local host gpus=${SLURM_GPUS:-2} gres="" gres_types="" gpu node port nodes="" node_lines="" index=0
    host=$(hostname -s)
    mkdir -p "$dir"/{state,spool,log}
    if ((gpus > 0)); then
        gres="Gres=gpu:$gpus" gres_types="GresTypes=gpu"
        echo "AutoDetect=off" >"$dir/gres.conf"
        for node in $(node_names); do
            printf 'NodeName=%s Name=gpu File=%s/gpu[0-%d]\n' "$node" "$dir" $((gpus - 1)) >>"$dir/gres.conf"
        done
        # character devices like /dev/null; plain files where mknod is not allowed (slurmd logs an error, works)
        for ((gpu = 0; gpu < gpus; gpu++)); do
            [[ -e $dir/gpu$gpu ]] || mknod "$dir/gpu$gpu" c 1 3 2>/dev/null || touch "$dir/gpu$gpu"
        done
    fi
    for node in $(node_names); do
        port=$((${SLURM_D_PORT:-6818} + index))
        node_lines+="NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=${SLURM_CPUS:-8} "
        node_lines+="RealMemory=16000 $gres State=UNKNOWN"$'\n'
        nodes+="${nodes:+,}$node"
        index=$((index + 1))
        mkdir -p "$dir/spool/$node"
    done
    cat >"$conf" <<EOF
ClusterName=dino$(printf '%s' "$dir" | cksum | cut -c1-6)
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURM_CTLD_PORT:-6817}
SlurmdPort=${SLURM_D_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
FirstJobId=${SLURM_FIRST_JOB_ID:-1}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
$gres_types
SlurmdParameters=config_overrides
ReturnToService=2
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=5
MinJobAge=600
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
${node_lines}PartitionName=debug Nodes=$nodes Default=YES MaxTime=60 State=UP
PartitionName=acct Nodes=$nodes AllowAccounts=dino MaxTime=60 State=UP
EOF
}

up() {
    [[ $EUID -eq 0 ]] || fail "run as root: slurmd starts the jobs as their users"
    for bin in munged slurmctld slurmd sbatch srun scontrol sinfo; do
        command -v "$bin" >/dev/null || fail "$bin is not installed (apt-get install slurmctld slurmd slurm-client munge)"
    done
    [[ ! -s $dir/slurmctld.pid ]] || fail "a cluster already runs from $dir (down it first)"
    write_config
    if [[ ! -s $dir/munge.key ]]; then
        (umask 077 && dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none)
    fi
    start_daemon munged "$dir/munged.pid" "$dir/log/munged.log" \
        munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed"
    export SLURM_CONF=$conf
    start_daemon slurmctld "$dir/slurmctld.pid" "$dir/log/slurmctld.log" slurmctld -f "$conf"
    local node state=""
    for node in $(node_names); do
        start_daemon "slurmd $node" "$dir/slurmd.$node.pid" "$dir/log/slurmd.$node.log" slurmd -f "$conf" -N "$node"
    done
    for _ in $(seq "$polls"); do
        state=$(sinfo --noheader --partition debug --format %T 2>/dev/null || true)
        [[ $state == idle ]] && { echo "export SLURM_CONF=$conf"; return 0; }
        sleep 0.1
    done
    tail -n 20 "$dir"/log/*.log >&2 2>/dev/null
    fail "the node did not become idle within ${wait_s}s (state: ${state:-no answer}; logs in $dir/log)"
}

# Stop daemons by their pid files (only the processes this script started) and wait until they are gone. They
# are signalled together, since each takes a second or two to shut down.
stop_daemons() {
    local pidfile pid pids=()
    for pidfile in "$@"; do
        [[ -s $pidfile ]] || continue
        pid=$(<"$pidfile")
        kill "$pid" 2>/dev/null || true
        pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq "$polls"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    done
    rm -f "$@"
}

down() {
    [[ -f $conf ]] || fail "no cluster config in $dir"
    export SLURM_CONF=$conf
    if [[ -s $dir/slurmctld.pid ]] && scancel --full --quiet --user root 2>/dev/null; then
        for _ in $(seq "$polls"); do
            [[ -z $(squeue --noheader --format %i 2>/dev/null | head -n 1) ]] && break
            sleep 0.1
        done
    fi
    stop_daemons "$dir"/slurmd*.pid "$dir/slurmctld.pid"
    stop_daemons "$dir/munged.pid"  # last: the SLURM daemons authenticate through it until they are gone
}

case $action in
    up) up ;;
    down) down ;;
    *) usage ;;
esac
