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
#   3. with redis=: 30 days of hourly hashes of USAGE_REDIS_KEYS (1 000)
#      keys written into a redis-server by bench/usage-redis-fill.pl, then
#      the same queries from midnight (the API reads 31 daily hashes) and
#      from an hour that is not midnight (744 hourly ones).
#
# Settings: USAGE_KEYS (5000), USAGE_ROUNDS (144), USAGE_BIG_ZONE (64m),
# USAGE_REDIS_KEYS (1000), USAGE_PORT (18780), USAGE_REDIS_PORT (18779),
# USAGE_PARTS ("1 2 3"), BENCH_NGINX, BENCH_MODULE.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
KEYS=${USAGE_KEYS:-5000}
ROUNDS=${USAGE_ROUNDS:-144}
BIG=${USAGE_BIG_ZONE:-64m}
PORT=${USAGE_PORT:-18780}
REDIS_PORT=${USAGE_REDIS_PORT:-18779}
RKEYS=${USAGE_REDIS_KEYS:-1000}
PARTS=${USAGE_PARTS:-1 2 3}
NGINX=${BENCH_NGINX:-/usr/sbin/nginx}
MODULE=${BENCH_MODULE:-$ROOT/build/ngx_http_llmlimit_module.so}
RUN=$(mktemp -d /tmp/llmlimit-usage.XXXXXX)
chmod 755 "$RUN"
PID=""
RPID=""

cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null && wait "$RPID" 2>/dev/null
    [ -n "${BENCH_KEEP:-}" ] || rm -rf "$RUN"
}
trap cleanup EXIT

# $1 zone size, $2 its redis= (a zone "r" on the bench's redis-server)
start() {
    local rz="" redis=""
    if [ -n "${2:-}" ]; then
        rz="llmlimit_zone r 1m redis=127.0.0.1:$REDIS_PORT;"
        redis=" redis=r"
    fi
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
    $rz
    llmlimit_usage_zone usage $1 bucket=1s$redis;
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

# $1 the query's start, $2 its end: the best of three, and the answer's size
queries() {
    local q="start_time=$1&end_time=$2" what best t rows
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
               "${what%%\?*} ${what##*&}" "$best" "$(stat -c %s "$RUN/out")" \
               "$rows"
    done
}

case " $PARTS " in *" 1 "*)
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

;; esac

case " $PARTS " in *" 2 "*)
echo "2. a $BIG zone, $KEYS keys x $ROUNDS rounds = $((KEYS * ROUNDS)) buckets"
start "$BIG"
taskset -c 1 perl "$ROOT/bench/usage-fill.pl" "$PORT" "$KEYS" "$ROUNDS"
if grep -q "is full" "$RUN/error.log"; then
    echo "   the zone filled up: $(grep 'is full' "$RUN/error.log" | head -1)"
fi
now=$(date -u +%s)
queries "$(date -u -d "@$((now - 30 * 86400 + 3600))" +%Y-%m-%dT%H:%M:%SZ)" \
        "$(date -u -d "@$((now + 3600))" +%Y-%m-%dT%H:%M:%SZ)"
stop
;; esac

case " $PARTS " in *" 3 "*)
echo "3. redis=: 30 days of hourly hashes of $RKEYS keys in Redis"
taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
    --appendonly no --dir "$RUN" --logfile "$RUN/redis.log" &
RPID=$!
for _ in $(seq 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done
perl "$ROOT/bench/usage-redis-fill.pl" llmlimit: "$RKEYS" 30 \
    | redis-cli -p "$REDIS_PORT" --pipe >/dev/null
echo "   $(redis-cli -p "$REDIS_PORT" dbsize) keys, $(redis-cli -p "$REDIS_PORT" info memory | sed -n 's/^used_memory_human:\(.*\)\r$/\1/p') of Redis"
start 1m redis
sleep 1
today=$(date -u +%Y-%m-%d)
tomorrow=$(date -u -d tomorrow +%Y-%m-%d)
echo "   from midnight (daily hashes):"
queries "$(date -u -d "$today - 30 days" +%Y-%m-%d)" "$tomorrow"
echo "   from an hour that is not midnight (hourly hashes):"
now=$(date -u +%s)
queries "$(date -u -d "@$((now - 30 * 86400 + 1800))" +%Y-%m-%dT%H:%M:%SZ)" \
        "$(date -u -d "@$((now + 1800))" +%Y-%m-%dT%H:%M:%SZ)"
stop
;; esac
