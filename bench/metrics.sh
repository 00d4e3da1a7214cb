#!/usr/bin/env bash
#
# What a scrape of llmlimit_metrics costs: an exposition of one table of
# BENCH_CATEGORIES categories (default 100) and its zone, served
#
#   1. to wrk on one kept-alive connection for BENCH_DURATION seconds:
#      scrapes a second and the mean latency, against a static file of the
#      same size served by the same nginx (the HTTP part of the cost);
#   2. to curl under callgrind, BENCH_SCRAPES times: instructions per
#      scrape, and per static file.
#
# nginx (one worker) is pinned to CPU BENCH_NGINX_CPU, wrk to
# BENCH_CLIENT_CPU, as bench/run.sh does.  Usage: bench/metrics.sh

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)

CATEGORIES=${BENCH_CATEGORIES:-100}
DURATION=${BENCH_DURATION:-5}
SCRAPES=${BENCH_SCRAPES:-200}
PORT=${BENCH_PORT:-18495}
NGINX=${BENCH_NGINX:-/usr/sbin/nginx}
MODULE=${BENCH_MODULE:-$ROOT/build/ngx_http_llmlimit_module.so}
NGINX_CPU=${BENCH_NGINX_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}

RUN=$(mktemp -d /tmp/llmlimit-metrics-bench.XXXXXX)
chmod 755 "$RUN"
PID=""


cleanup() {
    if [ -n "$PID" ]; then
        kill "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$RUN"
}
trap cleanup EXIT


die() {
    echo "bench/metrics.sh: $*" >&2
    exit 1
}


for p in wrk curl valgrind callgrind_control; do
    command -v "$p" >/dev/null || die "$p not installed"
done
[ -f "$MODULE" ] || die "no module $MODULE (make build)"

mkdir -p "$RUN/html"
chmod 755 "$RUN/html"

{
    cat <<EOF
load_module $MODULE;
worker_processes  1;
master_process    off;
daemon            off;
error_log         $RUN/error.log warn;
pid               $RUN/nginx.pid;
events { worker_connections 1024; }
http {
    access_log          off;
    keepalive_requests  1000000;
    llmlimit_zone  bench 8m;
    llmlimit_rules bench zone=bench {
EOF
    for ((i = 0; i < CATEGORIES; i++)); do
        printf '        "Category %03d (API)"  GET  /c%03d  $http_x_api_key  1000000/1h;\n' \
            "$i" "$i"
    done
    cat <<EOF
    }
    server {
        listen  127.0.0.1:$PORT;
        root    $RUN/html;
        location / { llmlimit bench; try_files /.none =204; }
        location = /metrics { llmlimit_metrics; }
        location = /static.txt { }
    }
}
EOF
} > "$RUN/nginx.conf"


start() {
    taskset -c "$NGINX_CPU" "$@" &
    PID=$!
    for ((i = 0; i < 600; i++)); do
        curl -s -o /dev/null -m 2 "http://127.0.0.1:$PORT/static.txt" && return 0
        kill -0 "$PID" 2>/dev/null || die "nginx did not start: $(cat "$RUN/error.log")"
        sleep 0.1
    done
    die "nginx did not answer"
}


stop() {
    kill -QUIT "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
}


# one request per category (and a few without a key): every series counts
traffic() {
    for ((i = 0; i < CATEGORIES; i++)); do
        printf -v path '/c%03d' "$i"
        curl -s -o /dev/null -H "x-api-key: k$i" "http://127.0.0.1:$PORT$path"
    done
    curl -s -o /dev/null "http://127.0.0.1:$PORT/c000"
}


# $1 path: "requests/s mean-latency"
wrk_one() {
    taskset -c "$CLIENT_CPU" wrk -t1 -c1 -d"${DURATION}s" \
        "http://127.0.0.1:$PORT$1" \
        | awk '/^Requests\/sec/ { r = $2 } /^    Latency/ { l = $2 }
               END { print r, l }'
}


touch "$RUN/html/static.txt"
start "$NGINX" -p "$RUN" -c "$RUN/nginx.conf"
traffic
curl -s "http://127.0.0.1:$PORT/metrics" > "$RUN/html/static.txt"
chmod 644 "$RUN/html/static.txt"
size=$(stat -c %s "$RUN/html/static.txt")
lines=$(grep -vc '^#' "$RUN/html/static.txt")

read -r m_rps m_lat < <(wrk_one /metrics)
read -r s_rps s_lat < <(wrk_one /static.txt)
stop

start valgrind --tool=callgrind --callgrind-out-file="$RUN/cg.out" \
    "$NGINX" -p "$RUN" -c "$RUN/nginx.conf" 2> "$RUN/valgrind.log"
traffic

ir() {
    local out
    callgrind_control -z "$PID" > /dev/null
    for ((i = 0; i < SCRAPES; i++)); do
        curl -s -o /dev/null "http://127.0.0.1:$PORT$1"
    done
    callgrind_control -d "$PID" > /dev/null
    out=$(ls -t "$RUN"/cg.out.* | head -1)
    sed -n 's/^summary: //p' "$out" | awk -v n="$SCRAPES" '{ printf "%.0f", $1 / n }'
}

m_ir=$(ir /metrics)
s_ir=$(ir /static.txt)
stop

cat <<EOF
llmlimit_metrics, $CATEGORIES categories: $size bytes, $lines samples
                 scrapes/s  mean latency  instructions/scrape
  /metrics       $m_rps  $m_lat  $m_ir
  same, static   $s_rps  $s_lat  $s_ir
  rendering      $(awk -v a="$m_rps" -v b="$s_rps" 'BEGIN { printf "%.1f us", 1e6 / a - 1e6 / b }')  (difference of the mean times a scrape)  $((m_ir - s_ir)) instructions
EOF
