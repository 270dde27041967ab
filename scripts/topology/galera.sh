#!/usr/bin/env bash
# A three-node MariaDB Galera cluster on 127.0.0.1, for dblock's topology
# tests (tests/galera.rs, the torture harness's `galera` target).
#
#   scripts/topology/galera.sh start       # fresh cluster, nodes 1-3 (idempotent)
#   scripts/topology/galera.sh stop        # stops every node, removes the data
#   scripts/topology/galera.sh status      # each node's wsrep state; 0 if all 3 are synced
#   scripts/topology/galera.sh kill N      # SIGKILL node N (1-3)
#   scripts/topology/galera.sh restart N   # (re)start node N as a joiner, wait until synced
#   scripts/topology/galera.sh urls        # the three SQL URLs, comma-separated
#
# Node N listens for SQL on 127.0.0.1:331N and for Galera on 46N0 (group
# communication), 46N1 (IST), 46N2 (rsync SST); its files are under
# $DBLOCK_GALERA_DIR/nodeN (default /var/tmp/dblock-galera). The machine's own
# MariaDB (3306) and its data directory are never touched. Runs as root
# (mariadbd then runs as user mysql, which owns the data); installs galera-4 and rsync when they are missing.
set -euo pipefail

DIR="${DBLOCK_GALERA_DIR:-/var/tmp/dblock-galera}"
DB="${DBLOCK_GALERA_DB:-test}"
PROVIDER=/usr/lib/galera/libgalera_smm.so
NODES=(1 2 3)
# mariadbd drops to this user; the rsync daemon of an SST then runs as it
# too (as root it would switch to "nobody" and fail to write).
RUN_AS="${DBLOCK_GALERA_USER:-mysql}"

sql_port() { echo $((3310 + $1)); }
gcomm_port() { echo $((4600 + 10 * $1)); }
node_dir() { echo "$DIR/node$1"; }
url() { echo "mysql://root@127.0.0.1:$(sql_port "$1")/$DB"; }

die() { printf 'galera.sh: %s\n' "$*" >&2; exit 1; }

# The node's log tail, for error messages.
log_tail() {
    local log; log="$(node_dir "$1")/error.log"
    [ -f "$log" ] && { echo "--- node $1: last lines of $log"; tail -n 25 "$log"; } >&2
    return 0
}

node_sql() { # N SQL...
    local n=$1; shift
    mariadb -h 127.0.0.1 -P "$(sql_port "$n")" -u root --connect-timeout=2 -N -B -e "$*"
}

wsrep() { # N VARIABLE: a wsrep status value, empty if the node does not answer
    node_sql "$1" "SHOW GLOBAL STATUS LIKE '$2'" 2>/dev/null | cut -f2
}

node_pid() { # N: the pid of the running node (recorded at launch, or by mariadbd)
    local f pid
    for f in "$(node_dir "$1")"/launch.pid "$(node_dir "$1")"/mariadbd.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; return 0; fi
    done
    return 1
}

synced() { # N: the node is in the primary component, ready and synced
    [ "$(wsrep "$1" wsrep_ready)" = ON ] &&
        [ "$(wsrep "$1" wsrep_local_state_comment)" = Synced ] &&
        [ "$(wsrep "$1" wsrep_cluster_status)" = Primary ]
}

ensure_packages() {
    local missing=()
    [ -f "$PROVIDER" ] || missing+=(galera-4)
    command -v rsync >/dev/null || missing+=(rsync)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "galera.sh: installing ${missing[*]}" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 ||
            die "could not install ${missing[*]} (apt-get install -y ${missing[*]})"
    fi
    [ -f "$PROVIDER" ] || die "no Galera provider at $PROVIDER after installing galera-4"
}

write_config() {
    local n=$1 d; d="$(node_dir "$n")"
    local addrs="" m
    for m in "${NODES[@]}"; do addrs+="${addrs:+,}127.0.0.1:$(gcomm_port "$m")"; done
    local g; g=$(gcomm_port "$n")
    mkdir -p "$d/data" "$d/tmp"
    cat >"$d/my.cnf" <<CNF
[mariadbd]
user = $RUN_AS
datadir = $d/data
tmpdir = $d/tmp
socket = $d/mariadbd.sock
pid-file = $d/mariadbd.pid
log-error = $d/error.log
port = $(sql_port "$n")
bind-address = 127.0.0.1
skip-name-resolve
binlog_format = ROW
default_storage_engine = InnoDB
innodb_autoinc_lock_mode = 2
innodb_buffer_pool_size = 64M
innodb_log_file_size = 32M
innodb_flush_log_at_trx_commit = 2
performance_schema = OFF
max_connections = 300
wsrep_on = ON
wsrep_provider = $PROVIDER
wsrep_cluster_name = dblock-galera-test
wsrep_cluster_address = gcomm://$addrs
wsrep_node_name = node$n
wsrep_node_address = 127.0.0.1:$g
wsrep_node_incoming_address = 127.0.0.1:$(sql_port "$n")
wsrep_sst_receive_address = 127.0.0.1:$((g + 2))
wsrep_sst_method = rsync
wsrep_slave_threads = 2
wsrep_provider_options = "gmcast.listen_addr=tcp://127.0.0.1:$g;ist.recv_addr=127.0.0.1:$((g + 1));gcache.size=64M;evs.suspect_timeout=PT3S;evs.inactive_timeout=PT6S;evs.install_timeout=PT6S;pc.wait_prim_timeout=PT10S"
CNF
}

