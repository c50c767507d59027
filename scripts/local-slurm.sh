#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying the cluster profile (profiles/slurm) and for its test:
# munged, slurmdbd (job accounting, so `sacct` works, kept in a MariaDB of its own), slurmctld and slurmd from
# Debian's packages (installed with apt if absent; needs root), a minimal slurm.conf, all state under
# $LOCAL_SLURM_DIR (default /tmp/local-slurm). Idempotent: start starts what is not running.
#
#   scripts/local-slurm.sh start | status | stop | install (the packages only)
#
# The config is linked at /etc/slurm/slurm.conf, where every SLURM command looks (the slurm executor's job
# step drops SLURM_CONF from the environment of the srun it runs inside each job), so start refuses to replace
# a slurm.conf it did not write. Ports: SLURM's defaults (6817-6819) and 127.0.0.1:6820 for MariaDB.
# No cgroups: containers seldom let slurmd manage them (SLURM 22.05's cgroup/v2 also wants systemd), so processes
# are tracked through /proc and memory is enforced by polling (jobacct_gather/linux with OverMemoryKill): a job
# whose resident memory exceeds its --mem is killed within a few seconds and ends FAILED (OUT_OF_MEMORY needs
# cgroups).
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/local-slurm}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
DB_SOCKET=$DIR/db/mariadb.sock
DB_PORT=6820
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
SYSTEM_CONF=/etc/slurm/slurm.conf
export SLURM_CONF=$CONF  # the daemons, and slurmdbd finds slurmdbd.conf beside it

log() { echo "local-slurm: $*" >&2; }

install_packages() {
  local tool
  for tool in slurmctld slurmd slurmdbd sbatch munged mariadbd; do command -v "$tool" >/dev/null || break; done
  command -v "$tool" >/dev/null && return
  [ "$(id -u)" -eq 0 ] || { log "$tool is missing: apt-get install ${PACKAGES[*]} (as root)"; exit 1; }
  log "installing ${PACKAGES[*]} with apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null; }
}

pid_of() { cat "$DIR/$1.pid" 2>/dev/null; }
# The daemon NAME of this cluster is running: its pid file names a live process of that name (not a reused pid).
running() { local pid; pid=$(pid_of "$1") && [ "$(ps -o comm= -p "$pid")" = "$1" ]; }

wait_for() {  # wait_for WHAT COMMAND...: up to 30 s for COMMAND to succeed
  local what=$1; shift
  for _ in $(seq 60); do "$@" >/dev/null 2>&1 && return; sleep 0.5; done
  log "$what did not come up; logs in $DIR/log"; exit 1
}

write_configs() {
  mkdir -p "$DIR"/{munge,db,spool/ctld,spool/d,log}
  chmod 755 "$DIR" "$DIR/munge"  # munged wants its socket's folder reachable by all, writable by it alone
  [ -f "$DIR/munge/munge.key" ] || (umask 077; dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
  [ -f "$DIR/db.password" ] || (umask 077; od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$DIR/db.password")
  local host
  host=$(hostname -s)
  # Written only once: a config changed under running daemons would disagree with them.
  [ -f "$CONF" ] || cat > "$CONF" <<CONF
# Written by scripts/local-slurm.sh: one node, one partition, for local testing.
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# Cores and memory are consumable: --cpus-per-task and --mem are allocated, and --mem is enforced.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$host
# For slurmdbd connections this names the munge socket (AuthInfo's is not used for them).
AccountingStoragePass=$MUNGE_SOCKET
# Keep sbatch --comment (the slurm executor puts the rule and wildcards there), so sacct shows which job is which.
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
ReturnToService=2
# slurmd -C reports this node's real CPUs and memory (a node configured with more than it has is drained).
$(slurmd -C | head -1) State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  # slurmdbd reads slurmdbd.conf beside SLURM_CONF and refuses one others can read (it holds the password).
  [ -f "$DIR/slurmdbd.conf" ] || (umask 077; cat > "$DIR/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$host
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$DIR/db.password")
StorageLoc=slurm_acct_db
CONF
)
}

start_database() {
  [ -d "$DIR/db/data/mysql" ] \
    || mariadb-install-db --no-defaults --datadir="$DIR/db/data" --user=root >"$DIR/log/mariadb-install.log" 2>&1
  if ! running mariadbd; then  # mariadbd does not daemonize itself
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/db/data" --socket="$DB_SOCKET" --bind-address=127.0.0.1 \
      --port=$DB_PORT --pid-file="$DIR/mariadbd.pid" --log-error="$DIR/log/mariadb.log" </dev/null >/dev/null 2>&1 &
  fi
  wait_for MariaDB mariadb --no-defaults --socket="$DB_SOCKET" -e "SELECT 1"
  mariadb --no-defaults --socket="$DB_SOCKET" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/db.password")';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

link_config() {
  if [ -e "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" != "$CONF" ]; then
    log "$SYSTEM_CONF exists and is not this cluster's: not replacing it"; exit 1
  fi
  mkdir -p "$(dirname "$SYSTEM_CONF")"
  ln -sfn "$CONF" "$SYSTEM_CONF"
}

start() {
  install_packages
  write_configs
  link_config
  running munged || munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
  start_database
  running slurmdbd || slurmdbd
  wait_for slurmdbd sacctmgr -n list cluster
  # The cluster must be known to the accounting database before slurmctld registers with it.
  sacctmgr -n list cluster format=cluster | grep -qw local || sacctmgr -i add cluster local >/dev/null
  running slurmctld || slurmctld
  running slurmd || slurmd
  wait_for "the node" bash -c "sinfo -h -o %T | grep -qx -e idle -e mixed -e allocated"
  log "running: partition $(sinfo -h -o '%P, %D node, %c CPUs, %m MB' | head -1); state in $DIR"
}

stop() {
  local name pid
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    running "$name" || continue
    pid=$(pid_of "$name")
    kill "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    log "stopped $name"
  done
  [ "$(readlink "$SYSTEM_CONF")" != "$CONF" ] || rm "$SYSTEM_CONF"
}

status() {
  local name down=0
  for name in munged mariadbd slurmdbd slurmctld slurmd; do
    if running "$name"; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: stopped"; down=1; fi
  done
  [ "$down" -eq 0 ] && sinfo
  return "$down"
}

case "${1:-}" in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status|install" >&2; exit 2 ;;
esac
