#!/usr/bin/env bash
# A throwaway PostgreSQL for the `postgres` tests, on 127.0.0.1:54329 only (trust auth).
#
#   eval "$(.ci/postgres.sh)"      # install if needed, start, print the export line
#   .ci/postgres.sh stop           # stop it (the data folder stays for the next start)
#   .ci/postgres.sh stop immediate # stop it as a crash would (no checkpoint; WAL replay at start)
#   .ci/postgres.sh destroy        # stop it and delete the data folder
#
# Idempotent: an already running cluster is reused. Progress goes to stderr; stdout holds
# only the `export CELLINSPECT_TEST_POSTGRES_URL=...` line.
set -euo pipefail

PORT="${CELLINSPECT_PG_PORT:-54329}"
DATA="${CELLINSPECT_PG_DIR:-${TMPDIR:-/tmp}/cellinspect-pg}"
DB=cellinspect_test
URL="postgresql+psycopg://postgres@127.0.0.1:${PORT}/${DB}"

say() { echo "postgres.sh: $*" >&2; }

find_bindir() {
    local initdb
    if initdb="$(command -v initdb 2>/dev/null)"; then
        dirname "$(readlink -f "$initdb")"
        return
    fi
    # Debian keeps the server binaries off PATH, one folder per major version.
    local dirs=(/usr/lib/postgresql/*/bin)
    if [[ -x "${dirs[-1]}/initdb" ]]; then
        printf '%s\n' "${dirs[@]}" | sort -V | tail -n 1
    fi
}

BINDIR="$(find_bindir)"
if [[ -z "$BINDIR" ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        say "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
        exit 1
    fi
    say "installing PostgreSQL"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
    BINDIR="$(find_bindir)"
    [[ -n "$BINDIR" ]] || { say "initdb still not found after installing postgresql"; exit 1; }
fi

# The server refuses to run as root: as root, run it as `postgres`; otherwise as ourselves.
if [[ "$(id -u)" -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    as_owner() { runuser -u postgres -- "$@"; }
    OWNER=postgres
else
    as_owner() { "$@"; }
    OWNER="$(id -un)"
fi

pg_ctl_() { as_owner "$BINDIR/pg_ctl" -D "$DATA" "$@"; }

case "${1:-start}" in
    stop)
        MODE="${2:-fast}"
        case "$MODE" in
            smart | fast | immediate) ;;
            *) say "unknown stop mode $MODE; valid: smart, fast, immediate"; exit 2 ;;
        esac
        [[ -f "$DATA/postmaster.pid" ]] && pg_ctl_ -m "$MODE" -w stop >&2
        exit 0
        ;;
    destroy)
        [[ -f "$DATA/postmaster.pid" ]] && pg_ctl_ -m fast -w stop >&2
        rm -rf "$DATA"
        exit 0
        ;;
    start) ;;
    *) say "unknown command ${1}; valid: start, stop, destroy"; exit 2 ;;
esac

if [[ ! -f "$DATA/PG_VERSION" ]]; then
    say "creating cluster in $DATA"
    mkdir -p "$DATA"
    chown "$OWNER" "$DATA"
    chmod 700 "$DATA"
    # trust is acceptable only because the server listens on loopback and a local socket.
    as_owner "$BINDIR/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 \
        --locale=C.UTF-8 >/dev/null
fi

if ! "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
    say "starting on 127.0.0.1:$PORT"
    pg_ctl_ -w -t 60 -l "$DATA/server.log" \
        -o "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='$DATA'" \
        start >&2
fi

psql_() { "$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
if [[ "$(psql_ -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]]; then
    psql_ -d postgres -c "CREATE DATABASE $DB" >&2
fi
say "ready: $URL"
echo "export CELLINSPECT_TEST_POSTGRES_URL=$URL"
