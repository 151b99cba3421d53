#!/usr/bin/env bash
# launchers/local_slurm.sh -- a real SLURM cluster of two emulated nodes (n1, n2) on this one machine,
# for the project's tests and CI (sbatch / srun / submitit against real slurmctld + slurmd daemons).
#
# Usage:
#   launchers/local_slurm.sh start    install slurm-wlm + munge if missing (apt, Debian 12), write the
#                                     config, start munged, slurmctld, slurmd -N n1, slurmd -N n2, wait
#                                     (<= 60 s) until both nodes are idle; restarts only dead daemons;
#                                     does nothing but report when the cluster is already healthy.
#   launchers/local_slurm.sh stop     cancel all jobs (unless MEBT_SLURM_KEEP_JOBS=1), stop the daemons
#                                     this script started (SIGTERM, SIGKILL after 10 s); no-op if none.
#   launchers/local_slurm.sh status   each daemon + `sinfo`; exit 0 only if both nodes are usable.
#   launchers/local_slurm.sh env      prints `export SLURM_CONF=...`:  eval "$(launchers/local_slurm.sh env)"
#
# Where things live: everything the cluster writes is under ${MEBT_SLURM_DIR:-/tmp/mebt-slurm}:
#   etc/slurm.conf  state/ (slurmctld StateSaveLocation)  spool/n1 spool/n2  log/*.log  run/*.pid
#   munge/ (munged pid + log, owned by the munge user; only when this script starts munged).
# Outside it: /etc/hosts gets one line "127.0.0.1 n1 n2" (added once), and /etc/slurm/slurm.conf
# gets a copy of the config (only when absent or written by this script before; MEBT_SLURM_ETC=0 skips).
#
# How clients find the config: the daemons are given the path explicitly (-f). Client commands
# (sbatch, srun, squeue, sinfo, scontrol, submitit) honour $SLURM_CONF first and fall back to
# /etc/slurm/slurm.conf, so both are provided: the copy in /etc/slurm makes a plain `sbatch` work in any
# shell (and `srun` inside jobs submitted with --export=NONE), while `eval "$(... env)"` is the explicit
# way and what tests should use. sbatch exports the caller's environment (SLURM_CONF included) by default.
#
# Settings that matter on this host (slurm 22.05 from Debian 12, measured):
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none   cgroup plugins are fatal on the host's
#                                                               hybrid cgroup v1/v2 layout.
#   SelectType=select/cons_tres + CR_Core_Memory, DefMemPerCPU  --mem works; jobs that ask no memory
#                                                               get a per-CPU share, not the whole node.
#   SlurmdParameters=config_overrides                           nodes keep CPUs=2 even on a smaller host
#                                                               instead of being drained.
#   ReturnToService=2                                           a node whose slurmd restarts comes back.
#   SlurmUser=root, AccountingStorageType=accounting_storage/none  no slurmdbd: `sacct` fails and submitit
#                                                               reports state UNKNOWN but returns results.
#   SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1  ~1 s per job, not ~3 s.
#   AuthInfo=cred_expire=10                                     a requeued job restarts in ~10 s, not 120 s.
#   FirstJobId from epoch seconds (mod 64e6, below MaxJobId)    ids don't repeat when the state folder
#                                                               is wiped (submitit folders are keyed by
#                                                               job id); with kept state the id sequence
#                                                               is recovered and keeps increasing.
#   NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001/17002  two slurmd on one host (`slurmd -N`).
#   Do not submit with `sbatch --export=NONE` unless /etc/slurm/slurm.conf is present: srun inside the
#   job then cannot find the config.
#
# Environment knobs: MEBT_SLURM_DIR (state folder), MEBT_SLURM_PORT_BASE (default 17000: slurmctld on
# it, n1/n2 on +1/+2), MEBT_SLURM_NODE_CPUS (default 2), MEBT_SLURM_NODE_MEM_MB (default min(8000,
# 40% of RAM)), MEBT_SLURM_ETC=0 (don't write /etc/slurm/slurm.conf), MEBT_SLURM_KEEP_JOBS=1 (stop keeps
# jobs; start keeps jobs recovered from a cluster that died).
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
DIR="${MEBT_SLURM_DIR:-/tmp/mebt-slurm}"
CONF="$DIR/etc/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
PORT_BASE="${MEBT_SLURM_PORT_BASE:-17000}"
NODES=(n1 n2)
MARK="# managed by mebt launchers/local_slurm.sh"
WAIT_S=60

