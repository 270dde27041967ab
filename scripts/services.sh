# Sourced by scripts/test and .ci/run: start the three services a machine of
# this kind comes with, if they are down, and create the test databases.
# Each function fails loudly (set -e in the caller) when its service cannot
# be reached after starting it.

# Each step is stamped with the wall clock and the seconds since the calling
# script started, so a slow CI run shows where its time went.
say() { printf '\n=== [%s, %ss] %s\n' "$(date +%T)" "$SECONDS" "$*"; }

start_postgres() {
    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        say "starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
        for _ in $(seq 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    fi
    pg_isready -h 127.0.0.1 -p 5432
    local db
    for db in "$@"; do
        if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
            createdb -h 127.0.0.1 -U postgres "$db"
        fi
    done
}

start_mariadb() {
    if ! mariadb-admin -h 127.0.0.1 -u root --connect-timeout=2 ping >/dev/null 2>&1; then
        say "starting MariaDB"
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
        for _ in $(seq 60); do
            mariadb-admin -h 127.0.0.1 -u root --connect-timeout=2 ping >/dev/null 2>&1 && break
            sleep 1
        done
    fi
    # The suite runs several tests at once, each with pools of its own (up
    # to 32 connections): the default 151 connections run out. A runtime
    # setting; the server keeps its configuration file.
    mariadb -h 127.0.0.1 -u root -e "SET GLOBAL max_connections = GREATEST(@@max_connections, 600)"
    local db
    for db in "$@"; do
        mariadb -h 127.0.0.1 -u root -e "CREATE DATABASE IF NOT EXISTS \`$db\`"
    done
}

start_redis() {
    if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
        say "starting Redis"
        mkdir -p /var/lib/redis /var/log/redis
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
            --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
        for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
    fi
    redis-cli -h 127.0.0.1 -p 6379 ping
}
