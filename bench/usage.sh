#!/usr/bin/env bash
#
# Usage accounting's memory and API times (see bench/README.md):
#
#   1. a 32m llmlimit_usage_zone with bucket=1s filled by
#      bench/usage-fill.pl (USAGE_KEYS keys, one request each a second)
#      until it is full: the warning says how many buckets it holds;
#   2. a USAGE_BIG_ZONE zone filled with USAGE_KEYS x USAGE_ROUNDS buckets
#      (720 000: as many as 30 days of hourly buckets of 1 000 keys), then
#      a 30-day JSON query (group_by api_key and workspace) and the CSV
#      export, timed with curl.
#
# Settings: USAGE_KEYS (5000), USAGE_ROUNDS (144), USAGE_BIG_ZONE (64m),
# USAGE_PORT (18780), BENCH_NGINX, BENCH_MODULE.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
KEYS=${USAGE_KEYS:-5000}
ROUNDS=${USAGE_ROUNDS:-144}
BIG=${USAGE_BIG_ZONE:-64m}
PORT=${USAGE_PORT:-18780}
NGINX=${BENCH_NGINX:-/usr/sbin/nginx}
MODULE=${BENCH_MODULE:-$ROOT/build/ngx_http_llmlimit_module.so}
RUN=$(mktemp -d /tmp/llmlimit-usage.XXXXXX)
chmod 755 "$RUN"
PID=""

cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    [ -n "${BENCH_KEEP:-}" ] || rm -rf "$RUN"
}
trap cleanup EXIT

# $1 zone size
start() {
    cat > "$RUN/nginx.conf" <<CONF
load_module $MODULE;
worker_processes  1;
daemon            off;
master_process    on;
error_log         $RUN/error.log warn;
pid               $RUN/nginx.pid;
events { worker_connections 1024; }
http {
    access_log          off;
    keepalive_requests  10000000;
    llmlimit_usage_zone usage $1 bucket=1s;
    server {
        listen  127.0.0.1:$PORT;
        location / {
            llmlimit_usage  usage workspace=\$arg_w project=\$arg_p
                            user=\$arg_u api_key=\$arg_k;
            return 204;
        }
        location /usage/ {
            llmlimit_usage_api  usage;
        }
    }
}
CONF
    : > "$RUN/error.log"
    taskset -c 0 "$NGINX" -p "$RUN" -c "$RUN/nginx.conf" &
    PID=$!
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$PORT/usage/" && return 0
        sleep 0.1
    done
    echo "nginx did not start" >&2
    exit 1
}

stop() {
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=""
}

echo "1. a 32m zone, $KEYS keys, one bucket each a second, until full"
start 32m
rounds=0
while ! grep -q "is full" "$RUN/error.log"; do
    taskset -c 1 perl "$ROOT/bench/usage-fill.pl" "$PORT" "$KEYS" 10 >/dev/null
    rounds=$((rounds + 10))
    [ $rounds -lt 2000 ] || { echo "never full" >&2; exit 1; }
done
grep "is full" "$RUN/error.log" | head -1 | sed 's/^.*usage zone/   usage zone/'
line=$(grep "is full" "$RUN/error.log" | head -1)
buckets=$(echo "$line" | sed -n 's/.* \([0-9]*\) buckets of \([0-9]*\) groups.*/\1/p')
groups=$(echo "$line" | sed -n 's/.* \([0-9]*\) buckets of \([0-9]*\) groups.*/\2/p')
perl -e 'my ($b, $g) = @ARGV;
    my $per = 32 * 1048576 / $b;
    printf "   %.1f bytes of zone a bucket (groups and slab overhead included)\n", $per;
    printf "   1,000 API keys: %.1f days of hourly buckets in 32m\n",
           $b / 1000 / 24;' "$buckets" "$groups"
stop

echo "2. a $BIG zone, $KEYS keys x $ROUNDS rounds = $((KEYS * ROUNDS)) buckets"
start "$BIG"
taskset -c 1 perl "$ROOT/bench/usage-fill.pl" "$PORT" "$KEYS" "$ROUNDS"
if grep -q "is full" "$RUN/error.log"; then
    echo "   the zone filled up: $(grep 'is full' "$RUN/error.log" | head -1)"
fi
now=$(date -u +%s)
start_t=$(date -u -d "@$((now - 30 * 86400 + 3600))" +%Y-%m-%dT%H:%M:%SZ)
end_t=$(date -u -d "@$((now + 3600))" +%Y-%m-%dT%H:%M:%SZ)
q="start_time=$start_t&end_time=$end_t"
for what in "?$q&group_by=api_key" "?$q&group_by=workspace" \
            "export.csv?$q&group_by=api_key"
do
    best=""
    for _ in 1 2 3; do
        t=$(curl -s -o "$RUN/out" -w '%{time_total}' \
                 "http://127.0.0.1:$PORT/usage/$what")
        best=$(perl -e 'print $ARGV[1] eq "" || $ARGV[0] < $ARGV[1]
                              ? $ARGV[0] : $ARGV[1]' "$t" "$best")
    done
    case $what in
    export.csv*) rows=$(($(wc -l < "$RUN/out") - 1)) ;;
    *) rows=$(grep -o time_bucket_start "$RUN/out" | wc -l || true) ;;
    esac
    printf "   %-30s %6.3f s, %d bytes, %d rows\n" \
           "${what%%\?*} ${what##*&}" "$best" "$(stat -c %s "$RUN/out")" "$rows"
done
stop