say() { echo "local_slurm: $*" >&2; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

# Last lines of a log, indented, for error messages.
tail_log() { [[ -f $1 ]] && { echo "--- last lines of $1:"; tail -n 15 "$1" | sed 's/^/    /'; } >&2 || true; }

# pid_of PIDFILE COMM: prints the pid if the file names a live process whose comm is COMM.
pid_of() {
    local f=$1 comm=$2 pid
    [[ -s $f ]] || return 1
    pid=$(head -n1 "$f" 2>/dev/null | tr -dc 0-9)
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    echo "$pid"
}
ctld_pidfile() { echo "$DIR/run/slurmctld.pid"; }
slurmd_pidfile() { echo "$DIR/run/slurmd-$1.pid"; }
munged_pidfile() { echo "$DIR/munge/munged.pid"; }
ctld_pid() { pid_of "$(ctld_pidfile)" slurmctld; }
slurmd_pid() { pid_of "$(slurmd_pidfile "$1")" slurmd; }

with_lock() { mkdir -p "$DIR"; exec 9>"$DIR/.lock"; flock -w 180 9 || die "another local_slurm.sh holds $DIR/.lock"; }

# ---------------------------------------------------------------------------------------------- install
ensure_installed() {
    local c missing=0
    for c in slurmctld slurmd sbatch srun sinfo scontrol munged munge; do
        command -v "$c" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    say "installing slurm-wlm and munge (apt) ..."
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=300
               install --no-install-recommends slurm-wlm munge)
    if ! "${apt[@]}" >"$DIR/log/apt.log" 2>&1; then
        apt-get -q -o DPkg::Lock::Timeout=300 update >>"$DIR/log/apt.log" 2>&1 || true
        "${apt[@]}" >>"$DIR/log/apt.log" 2>&1 || { tail_log "$DIR/log/apt.log"; die "apt-get install slurm-wlm munge failed (see $DIR/log/apt.log)"; }
    fi
    for c in slurmctld slurmd sbatch munged; do
        command -v "$c" >/dev/null 2>&1 || die "$c still missing after installing slurm-wlm munge"
    done
}

# ---------------------------------------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_ok && return 0
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
        chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0755 "$DIR/munge"
    local log="$DIR/munge/munged.log"
    rm -f "$DIR/run/munged.ours"
    runuser -u munge -- /usr/sbin/munged --pid-file="$(munged_pidfile)" --log-file="$log" 9>&- \
        </dev/null >>"$DIR/log/munged.stderr" 2>&1 \
        || { tail_log "$DIR/log/munged.stderr"; tail_log "$log"; die "munged failed to start (see $log)"; }
    local i
    for ((i = 0; i < 50; i++)); do munge_ok && break; sleep 0.1; done
    munge_ok || { tail_log "$log"; die "munged started but munge -n | unmunge fails (see $log)"; }
    touch "$DIR/run/munged.ours"   # stop kills munged only when this marker exists
}

# ---------------------------------------------------------------------------------------------- config
node_mem_mb() {
    if [[ -n ${MEBT_SLURM_NODE_MEM_MB:-} ]]; then echo "$MEBT_SLURM_NODE_MEM_MB"; return; fi
    local total_mb
    total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    local share=$((total_mb * 40 / 100))
    ((share > 8000)) && share=8000
    ((share < 256)) && share=256
    echo "$share"
}

write_conf() {
    local cpus=${MEBT_SLURM_NODE_CPUS:-2} mem host first_id
    mem=$(node_mem_mb)
    host=$(hostname -s 2>/dev/null || hostname)
    # Job ids are 26-bit (MaxJobId <= 67108863): epoch seconds modulo 64e6 (wraps every ~740 days).
    first_id=$(($(date +%s) % 64000000 + 1000))
    cat >"$CONF.tmp" <<EOF
$MARK (state folder $DIR)
ClusterName=mebt
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${PORT_BASE}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
FirstJobId=${first_id}
MaxJobId=67108863
KillWait=10
InactiveLimit=0
Waittime=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT_BASE + 1)) CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT_BASE + 2)) CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$((mem / cpus))
EOF
    mv -f "$CONF.tmp" "$CONF"
    if [[ ${MEBT_SLURM_ETC:-1} != 0 ]]; then
        if [[ ! -e $ETC_CONF ]] || grep -qF "$MARK" "$ETC_CONF" 2>/dev/null; then
            mkdir -p /etc/slurm
            cp -f "$CONF" "$ETC_CONF.mebt-tmp" && mv -f "$ETC_CONF.mebt-tmp" "$ETC_CONF"
        else
            say "note: $ETC_CONF exists and is not ours; left alone (use: eval \"\$($0 env)\")"
        fi
    fi
}

