#!/usr/bin/env bash
# Makes sure the PostgreSQL server the tests use is reachable: FLEETBENCH_TEST_POSTGRES_URL, or
# postgres://postgres@127.0.0.1:5432/postgres. When nothing answers on 127.0.0.1:5432 it starts an
# installed cluster, or, as root with apt-get, installs Debian's postgresql and starts it (trust auth on
# localhost). It never changes a server that already answers.
set -euo pipefail
URL=${FLEETBENCH_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
log() { printf '[ensure-postgres] %s\n' "$*" >&2; }

answers() {
    # A TCP connect to host:port; the tests themselves check credentials and say so when they fail.
    local hostport=${URL#*@}
    hostport=${hostport%%/*}
    local host=${hostport%%:*} port=${hostport##*:}
    [ "$port" = "$hostport" ] && port=5432
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

if answers; then
    exit 0
fi
if [ -n "${FLEETBENCH_TEST_POSTGRES_URL:-}" ]; then
    log "nothing answers at $FLEETBENCH_TEST_POSTGRES_URL; the Postgres tests will fail and say so"
    exit 0
fi
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing postgresql from Debian's packages"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        log "PostgreSQL is not installed and cannot be installed here (need root and apt-get); the Postgres tests will fail and say so"
        exit 0
    fi
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
hba=/etc/postgresql/$version/main/pg_hba.conf
if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba" 2>/dev/null; then
    log "allowing trust auth for local test connections ($hba)"
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
fi
log "starting PostgreSQL $version"
pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster --skip-systemctl-redirect "$version" main restart
for _ in $(seq 1 50); do
    answers && exit 0
    sleep 0.2
done
log "PostgreSQL did not come up; the Postgres tests will fail and say so"
