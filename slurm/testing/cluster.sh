#!/usr/bin/env bash
# A real Slurm cluster on one machine, for tests: one slurmctld and two slurmd "nodes" (n1, n2)
# on this host, with every path under one directory. See /work/shared/slurm-on-one-machine.md.
#
#   cluster.sh install     apt-get install slurm-wlm munge, only if missing (root)
#   cluster.sh start DIR   write DIR/slurm.conf, start the daemons, wait until both nodes are idle,
#                          then print `export SLURM_CONF=DIR/slurm.conf`
#   cluster.sh stop DIR    stop DIR's daemons by their pid files (idempotent)
#
# One cluster per DIR; ports are chosen free, so clusters in different DIRs don't collide, but
# they share this machine's munged (tests/slurm_cluster.py runs one cluster at a time).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin, often not on a user's PATH

die() { echo "cluster.sh: $*" >&2; exit 1; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "slurm-wlm/munge are not installed and installing them needs root"
    # noninteractive: no debconf prompts on a fresh CI machine; no recommends: not needed, faster.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# Start munged unless one already answers; note in DIR that we started it, so stop kills it.
start_munge() {
    local dir=$1 lock
    munge_ok && return 0
    # Serialise with other `start`s on this machine: two munged racing for one socket both lose.
    exec {lock}>/tmp/seg-slurm-munged.lock
    flock "$lock"
    if ! munge_ok; then
        mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
        [[ -s /etc/munge/munge.key ]] || mungekey -c -f
        chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
        chmod 700 /etc/munge
        # --force: start even if a dead munged left its socket behind (no live one answered).
        runuser -u munge -- munged --force
        for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
        munge_ok || die "munged does not answer (see /var/log/munge/munged.log)"
        cat /run/munge/munged.pid >"$dir/munged.started"
    fi
    exec {lock}>&-
}

# A free run of N consecutive TCP ports, below Linux's ephemeral range (32768+) so that no
# outgoing connection is likely to take one between the choice and the daemons binding it.
free_ports() {
    local n=$1 base i
    for _ in $(seq 100); do
        base=$((20000 + RANDOM % 12000))
        for ((i = 0; i < n; i++)); do
            # A connection that succeeds means someone listens there.
            if (exec 3<>"/dev/tcp/127.0.0.1/$((base + i))") 2>/dev/null; then continue 2; fi
        done
        echo "$base"
        return 0
    done
    die "no $n free consecutive ports found"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    local dir=$1 port=$2 cpus
    cpus=$(nproc)
    cat >"$dir/slurm.conf" <<EOF
# Written by slurm/testing/cluster.sh: a throwaway test cluster, all state under $dir.
ClusterName=segtest
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
# %n: each slurmd (n1, n2) on this one host needs its own spool, pid file and log.
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
# No cgroups, no accounting daemon: what works in a container without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
# No sacct without a database: finished jobs are recorded in this file instead.
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
# A node that was down comes back by itself once its slurmd registers.
ReturnToService=2
# Quick: SIGKILL 5 s after SIGTERM, forget finished jobs after 10 s, schedule every second.
KillWait=5
MinJobAge=10
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName=n[1-2] NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$((port + 1))-$((port + 2)) CPUs=$cpus State=UNKNOWN
# FORCE:4: up to 4 jobs share each core, so many small test jobs run at once on 2 cores.
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=UNLIMITED OverSubscribe=FORCE:4 State=UP
EOF
}

start() {
    local dir=$1 port
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    for f in "$dir"/slurmctld.pid "$dir"/slurmd.n{1,2}.pid; do
        ! pid_alive "$f" || die "a daemon of $dir is already running ($f); run: $0 stop $dir"
    done
    command -v slurmctld >/dev/null || die "slurm is not installed; run: $0 install"
    mkdir -p "$dir/state" "$dir/spool"
    start_munge "$dir"
    port=$(free_ports 3)  # slurmctld, n1, n2
    write_conf "$dir" "$port"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -N n1 -f "$SLURM_CONF"
    slurmd -N n2 -f "$SLURM_CONF"
    # Ready when both nodes register as idle (about 3 s here).
    for _ in $(seq 60); do
        [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) == $'n1 idle\nn2 idle' ]] && {
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        }
        sleep 0.5
    done
    {
        echo "cluster.sh: the nodes of $dir are not idle after 30 s:"
        sinfo -N 2>&1 || true
        for log in "$dir"/*.log; do echo "--- tail $log"; tail -n 20 "$log"; done
    } >&2
    stop "$dir"
    exit 1
}

# Kill the processes in the given pid files and wait for them to exit (SIGKILL after 10 s).
# All at once: each daemon takes about 2 s to exit after SIGTERM.
kill_wait() {
    local f pids=()
    for f in "$@"; do
        pid_alive "$f" && pids+=("$(cat "$f")")
    done
    if ((${#pids[@]})); then
        kill "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "${pids[@]}" 2>/dev/null || break; sleep 0.1; done
        kill -9 "${pids[@]}" 2>/dev/null || true
        while kill -0 "${pids[@]}" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$@"
}

stop() {
    local dir=$1
    [[ -d $dir ]] || return 0
    dir=$(cd "$dir" && pwd)
    # Cancel jobs first: slurmstepd outlives slurmd and would keep running them otherwise.
    if pid_alive "$dir/slurmctld.pid"; then
        export SLURM_CONF=$dir/slurm.conf
        scancel --full --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 100); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
    # munged is shared by the whole machine: stop it only if our start started it.
    kill_wait "$dir"/slurmd.n{1,2}.pid "$dir/slurmctld.pid" "$dir/munged.started"
}

case ${1:-} in
    install) install ;;
    start) [[ $# == 2 ]] || die "usage: $0 start DIR"; start "$2" ;;
    stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
