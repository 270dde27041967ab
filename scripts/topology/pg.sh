#!/usr/bin/env bash
# PostgreSQL topologies for dblock's tests, all on 127.0.0.1, never touching
# the main cluster on 5432:
#
#   pg.sh pgbouncer   PgBouncer on 127.0.0.1:6432 in front of the main
#                     cluster, with two database aliases for DB (default t9):
#                     DB_session (pool_mode=session) and DB_tx
#                     (pool_mode=transaction).
#   pg.sh pair        A PostgreSQL 15 primary (cluster dblock_primary, port
#                     5433) and its asynchronous streaming standby (cluster
#                     dblock_standby, port 5434, pg_basebackup -R), both
#                     recreated from scratch.
#   pg.sh stop-standby  Stops the standby (fast): what the primary commits
#                     from then on never reaches it.
#   pg.sh kill-primary  Stops the primary with -m immediate (a crash).
#   pg.sh promote     Starts the standby if it is down and promotes it
#                     (pg_ctl promote -w): it goes on at a new timeline.
#   pg.sh drop-pair   Stops and removes the primary and the standby.
#   pg.sh stop        Stops and removes everything above.
#   pg.sh env         Prints the URLs for the tests (export lines).
#
# Missing binaries are installed with apt-get (pgbouncer, rsync). Each step
# fails with a message saying what did not start. Idempotent.
set -euo pipefail

VER=15
DB="${DBLOCK_TOPOLOGY_DB:-t9}"
BOUNCER_PORT=6432
PRIMARY=dblock_primary PRIMARY_PORT=5433
STANDBY=dblock_standby STANDBY_PORT=5434
RUN=/var/run/dblock-topology
BIN=/usr/lib/postgresql/$VER/bin

