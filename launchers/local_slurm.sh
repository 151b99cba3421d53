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
# /etc/slurm/slurm.conf, so both are provided: the copy in /etc/slurm makes a plain `sbatch` (or a
# submitit process without SLURM_CONF) work in any shell, while `eval "$(... env)"` is the explicit way
# and what tests should use. Inside jobs slurmd sets SLURM_CONF itself, so srun finds the config.
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
#   SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1  0.1-1 s per job, not ~3 s.
#   AuthInfo=cred_expire=10                                     a requeued job restarts in ~10 s, not 120 s.
#   FirstJobId from epoch seconds (mod 64e6, below MaxJobId)    ids don't repeat when the state folder
#                                                               is wiped (submitit folders are keyed by
#                                                               job id); with kept state the id sequence
#                                                               is recovered and keeps increasing.
#   NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001/17002  two slurmd on one host (`slurmd -N`).
#   `sbatch --export=NONE` leaves SLURM_EXPORT_ENV=NONE in the job, so a plain `srun cmd` inside it
#   starts tasks with an empty environment (no PATH: "execve(): cmd: No such file or directory"); use
#   `srun --export=ALL` there (or unset SLURM_EXPORT_ENV), or don't use --export=NONE.
# Script behaviour worth knowing: daemons get stdin /dev/null, output to log/, and not the lock fd (a
# caller capturing `start`'s output does not hang; munged once kept the flock and deadlocked `stop`);
# /usr/sbin is added to PATH (CI shells may lack it); `start` after a crash (kill -9, reboot) cancels
# the jobs slurmctld recovers once the nodes are back, so nothing reruns unexpectedly; `stop` cancels
# jobs first so no slurmstepd/job process outlives the cluster; start/stop serialise on $DIR/.lock.
#
# Environment knobs: MEBT_SLURM_DIR (state folder), MEBT_SLURM_PORT_BASE (default 17000: slurmctld on
# it, n1/n2 on +1/+2), MEBT_SLURM_NODE_CPUS (default 2), MEBT_SLURM_NODE_MEM_MB (default min(8000,
# 40% of RAM)), MEBT_SLURM_ETC=0 (don't write /etc/slurm/slurm.conf), MEBT_SLURM_KEEP_JOBS=1 (stop keeps
# jobs; start keeps jobs recovered from a cluster that died).
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
DIR="${MEBT_SLURM_DIR:-/tmp/mebt-slurm}"
CONF="$DIR/etc/slurm.conf"
export SLURM_CONF="$CONF"   # for the client commands this script runs (sinfo, squeue, scontrol, scancel)
ETC_CONF=/etc/slurm/slurm.conf
PORT_BASE="${MEBT_SLURM_PORT_BASE:-17000}"
NODES=(n1 n2)
MARK="# managed by mebt launchers/local_slurm.sh"
WAIT_S=60

