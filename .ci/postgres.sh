#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the shared-study test (tests/test_tune.py) and print its URL.
# Installs Debian's postgresql if the server binaries are missing. Stop it with: .ci/postgres.sh stop
set -euo pipefail
PGDATA_DIR=${PGDATA_DIR:-/tmp/comp-ci-pg}
PORT=${PGPORT_CI:-54329}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  echo "installing postgresql (Debian)" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq postgresql; } >&2
  BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
# The server refuses to run as root: run it as the 'postgres' user the package creates.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "${1:-}" = stop ]; then
  as_pg "$BIN/pg_ctl" -D "$PGDATA_DIR" -m immediate stop >&2 || true
  exit 0
fi
if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
  rm -rf "$PGDATA_DIR" && mkdir -p "$PGDATA_DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$PGDATA_DIR"
  as_pg "$BIN/initdb" -D "$PGDATA_DIR" -U comp --auth=trust >&2
fi
if ! as_pg "$BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
  as_pg "$BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -w \
    -o "-p $PORT -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=50" start >&2
fi
"$BIN/psql" -h 127.0.0.1 -p "$PORT" -U comp -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='comp_test'" | grep -q 1 \
  || "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U comp comp_test
echo "postgresql://comp@127.0.0.1:$PORT/comp_test"