launch() { # N [extra mariadbd args]
    local n=$1; shift
    local d; d="$(node_dir "$n")"
    : >"$d/error.log"
    setsid mariadbd --defaults-file="$d/my.cnf" "$@" </dev/null >>"$d/error.log" 2>&1 &
    echo $! >"$d/launch.pid"
}

wait_synced() { # N SECONDS
    local n=$1 i
    for ((i = 0; i < $2 * 5; i++)); do
        synced "$n" && return 0
        if [ $i -gt 10 ] && ! node_pid "$n" >/dev/null; then
            log_tail "$n"; die "node $n exited while starting (log above)"
        fi
        sleep 0.2
    done
    log_tail "$n"
    die "node $n did not become Synced within $2 s (port $(sql_port "$n"); log above)"
}

stop_node() {
    local n=$1 pid i
    pid=$(node_pid "$n") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}

all_synced() {
    local n
    for n in "${NODES[@]}"; do synced "$n" || return 1; done
    [ "$(wsrep 1 wsrep_cluster_size)" = 3 ]
}

# Removes $DIR, but only a directory this script made (it has the marker).
wipe() {
    [ -e "$DIR" ] || return 0
    [ -f "$DIR/.dblock-galera" ] || die "$DIR exists but was not made by galera.sh; not removing it"
    rm -rf "$DIR"
}

cmd_start() {
    if all_synced 2>/dev/null; then
        node_sql 1 "CREATE DATABASE IF NOT EXISTS \`$DB\`"
        return 0
    fi
    ensure_packages
    local n
    for n in "${NODES[@]}"; do stop_node "$n"; done
    wipe
    mkdir -p "$DIR"
    touch "$DIR/.dblock-galera"
    for n in "${NODES[@]}"; do write_config "$n"; done
    chown -R "$RUN_AS" "$DIR" || die "cannot give $DIR to user $RUN_AS (set DBLOCK_GALERA_USER)"
    # Node 1 gets a fresh system schema and bootstraps the cluster; 2 and 3
    # start empty and receive everything by SST (rsync).
    mariadb-install-db --defaults-file="$(node_dir 1)/my.cnf" --auth-root-authentication-method=normal \
        --skip-test-db >"$(node_dir 1)/install.log" 2>&1 ||
        { tail -n 20 "$(node_dir 1)/install.log" >&2; die "mariadb-install-db failed for node 1"; }
    launch 1 --wsrep-new-cluster
    wait_synced 1 60
    node_sql 1 "CREATE DATABASE IF NOT EXISTS \`$DB\`"
    for n in 2 3; do launch "$n"; done
    for n in 2 3; do wait_synced "$n" 120; done
    [ "$(wsrep 1 wsrep_cluster_size)" = 3 ] || die "cluster size is $(wsrep 1 wsrep_cluster_size), not 3"
}

cmd_stop() {
    local n
    for n in "${NODES[@]}"; do stop_node "$n"; done
    wipe
}

cmd_status() {
    local n ok=0
    for n in "${NODES[@]}"; do
        if node_pid "$n" >/dev/null; then
            printf 'node %s (port %s): pid %s, %s, ready=%s, cluster_size=%s, %s\n' "$n" "$(sql_port "$n")" \
                "$(node_pid "$n")" "$(wsrep "$n" wsrep_local_state_comment)" "$(wsrep "$n" wsrep_ready)" \
                "$(wsrep "$n" wsrep_cluster_size)" "$(wsrep "$n" wsrep_cluster_status)"
        else
            printf 'node %s (port %s): not running\n' "$n" "$(sql_port "$n")"
        fi
        synced "$n" || ok=1
    done
    return $ok
}

node_arg() {
    case "${1:-}" in 1 | 2 | 3) ;; *) die "expected a node number 1-3, got '${1:-}'" ;; esac
}

cmd_kill() {
    node_arg "${1:-}"
    local pid
    pid=$(node_pid "$1") || die "node $1 is not running"
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
}

cmd_restart() {
    node_arg "${1:-}"
    stop_node "$1"
    [ -f "$(node_dir "$1")/my.cnf" ] || die "no cluster under $DIR: run '$0 start' first"
    launch "$1"
    wait_synced "$1" 120
}

cmd_urls() {
    local n out=""
    for n in "${NODES[@]}"; do out+="${out:+,}$(url "$n")"; done
    echo "$out"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    kill) cmd_kill "${2:-}" ;;
    restart) cmd_restart "${2:-}" ;;
    urls) cmd_urls ;;
    *) die "usage: $0 start|stop|status|kill N|restart N|urls" ;;
esac