ensure_hosts() {
    local n missing=()
    for n in "${NODES[@]}"; do
        [[ $(getent ahostsv4 "$n" 2>/dev/null | awk 'NR == 1 {print $1}') == 127.0.0.1 ]] || missing+=("$n")
    done
    ((${#missing[@]} == 0)) && return 0
    # Append in place (/etc/hosts may be a bind mount: no sed -i / rename).
    printf '127.0.0.1 %s  %s\n' "${missing[*]}" "$MARK" >>/etc/hosts
    for n in "${missing[@]}"; do
        [[ $(getent ahostsv4 "$n" | awk 'NR == 1 {print $1}') == 127.0.0.1 ]] \
            || say "warning: $n does not resolve to 127.0.0.1 even after editing /etc/hosts"
    done
}

# ---------------------------------------------------------------------------------------------- daemons
# node_states: "n1 idle" lines from sinfo (empty when slurmctld does not answer).
node_states() { timeout 15 sinfo -h -N -p debug -o '%N %T' 2>/dev/null | sort -u || true; }
# Both nodes usable: no "*" (not responding), no down/drain/fail/unknown.
nodes_ok() {
    local states n ok=0
    states=$(node_states)
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mixed|allocated|completing)$" <<<"$states" && ok=$((ok + 1))
    done
    ((ok == ${#NODES[@]}))
}
daemons_up() {
    local n
    ctld_pid >/dev/null || return 1
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null || return 1; done
}
healthy() { daemons_up && munge_ok && nodes_ok; }

start_ctld() {
    say "starting slurmctld"
    slurmctld -f "$CONF" </dev/null 9>&- >>"$DIR/log/slurmctld.stderr" 2>&1 \
        || { tail_log "$DIR/log/slurmctld.stderr"; tail_log "$DIR/log/slurmctld.log"; die "slurmctld failed to start (see $DIR/log/slurmctld.log)"; }
    local i
    for ((i = 0; i < 100; i++)); do
        ctld_pid >/dev/null && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && return 0
        sleep 0.2
    done
    tail_log "$DIR/log/slurmctld.log"
    die "slurmctld did not come up within 20 s (see $DIR/log/slurmctld.log)"
}

start_slurmd() {
    local n=$1
    say "starting slurmd -N $n"
    mkdir -p "$DIR/spool/$n"
    slurmd -f "$CONF" -N "$n" </dev/null 9>&- >>"$DIR/log/slurmd-$n.stderr" 2>&1 \
        || { tail_log "$DIR/log/slurmd-$n.stderr"; tail_log "$DIR/log/slurmd-$n.log"; die "slurmd -N $n failed to start (see $DIR/log/slurmd-$n.log)"; }
}

all_job_ids() { timeout 15 squeue -h -o '%i' 2>/dev/null | sort -u || true; }

cancel_all_jobs() {
    local ids i
    ids=$(all_job_ids)
    [[ -n $ids ]] || return 0
    say "cancelling jobs: $(echo $ids)"
    # shellcheck disable=SC2086
    timeout 15 scancel $ids 2>/dev/null || true
    for ((i = 0; i < 75; i++)); do
        # Finished jobs may still be listed (state CD) for MinJobAge: wait only for live states.
        [[ -z $(timeout 15 squeue -h -t PD,R,CG,S,CF,RQ,RS,SE,SO -o '%i' 2>/dev/null || true) ]] && return 0
        sleep 0.2
    done
    say "warning: some jobs are still completing after 15 s"
}

cmd_start() {
    mkdir -p "$DIR"/{etc,state,run,log} "${NODES[@]/#/$DIR/spool/}"
    with_lock
    if [[ -f $CONF ]] && healthy; then
        say "already running"
        summary
        return 0
    fi
    local t0=$SECONDS
    ensure_installed
    ensure_hosts
    start_munge

    local any_alive=0 n
    ctld_pid >/dev/null && any_alive=1
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null && any_alive=1; done
    # Rewrite the config only when none of our slurm daemons run (they must all read the same file).
    if ((!any_alive)) || [[ ! -f $CONF ]]; then write_conf; fi
    export SLURM_CONF="$CONF"

    if ! ctld_pid >/dev/null; then
        start_ctld
        # A cluster that died (reboot, kill) leaves jobs in the saved state whose processes are gone:
        # cancel them before any node registers, so they are not requeued/relaunched unexpectedly.
        if ((!any_alive)) && [[ ${MEBT_SLURM_KEEP_JOBS:-0} != 1 ]]; then
            local stale
            stale=$(all_job_ids)
            if [[ -n $stale ]]; then
                say "cancelling jobs left over from a previous run: $(echo $stale)"
                # shellcheck disable=SC2086
                timeout 15 scancel $stale 2>/dev/null || true
            fi
        fi
    fi
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null || start_slurmd "$n"; done

    local i resumed=0
    for ((i = 0; i < WAIT_S * 4; i++)); do
        nodes_ok && break
        for n in "${NODES[@]}"; do
            slurmd_pid "$n" >/dev/null || { tail_log "$DIR/log/slurmd-$n.log"; die "slurmd -N $n exited (see $DIR/log/slurmd-$n.log)"; }
        done
        ctld_pid >/dev/null || { tail_log "$DIR/log/slurmctld.log"; die "slurmctld exited (see $DIR/log/slurmctld.log)"; }
        # A node left DOWN/DRAIN by an earlier run: resume it once its slurmd runs.
        if ((!resumed && i >= 12)) && node_states | grep -Eq ' (down|drain|drained|draining|fail)'; then
            for n in "${NODES[@]}"; do scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true; done
            resumed=1
        fi
        sleep 0.25
    done
    if ! nodes_ok; then
        echo "sinfo: $(node_states | tr '\n' ';')" >&2
        tail_log "$DIR/log/slurmctld.log"
        for n in "${NODES[@]}"; do tail_log "$DIR/log/slurmd-$n.log"; done
        die "nodes not idle after ${WAIT_S} s (see $DIR/log/slurmctld.log and $DIR/log/slurmd-n*.log)"
    fi
    say "up in $((SECONDS - t0)) s"
    summary
}

summary() {
    export SLURM_CONF="$CONF"
    echo "local slurm up: nodes $(node_states | tr '\n' ',' | sed 's/,$//'), partition debug, SLURM_CONF=$CONF, logs $DIR/log"
}

# stop_pid PIDFILE COMM NAME: SIGTERM, wait 10 s, SIGKILL, remove the pid file.
stop_pid() {
    local f=$1 comm=$2 name=$3 pid i
    if pid=$(pid_of "$f" "$comm"); then
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do [[ -d /proc/$pid ]] || break; sleep 0.2; done
        if [[ -d /proc/$pid ]]; then
            say "$name did not exit after 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 25; i++)); do [[ -d /proc/$pid ]] || break; sleep 0.2; done
        fi
    fi
    rm -f "$f"
}

cmd_stop() {
    [[ -d $DIR ]] || { say "nothing to stop ($DIR does not exist)"; return 0; }
    with_lock
    export SLURM_CONF="$CONF"
    if [[ ${MEBT_SLURM_KEEP_JOBS:-0} != 1 ]] && ctld_pid >/dev/null && command -v squeue >/dev/null 2>&1; then
        cancel_all_jobs
    fi
    local n
    for n in "${NODES[@]}"; do stop_pid "$(slurmd_pidfile "$n")" slurmd "slurmd -N $n"; done
    stop_pid "$(ctld_pidfile)" slurmctld slurmctld
    if [[ -f $DIR/run/munged.ours ]]; then
        stop_pid "$(munged_pidfile)" munged munged
        rm -f "$DIR/run/munged.ours"
    fi
    say "stopped"
}

cmd_status() {
    export SLURM_CONF="$CONF"
    local n pid rc=0
    if pid=$(ctld_pid); then echo "slurmctld: running (pid $pid)"; else echo "slurmctld: not running"; rc=1; fi
    for n in "${NODES[@]}"; do
        if pid=$(slurmd_pid "$n"); then echo "slurmd $n: running (pid $pid)"; else echo "slurmd $n: not running"; rc=1; fi
    done
    if command -v munge >/dev/null 2>&1 && munge_ok; then
        if [[ -f $DIR/run/munged.ours ]]; then echo "munged: running (started by this script)"
        else echo "munged: running (not started by this script)"; fi
    else
        echo "munged: not running"; rc=1
    fi
    echo "SLURM_CONF=$CONF"
    if ctld_pid >/dev/null; then
        timeout 15 sinfo -N -p debug 2>&1 || rc=1
        nodes_ok || rc=1
    fi
    if ((rc == 0)); then echo "cluster: up"; else echo "cluster: not up"; fi
    return $rc
}

cmd_env() {
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 start|stop|status|env   (state folder: \${MEBT_SLURM_DIR:-/tmp/mebt-slurm})" >&2; exit 2 ;;
esac
