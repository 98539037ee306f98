#!/usr/bin/env bash
# A real single-node SLURM cluster (with accounting) on this machine, for trying and testing
# qtl's SLURM launcher preset.  Debian/Ubuntu, run as root, no systemd needed.
#
#   scripts/slurm-local.sh up       # install missing packages, start munged, MariaDB,
#                                   # slurmdbd, slurmctld, slurmd; wait until the node is idle
#   scripts/slurm-local.sh status   # daemons (by recorded PID) and sinfo; exit 0 when all run
#   scripts/slurm-local.sh down     # cancel jobs, stop the daemons by their recorded PIDs
#
# Environment (all optional):
#   QTL_SLURM_DIR   state, spool, logs, database and PID files   (default /tmp/qtl-slurm)
#   QTL_SLURM_GPUS  fake GPUs on the node (GRES on character devices; 0 = none)   (default 4)
#   QTL_SLURM_PARTITION  name of the one partition                (default local)
#
# The accounting database's password is generated at the first `up` (random, from
# /dev/urandom), kept in $QTL_SLURM_DIR/slurmdbd.pass and /etc/slurm/slurmdbd.conf (both
# 0600, root), and set on the database user at every `up`; none ships with the repository.
#
# Why accounting: without slurmdbd, sacct fails and submitit cannot tell that a job died
# (cancelled, timed out) - it would wait forever.  Why DefMemPerCPU: otherwise every job
# takes the node's whole memory and jobs run one at a time.  Config files go to /etc/slurm
# (where sbatch/squeue look); a slurm.conf not written by this script is never overwritten.
set -euo pipefail

STATE=${QTL_SLURM_DIR:-/tmp/qtl-slurm}
GPUS=${QTL_SLURM_GPUS:-4}
PARTITION=${QTL_SLURM_PARTITION:-local}
CLUSTER=qtl
ETC=/etc/slurm
MARK="# written by qtl scripts/slurm-local.sh"
SOCK=/run/mysqld/mysqld.sock
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stopped in reverse

say() { echo "[slurm-local] $*"; }
die() { echo "[slurm-local] error: $*" >&2; exit 1; }

pid_of() { cat "$STATE/pids/$1" 2>/dev/null || true; }
alive() { local p; p=$(pid_of "$1"); [[ -n $p ]] && kill -0 "$p" 2>/dev/null; }

wait_for() {  # wait_for <seconds> <what> <command...>: poll until the command succeeds
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "$what did not come up within ${limit}s (logs: $STATE/log/)"
}

db_password() {  # the database password: generated once per state folder, never printed
  local file=$STATE/slurmdbd.pass
  if [[ ! -s $file ]]; then
    # 24 random bytes as hex: no quoting issues in SQL or slurmdbd.conf
    (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$file.tmp") \
      && mv "$file.tmp" "$file" || die "cannot write $file"
    DB_PASS_NEW=1
  fi
  chmod 600 "$file"
  DB_PASS=$(cat "$file")
  [[ $DB_PASS =~ ^[0-9a-f]{48}$ ]] || die "$file does not hold a generated password; delete it"
}

stop_daemon() {  # stop_daemon <daemon>: TERM by recorded PID, KILL after 30 s
  local d=$1 p
  p=$(pid_of "$d")
  if [[ -n $p ]] && kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p"
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$p" 2>/dev/null && { say "$d ($p) still running, sending KILL"; kill -KILL "$p"; }
    say "stopped $d ($p)"
  fi
  rm -f "$STATE/pids/$d"
}

record_pidfile() {  # record_pidfile <daemon> <pidfile>: daemons that fork write their own
  wait_for 20 "$1 (pid file $2)" test -s "$2"
  cp "$2" "$STATE/pids/$1"
  alive "$1" || die "$1 exited right after start (logs: $STATE/log/)"
}

install_packages() {
  local missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get here"
  say "installing ${missing[*]}"
  # Keep package scripts from starting services themselves: we start (and track) every daemon.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >"$STATE/log/apt.log" 2>&1 || {
    apt-get update -q >>"$STATE/log/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$STATE/log/apt.log" 2>&1
  } || { [[ $own_policy == 1 ]] && rm -f "$policy"; die "apt-get failed: $STATE/log/apt.log"; }
  [[ $own_policy == 1 ]] && rm -f "$policy"
  return 0
}