say() { echo "local_slurm: $*" >&2; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

# Last lines of a log, indented, for error messages (without the harmless PMIx plugin noise).
tail_log() {
    [[ -f $1 ]] || return 0
    { echo "--- last lines of $1:"; grep -v -e 'pmix' -e 'MPI: Cannot create context' "$1" | tail -n 12 | sed 's/^/    /'; } >&2 || true
}

# running PID: the process exists and is not a zombie (this host's init reaps orphans lazily, so a
# killed daemon can linger as a zombie that still has a /proc entry and its comm).
running() {
    local st
    st=$(sed -n 's/^.*) \(.\).*$/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# pid_of PIDFILE COMM: prints the pid if the file names a running process whose comm is COMM.
pid_of() {
    local f=$1 comm=$2 pid
    [[ -s $f ]] || return 1
    pid=$(head -n1 "$f" 2>/dev/null | tr -dc 0-9)
    [[ -n $pid ]] && running "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    echo "$pid"
}
ctld_pidfile() { echo "$DIR/run/slurmctld.pid"; }
slurmd_pidfile() { echo "$DIR/run/slurmd-$1.pid"; }
munged_pidfile() { local f; f=$(head -n1 "$DIR/run/munged.ours" 2>/dev/null) || true; echo "${f:-$DIR/munge/munged.pid}"; }
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
    # munged (as user munge) writes its pid file and log under $DIR/munge; where the munge user cannot
    # use that folder (or munged rejects its permissions) it falls back to its defaults in /run/munge and
    # /var/log/munge. run/munged.ours records the pid file: stop kills munged only when it exists.
    local pidf="$DIR/munge/munged.pid" log="$DIR/munge/munged.log" i
    rm -f "$DIR/run/munged.ours"
    install -d -o munge -g munge -m 0755 "$DIR/munge"
    if ! runuser -u munge -- /usr/sbin/munged --pid-file="$pidf" --log-file="$log" \
            </dev/null >>"$DIR/log/munged.stderr" 2>&1 9>&-; then
        say "munged refused $DIR/munge (see $DIR/log/munged.stderr); using its default paths"
        pidf=/run/munge/munged.pid log=/var/log/munge/munged.log
        runuser -u munge -- /usr/sbin/munged </dev/null >>"$DIR/log/munged.stderr" 2>&1 9>&- \
            || { tail_log "$DIR/log/munged.stderr"; die "munged failed to start (see $DIR/log/munged.stderr)"; }
    fi
    for ((i = 0; i < 50; i++)); do munge_ok && break; sleep 0.1; done
    munge_ok || { tail_log "$log"; die "munged started but munge -n | unmunge fails (see $log)"; }
    echo "$pidf" >"$DIR/run/munged.ours"
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

started_count() { local c; c=$(grep -c 'slurmd started on' "$DIR/log/slurmd-$1.log" 2>/dev/null) || true; echo "${c:-0}"; }

start_slurmd() {
    local n=$1
    say "starting slurmd -N $n"
    mkdir -p "$DIR/spool/$n"
    slurmd -f "$CONF" -N "$n" </dev/null 9>&- >>"$DIR/log/slurmd-$n.stderr" 2>&1 \
        || { tail_log "$DIR/log/slurmd-$n.stderr"; tail_log "$DIR/log/slurmd-$n.log"; die "slurmd -N $n failed to start (see $DIR/log/slurmd-$n.log)"; }
}

# Jobs in a live state (finished jobs stay listed as CD/CA/F for MinJobAge and are ignored).
live_job_ids() { timeout 15 squeue -h -t PD,R,CG,S,CF,RQ,RS,SE,SO,RD,RF,RH,ST -o '%i' 2>/dev/null | sort -u || true; }

# cancel_ids ID...: scancel, then wait (<= 15 s) until none of them is in a live state.
cancel_ids() {
    local i left
    timeout 15 scancel "$@" 2>/dev/null || true
    for ((i = 0; i < 75; i++)); do
        left=$(live_job_ids | grep -Fx -f <(printf '%s\n' "$@") || true)
        [[ -z $left ]] && return 0
        sleep 0.2
    done
    say "warning: jobs still completing after 15 s: ${left//$'\n'/ }"
}

cancel_all_jobs() {
    local ids
    mapfile -t ids < <(live_job_ids)
    ((${#ids[@]})) || return 0
    say "cancelling jobs: ${ids[*]}"
    cancel_ids "${ids[@]}"
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

    # A cluster that died (reboot, kill -9) leaves jobs in the saved state. They are cancelled once the
    # nodes are back (not before: a job cancelled while its node is down is forgotten by slurmctld, and
    # a job step still running under a surviving slurmstepd would go on as an orphan).
    local stale=()
    if ! ctld_pid >/dev/null; then
        start_ctld
        if ((!any_alive)) && [[ ${MEBT_SLURM_KEEP_JOBS:-0} != 1 ]]; then mapfile -t stale < <(live_job_ids); fi
    fi
    # Nodes whose slurmd we start now must log "slurmd started on" (listening, registering) before the
    # cluster counts as up: slurmctld reports a node idle from its saved state before that.
    local -A started_before=()
    for n in "${NODES[@]}"; do
        slurmd_pid "$n" >/dev/null && continue
        started_before[$n]=$(started_count "$n")
        start_slurmd "$n"
    done

    local i resumed=0 registered
    for ((i = 0; i < WAIT_S * 4; i++)); do
        registered=1
        for n in "${!started_before[@]}"; do
            (($(started_count "$n") > started_before[$n])) || registered=0
        done
        ((registered)) && nodes_ok && break
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
    if ! ((registered)) || ! nodes_ok; then
        echo "sinfo: $(node_states | tr '\n' ';')" >&2
        tail_log "$DIR/log/slurmctld.log"
        for n in "${NODES[@]}"; do tail_log "$DIR/log/slurmd-$n.log"; done
        die "nodes not idle after ${WAIT_S} s (see $DIR/log/slurmctld.log and $DIR/log/slurmd-n*.log)"
    fi
    if ((${#stale[@]})); then
        say "cancelling jobs left over from a previous run: ${stale[*]}"
        cancel_ids "${stale[@]}"
    fi
    say "up in $((SECONDS - t0)) s"
    summary
}

summary() {
    echo "local slurm up: nodes $(node_states | tr '\n' ',' | sed 's/,$//'), partition debug, SLURM_CONF=$CONF, logs $DIR/log"
}

# stop_pids "PIDFILE COMM NAME"...: SIGTERM to all, wait up to 10 s, SIGKILL the rest, remove pid files.
stop_pids() {
    local spec f comm name pid i alive pids=()
    for spec in "$@"; do
        read -r f comm name <<<"$spec"
        if pid=$(pid_of "$f" "$comm"); then
            say "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for ((i = 0; i < 75; i++)); do
        alive=()
        for pid in "${pids[@]}"; do running "$pid" && alive+=("$pid"); done
        ((${#alive[@]} == 0)) && break
        if ((i == 50)); then
            say "still running after 10 s, SIGKILL: ${alive[*]}"
            kill -KILL "${alive[@]}" 2>/dev/null || true
        fi
        sleep 0.2
    done
    for spec in "$@"; do read -r f _ <<<"$spec"; rm -f "$f"; done
}

cmd_stop() {
    [[ -d $DIR ]] || { say "nothing to stop ($DIR does not exist)"; return 0; }
    with_lock
    if [[ ${MEBT_SLURM_KEEP_JOBS:-0} != 1 ]] && ctld_pid >/dev/null && command -v squeue >/dev/null 2>&1; then
        cancel_all_jobs
    fi
    # All at once: each daemon takes ~2 s to exit after SIGTERM, and none needs another to shut down.
    local specs=("$(slurmd_pidfile n1) slurmd slurmd-n1" "$(slurmd_pidfile n2) slurmd slurmd-n2"
                 "$(ctld_pidfile) slurmctld slurmctld")
    [[ -f $DIR/run/munged.ours ]] && specs+=("$(munged_pidfile) munged munged")
    stop_pids "${specs[@]}"
    rm -f "$DIR/run/munged.ours"
    say "stopped"
}

cmd_status() {
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
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 start|stop|status|env   (state folder: \${MEBT_SLURM_DIR:-/tmp/mebt-slurm})" >&2; exit 2 ;;
esac