die() { printf 'pg.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '\n=== %s\n' "$*"; }

need_packages() {
    local missing=()
    command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
    command -v rsync >/dev/null || missing+=(rsync)
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" \
            || die "could not install ${missing[*]} (apt-get failed)"
    fi
    [ -x "$BIN/pg_ctl" ] || die "PostgreSQL $VER binaries not found in $BIN"
}

wait_ready() { # port what
    for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p "$1" && return 0; sleep 0.1; done
    die "$2 on 127.0.0.1:$1 did not accept connections within 10 s"
}

bouncer_running() { [ -f "$RUN/pgbouncer.pid" ] && kill -0 "$(cat "$RUN/pgbouncer.pid")" 2>/dev/null; }

pgbouncer_start() {
    need_packages
    pg_isready -q -h 127.0.0.1 -p 5432 || die "the main PostgreSQL on 127.0.0.1:5432 is down (scripts/services.sh starts it)"
    if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
        createdb -h 127.0.0.1 -U postgres "$DB"
    fi
    mkdir -p "$RUN"
    chown postgres: "$RUN"
    # Every database asked for so far gets its two aliases.
    touch "$RUN/dbs"
    grep -qx "$DB" "$RUN/dbs" || echo "$DB" >>"$RUN/dbs"
    {
        echo "[databases]"
        while read -r db; do
            echo "${db}_session = host=127.0.0.1 port=5432 dbname=$db pool_mode=session"
            echo "${db}_tx = host=127.0.0.1 port=5432 dbname=$db pool_mode=transaction"
        done <"$RUN/dbs"
        cat <<EOF
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $RUN/userlist.txt
pidfile = $RUN/pgbouncer.pid
logfile = $RUN/pgbouncer.log
default_pool_size = 20
max_client_conn = 500
ignore_startup_parameters = extra_float_digits,options
EOF
    } >"$RUN/pgbouncer.ini"
    echo '"postgres" ""' >"$RUN/userlist.txt"
    chown postgres: "$RUN"/pgbouncer.ini "$RUN"/userlist.txt "$RUN/dbs"
    if bouncer_running; then
        kill -HUP "$(cat "$RUN/pgbouncer.pid")" # reload the database list
        sleep 0.2
    else
        say "starting PgBouncer on 127.0.0.1:$BOUNCER_PORT"
        su postgres -s /bin/sh -c "pgbouncer -d -q $RUN/pgbouncer.ini" \
            || die "PgBouncer did not start (see $RUN/pgbouncer.log)"
        wait_ready "$BOUNCER_PORT" "PgBouncer"
    fi
    for alias in "${DB}_session" "${DB}_tx"; do
        psql -h 127.0.0.1 -p "$BOUNCER_PORT" -U postgres -d "$alias" -Atc 'SELECT 1' >/dev/null \
            || die "PgBouncer's database $alias does not answer (see $RUN/pgbouncer.log)"
    done
}

pgbouncer_stop() {
    if bouncer_running; then
        kill "$(cat "$RUN/pgbouncer.pid")" 2>/dev/null || true
    fi
    rm -f "$RUN/pgbouncer.pid" "$RUN/dbs"
}

cluster_exists() { pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VER $1"; }

drop_cluster() {
    if cluster_exists "$1"; then
        pg_dropcluster --stop "$VER" "$1" >/dev/null 2>&1 \
            || { pg_ctlcluster --skip-systemctl-redirect -m immediate "$VER" "$1" stop || true; pg_dropcluster "$VER" "$1"; }
    fi
}

start_cluster() { # name port what
    pg_ctlcluster --skip-systemctl-redirect "$VER" "$1" start \
        || die "$3 ($1) did not start: see /var/log/postgresql/postgresql-$VER-$1.log"
    wait_ready "$2" "$3"
}

pair_start() {
    need_packages
    drop_cluster "$STANDBY"
    drop_cluster "$PRIMARY"
    say "primary $PRIMARY on 127.0.0.1:$PRIMARY_PORT"
    pg_createcluster "$VER" "$PRIMARY" -p "$PRIMARY_PORT" -- --auth=trust --no-sync >/dev/null \
        || die "pg_createcluster $PRIMARY failed"
    local conf=/etc/postgresql/$VER/$PRIMARY
    cat >>"$conf/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$RUN'
wal_level = replica
max_wal_senders = 4
synchronous_commit = on
synchronous_standby_names = ''
fsync = off
full_page_writes = off
shared_buffers = 32MB
EOF
    echo "host replication all 127.0.0.1/32 trust" >>"$conf/pg_hba.conf"
    mkdir -p "$RUN" && chown postgres: "$RUN"
    start_cluster "$PRIMARY" "$PRIMARY_PORT" "the primary"
    say "standby $STANDBY on 127.0.0.1:$STANDBY_PORT"
    # A base backup of the primary, registered as a cluster (no initdb).
    local data=/var/lib/postgresql/$VER/$STANDBY
    rm -rf "$data" "/etc/postgresql/$VER/$STANDBY"
    install -d -o postgres -g postgres -m 700 "$data"
    su postgres -s /bin/sh -c "pg_basebackup -h 127.0.0.1 -p $PRIMARY_PORT -U postgres -D $data -R -X stream -c fast" \
        || die "pg_basebackup from the primary failed"
    local f
    for f in postgresql.conf pg_hba.conf pg_ident.conf; do
        install -o postgres -g postgres -m 644 "/etc/postgresql/$VER/$PRIMARY/$f" "$data/$f"
    done
    sed -i "s/^port = .*/port = $STANDBY_PORT/; s/$PRIMARY/$STANDBY/g" "$data/postgresql.conf"
    pg_createcluster "$VER" "$STANDBY" -p "$STANDBY_PORT" -d "$data" >/dev/null \
        || die "pg_createcluster $STANDBY (on the base backup) failed"
    start_cluster "$STANDBY" "$STANDBY_PORT" "the standby"
    for _ in $(seq 100); do
        [ "$(psql -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -Atc "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")" = 1 ] && return 0
        sleep 0.1
    done
    die "the standby did not start streaming from the primary within 10 s"
}

# The standby running again (still a standby: in recovery).
standby_up() {
    if ! pg_isready -q -h 127.0.0.1 -p "$STANDBY_PORT"; then
        start_cluster "$STANDBY" "$STANDBY_PORT" "the standby"
    fi
}

promote() {
    standby_up
    su postgres -s /bin/sh -c "$BIN/pg_ctl promote -w -D /var/lib/postgresql/$VER/$STANDBY" >/dev/null \
        || die "promoting the standby failed"
    [ "$(psql -h 127.0.0.1 -p "$STANDBY_PORT" -U postgres -Atc 'SELECT pg_is_in_recovery()')" = f ] \
        || die "the standby is still in recovery after pg_ctl promote"
}

env_lines() {
    echo "export DBLOCK_TEST_PGBOUNCER_SESSION_URL=postgres://postgres@127.0.0.1:$BOUNCER_PORT/${DB}_session"
    echo "export DBLOCK_TEST_PGBOUNCER_TX_URL=postgres://postgres@127.0.0.1:$BOUNCER_PORT/${DB}_tx"
    echo "export DBLOCK_TEST_PG_FAILOVER=$(readlink -f "$0")"
}

case "${1:-}" in
    pgbouncer) pgbouncer_start ;;
    pair) pair_start ;;
    stop-standby) pg_ctlcluster --skip-systemctl-redirect "$VER" "$STANDBY" stop -m fast ;;
    kill-primary) pg_ctlcluster --skip-systemctl-redirect "$VER" "$PRIMARY" stop -m immediate ;;
    start-standby) standby_up ;;
    promote) promote ;;
    drop-pair) drop_cluster "$STANDBY"; drop_cluster "$PRIMARY" ;;
    stop) pgbouncer_stop; drop_cluster "$STANDBY"; drop_cluster "$PRIMARY" ;;
    env) env_lines ;;
    *) die "usage: pg.sh pgbouncer | pair | drop-pair | stop-standby | start-standby | kill-primary | promote | stop | env" ;;
esac
