#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying jobs on a workstation and for the tests.
#
#   slurm/local-cluster.sh start  [DIR]   start munged, slurmctld, slurmd; wait until the node is idle
#   slurm/local-cluster.sh stop   [DIR]   cancel the jobs, stop the daemons this script started
#   slurm/local-cluster.sh status [DIR]   show the daemons, sinfo and squeue
#   slurm/local-cluster.sh env    [DIR]   print the export lines (SLURM_CONF, PATH with the sacct stand-in)
#
# DIR (default $SAMDIFFSR_SLURM_DIR, else /tmp/samdiffsr-slurm) holds everything: slurm.conf, the munge
# key and socket, controller/node state, logs, PID files and bin/sacct (a stand-in answering from
# `squeue -t all`, since this cluster has no accounting database).
# Needs root (slurmd must run as root) and slurm-wlm + munge (slurm/install-slurm.sh).
# Environment:
#   SAMDIFFSR_SLURM_PORT            slurmctld port (slurmd uses PORT+1); default 6817
#   SAMDIFFSR_SLURM_START_TIMEOUT   seconds to wait for the node to become idle; default 60
#   SAMDIFFSR_SLURM_MIN_JOB_AGE     seconds finished jobs stay visible to squeue/sacct; default 3600
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ACTION=${1:-}
DIR=${2:-${SAMDIFFSR_SLURM_DIR:-/tmp/samdiffsr-slurm}}
PORT=${SAMDIFFSR_SLURM_PORT:-6817}
START_TIMEOUT=${SAMDIFFSR_SLURM_START_TIMEOUT:-60}
MIN_JOB_AGE=${SAMDIFFSR_SLURM_MIN_JOB_AGE:-3600}
DAEMONS=(munged slurmctld slurmd)

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
}

die() {
    echo "local-cluster.sh: $*" >&2
    exit 1
}

[[ -n "$ACTION" ]] || usage
DIR=$(realpath -m "$DIR")
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

# "PID COMM" of the process recorded for daemon $1, if it is alive (and not a zombie).
recorded_process() {
    local pidfile="$DIR/pids/$1.pid" pid comm
    [[ -f "$pidfile" ]] || return 1
    pid=$(<"$pidfile")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    is_zombie "$pid" && return 1
    echo "$pid $comm"
}

# PID recorded for daemon $1, if that process is alive and is really that daemon (/proc/PID/comm).
daemon_pid() {
    local rec
    rec=$(recorded_process "$1") || return 1
    [[ "${rec#* }" == "$1" ]] || return 1
    echo "${rec%% *}"
}