write_configs() {
  local host node_line gres_line=""
  host=$(hostname -s)
  if [[ -f $ETC/slurm.conf ]] && ! grep -qF "$MARK" "$ETC/slurm.conf"; then
    die "$ETC/slurm.conf exists and was not written by this script; not touching it"
  fi
  mkdir -p "$ETC"
  # Node hardware as slurmd sees it, minus the volatile UpTime; a little memory left for the OS.
  node_line=$(slurmd -C | head -1 | sed -E 's/ UpTime=[^ ]*//')
  local mem; mem=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$node_line")
  node_line=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$((mem * 9 / 10))/" <<<"$node_line")
  if [[ $GPUS -gt 0 ]]; then
    mkdir -p "$STATE/dev"
    for i in $(seq 0 $((GPUS - 1))); do
      [[ -c $STATE/dev/gpu$i ]] || mknod "$STATE/dev/gpu$i" c 1 3  # GRES needs char devices
    done
    gres_line=" Gres=gpu:fake:$GPUS"
    cat >"$ETC/gres.conf" <<EOF
$MARK
AutoDetect=off
NodeName=$host Name=gpu Type=fake File=$STATE/dev/gpu[0-$((GPUS - 1))]
EOF
  else
    rm -f "$ETC/gres.conf"
  fi
  cat >"$ETC/slurm.conf" <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (SLURM's default: 120)
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# no cgroups in containers: track processes by parent id, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerParameters=batch_sched_delay=0,sched_interval=2
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageTRES=gres/gpu
GresTypes=gpu
$node_line NodeAddr=127.0.0.1$gres_line State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  (umask 077; cat >"$ETC/slurmdbd.conf") <<EOF
$MARK
AuthType=auth/munge
DbdHost=$host
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"
}

start_munge() {
  alive munged && return 0
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  record_pidfile munged /run/munge/munged.pid
}

start_mariadb() {
  alive mariadbd && return 0
  local data=$STATE/mysql
  mkdir -p /run/mysqld
  if [[ ! -d $data/mysql ]]; then
    mariadb-install-db --user=root --datadir="$data" --skip-test-db \
      >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
  fi
  nohup mariadbd --user=root --datadir="$data" --socket=$SOCK --skip-networking \
    --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mariadb.log" \
    >/dev/null 2>&1 &
  echo $! >"$STATE/pids/mariadbd"
  wait_for 30 MariaDB mariadb --socket=$SOCK -u root -e "select 1"
}

db_user() {  # the accounting user with this state folder's password (over stdin, not argv)
  mariadb --socket=$SOCK -u root <<EOF || die "could not set up the database user (logs: $STATE/log/)"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurm() {
  # a slurmdbd still running with an earlier password would lose the database on reconnect
  [[ ${DB_PASS_NEW:-0} == 1 ]] && alive slurmdbd && stop_daemon slurmdbd
  if ! alive slurmdbd; then
    rm -f "$STATE/run/slurmdbd.pid"
    slurmdbd
    record_pidfile slurmdbd "$STATE/run/slurmdbd.pid"
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i -Q add account qtl Cluster="$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i -Q add user root Account=qtl Cluster="$CLUSTER" >/dev/null 2>&1 || true
  fi
  if ! alive slurmctld; then
    rm -f "$STATE/run/slurmctld.pid"
    slurmctld
    record_pidfile slurmctld "$STATE/run/slurmctld.pid"
  fi
  if ! alive slurmd; then
    rm -f "$STATE/run/slurmd.pid"
    slurmd
    record_pidfile slurmd "$STATE/run/slurmd.pid"
  fi
  wait_for 60 "node $(hostname -s) (idle)" bash -c "sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)'"
}

cmd_up() {
  [[ $(id -u) == 0 ]] || die "needs root (installs packages, starts daemons)"
  mkdir -p "$STATE"/{pids,run,log,ctld,spool}
  install_packages
  db_password
  write_configs
  start_munge
  start_mariadb
  db_user
  start_slurm
  say "up: $(sinfo -h -o '%P %D node(s) %c cpus %m MB %G %T' | head -1)"
}

cmd_down() {
  if alive slurmctld; then
    scancel --full --quiet -u "$(id -un)" >/dev/null 2>&1 || true
    for _ in $(seq 50); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.2; done
  fi
  local i
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop_daemon "${DAEMONS[$i]}"
  done
}

cmd_status() {
  local ok=0 d
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then echo "$d: running (pid $(pid_of "$d"))"; else echo "$d: stopped"; ok=3; fi
  done
  [[ $ok == 0 ]] && sinfo
  return $ok
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 64 ;;
esac