# Like daemon_pid, but also accepts a daemon that was just launched and has not exec'd yet: for a
# moment after `setsid ... &` the recorded PID still runs bash or setsid (seen on loaded machines).
daemon_starting_or_alive() {
    local rec comm
    rec=$(recorded_process "$1") || return 1
    comm=${rec#* }
    [[ "$comm" == "$1" || "$comm" == setsid || "$comm" == bash ]]
}

# An exited process its parent has not reaped yet (state Z): gone for our purposes.
is_zombie() {
    [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" == Z ]]
}

# slurmstepd processes that belong to this cluster (started by our slurmd, so SLURM_CONF=$CONF).
our_stepds() {
    local p comm
    for p in /proc/[0-9]*; do
        comm=$(cat "$p/comm" 2>/dev/null) || continue
        [[ "$comm" == slurmstepd ]] || continue
        if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
            echo "${p#/proc/}"
        fi
    done
}

# Stop PID $1 (expected comm $2): SIGTERM, wait up to $3 s, then SIGKILL.
stop_pid() {
    local pid=$1 name=$2 wait_s=$3 i comm
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 0
    [[ "$comm" == "$name" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < wait_s * 10; i++)); do
        [[ -e "/proc/$pid" ]] || return 0
        is_zombie "$pid" && return 0
        sleep 0.1
    done
    echo "local-cluster.sh: $name ($pid) ignored SIGTERM, sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        [[ -e "/proc/$pid" ]] || return 0
        is_zombie "$pid" && return 0
        sleep 0.1
    done
    echo "local-cluster.sh: $name ($pid) survived SIGKILL" >&2
    return 1
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

print_env() {
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=$DIR/bin:\$PATH"
}

write_conf() {
    local node node_line
    node=$(hostname -s)
    # `slurmd -C` prints e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=24105"
    node_line=$(slurmd -C | head -n 1)
    [[ "$node_line" == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
    node_line="NodeName=$node NodeAddr=127.0.0.1 ${node_line#NodeName=* } State=UNKNOWN"
    cat >"$CONF" <<CONF
# Written by slurm/local-cluster.sh: a one-node cluster on this machine.
ClusterName=samdiffsr
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/run/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/state/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MinJobAge=$MIN_JOB_AGE
KillWait=5
InactiveLimit=0
Waittime=0
$node_line
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

start_daemon() {
    local name=$1
    shift
    # setsid: own session, so the daemon outlives this shell and the caller's terminal / pytest.
    setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
    echo $! >"$DIR/pids/$name.pid"
}

# wait_for WHAT TIMEOUT_S DAEMON... -- CMD...: poll CMD until it succeeds; fail early if a DAEMON exits.
wait_for() {
    local what=$1 timeout_s=$2 i name
    shift 2
    local daemons=()
    while [[ "$1" != -- ]]; do
        daemons+=("$1")
        shift
    done
    shift
    for ((i = 0; i < timeout_s * 5; i++)); do
        if "$@"; then
            return 0
        fi
        for name in "${daemons[@]}"; do
            daemon_starting_or_alive "$name" || die "$name exited while waiting for $what; see $DIR/log/$name.out"
        done
        sleep 0.2
    done
    die "timed out after ${timeout_s}s waiting for $what (logs in $DIR/log)"
}

node_state() {
    sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null
}

node_idle() {
    [[ "$(node_state)" == idle ]]
}

cmd_start() {
    local name pid t0 node d p
    [[ "$(id -u)" -eq 0 ]] || die "must run as root (slurmd needs root)"
    for name in munged slurmctld slurmd sinfo; do
        command -v "$name" >/dev/null || die "$name not found: run slurm/install-slurm.sh"
    done
    t0=$(date +%s.%N)
    for name in "${DAEMONS[@]}"; do
        if pid=$(daemon_pid "$name"); then
            die "$name already running (pid $pid) for $DIR; run '$0 stop $DIR' first"
        fi
    done
    for p in "$PORT" $((PORT + 1)); do
        if port_in_use "$p"; then
            die "port $p is in use (another cluster?); set SAMDIFFSR_SLURM_PORT to a free port pair"
        fi
    done

    node=$(hostname -s)
    if ! getent hosts "$node" >/dev/null; then
        echo "local-cluster.sh: adding '127.0.0.1 $node' to /etc/hosts" >&2
        echo "127.0.0.1 $node" >>/etc/hosts
    fi

    # munged wants every folder above its socket searchable by all (pytest's 0700 tmp folders are not).
    d=$(dirname "$DIR")
    while [[ "$d" != / ]]; do
        [[ -d "$d" ]] || die "$d does not exist"
        if (( ($(stat -c "0%a" "$d") & 1) == 0 )); then
            die "munged needs o+x on every folder above its socket, $d is $(stat -c %A "$d"): use another DIR"
        fi
        d=$(dirname "$d")
    done

    # Fresh state every start: no stale jobs or node state from a previous run.
    rm -rf "$DIR/state" "$DIR/munge/run" "$DIR/pids"
    mkdir -p "$DIR/state/slurmctld" "$DIR/state/slurmd" "$DIR/log" "$DIR/pids" "$DIR/bin" \
        "$DIR/munge/run"
    # munged refuses group/world-writable folders on the way to its key and socket.
    chmod 0755 "$DIR" "$DIR/munge" "$DIR/munge/run"
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 0600 "$DIR/munge/munge.key"
    ln -sfn "$SCRIPT_DIR/sacct" "$DIR/bin/sacct"
    write_conf

    # From here on a failed start stops what it started.
    trap 'cmd_stop >/dev/null 2>&1 || true' EXIT
    start_daemon munged munged -F --key-file="$DIR/munge/munge.key" \
        --socket="$DIR/munge/run/munge.socket.2" --pid-file="$DIR/munge/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for "munged socket" 20 munged -- test -S "$DIR/munge/run/munge.socket.2"

    start_daemon slurmctld slurmctld -D -i -f "$CONF"
    start_daemon slurmd slurmd -D -f "$CONF"
    wait_for "node $node to become idle" "$START_TIMEOUT" "${DAEMONS[@]}" -- node_idle
    for name in "${DAEMONS[@]}"; do
        daemon_pid "$name" >/dev/null || die "$name exited; see $DIR/log/$name.out"
    done
    trap - EXIT
    echo "local slurm cluster up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s:" \
        "node $node idle, folder $DIR"
    echo "# use it with:"
    print_env
}

cmd_stop() {
    local name pid jobs i stepd rc=0
    [[ -f "$CONF" ]] || { echo "no cluster in $DIR"; return 0; }
    # Cancel the jobs first so that no slurmstepd / job process outlives the daemons.
    if daemon_pid slurmctld >/dev/null && jobs=$(timeout 10 squeue -h -o %A 2>/dev/null) && [[ -n "$jobs" ]]; then
        # shellcheck disable=SC2086  # one word per job id
        timeout 10 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            [[ -z "$(our_stepds)" ]] && break
            sleep 0.1
        done
    fi
    for name in slurmd slurmctld; do
        if pid=$(daemon_pid "$name"); then
            stop_pid "$pid" "$name" 15 || rc=1
        fi
    done
    for stepd in $(our_stepds); do
        stop_pid "$stepd" slurmstepd 5 || rc=1
    done
    if pid=$(daemon_pid munged); then
        stop_pid "$pid" munged 10 || rc=1
    fi
    if [[ $rc -ne 0 ]]; then
        echo "local-cluster.sh: some processes of the cluster in $DIR could not be stopped" >&2
        return 1
    fi
    rm -f "$DIR"/pids/*.pid
    echo "local slurm cluster in $DIR stopped"
}

cmd_status() {
    local name pid rc=0
    for name in "${DAEMONS[@]}"; do
        if pid=$(daemon_pid "$name"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: not running"
            rc=1
        fi
    done
    if [[ $rc -eq 0 ]]; then
        print_env
        timeout 10 sinfo || rc=1
        timeout 10 squeue -t all || rc=1
    fi
    return $rc
}

case "$ACTION" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) print_env ;;
*) usage ;;
esac
