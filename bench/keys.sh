#!/usr/bin/env bash
# bench/keys.sh: what the key directory (llmlimit_keys) costs.
#
#   BENCH_MODULE=build/ngx_http_llmlimit_module.so bench/keys.sh
#
# 1. For directories of 10 000 and 1 000 000 keys (bench/keys-gen.pl; with
#    sha256, plan, org and short_key, and "full" with every field): the
#    time nginx -t takes, and the load at start and at run time (the
#    notice each load logs: shared memory, process memory, phases, how
#    long the zone's lock was held).
# 2. Under wrk (one valid key, one lookup a request, 2 workers), latency
#    with no reload, then with the 1 000 000-key file reloaded again and
#    again (touched BENCH_RELOAD seconds after each load): p99 and max.
# 3. The same with one sequential client (bench/keys-probe.pl) instead of
#    wrk: with the CPUs not saturated, a pause of request handling shows
#    as a slow request.
#
# BENCH_KEYS_PARAMS (default thread_pool=keys, a pool of one thread) is
# given to llmlimit_keys: thread_pool=off measures the slices.
#
# The files go to BENCH_DIR (default /tmp/llmlimit-keys-bench), never into
# the repository.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODULE=${BENCH_MODULE:-$PWD/build/ngx_http_llmlimit_module.so}
NGINX=${NGINX:-/usr/sbin/nginx}
DIR=${BENCH_DIR:-/tmp/llmlimit-keys-bench}
PORT=${BENCH_PORT:-18095}
DURATION=${BENCH_DURATION:-15}
RELOAD=${BENCH_RELOAD:-1}
SIZES=${BENCH_SIZES:-"10000 10000-full 1000000 1000000-full"}
PARAMS=${BENCH_KEYS_PARAMS:-thread_pool=keys}

mkdir -p "$DIR/logs"
chmod 755 "$DIR" "$DIR/logs"

for s in $SIZES; do
    f="$DIR/keys-$s.json"
    [ -s "$f" ] || bench/keys-gen.pl "${s%-full}" \
        $([ "$s" != "${s%-full}" ] && echo full) > "$f"
    chmod 644 "$f"
done

conf() {
    cat > "$DIR/nginx.conf" <<EOF
load_module $MODULE;
worker_processes 2;
pid logs/nginx.pid;
error_log logs/error.log notice;
thread_pool keys threads=1;
events { worker_connections 1024; }
http {
    access_log off;
    llmlimit_keys keys.json check=1s $PARAMS;
    llmlimit_key \$http_x_api_key;
    server {
        listen 127.0.0.1:$PORT;
        location / {
            return 200 "[\$llmlimit_key_valid][\$llmlimit_key_plan][\$llmlimit_key_org]\n";
        }
    }
}
EOF
}

start() {
    : > "$DIR/logs/error.log"
    "$NGINX" -p "$DIR/" -c "$DIR/nginx.conf"
    for _ in $(seq 1 200); do
        curl -s -o /dev/null "http://127.0.0.1:$PORT/" && return 0
        sleep 0.1
    done
    echo "nginx did not start" >&2
    exit 1
}

stop() {
    local pid
    pid=$(cat "$DIR/logs/nginx.pid")
    kill -QUIT "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

loads() {
    grep -c "keys loaded" "$DIR/logs/error.log" || true
}

# waits for the Nth "keys loaded" line
wait_load() {
    for _ in $(seq 1 1200); do
        [ "$(loads)" -ge "$1" ] && return 0
        sleep 0.1
    done
    echo "no load" >&2
    return 1
}

last_load() {
    grep "keys loaded" "$DIR/logs/error.log" | tail -1 \
        | sed 's/.*llmlimit_keys "[^"]*": //'
}

conf
trap 'stop 2>/dev/null || true' EXIT

echo "== load"
for s in $SIZES; do
    cp "$DIR/keys-$s.json" "$DIR/keys.json"
    t0=$(date +%s.%N)
    "$NGINX" -q -t -p "$DIR/" -c "$DIR/nginx.conf"
    t1=$(date +%s.%N)
    printf '%-14s nginx -t: %.2fs\n' "$s" "$(echo "$t1 - $t0" | bc)"

    start
    printf '%-14s at start (master): %s\n' "$s" "$(last_load)"
    touch "$DIR/keys.json"
    wait_load 2
    printf '%-14s at run time (worker): %s\n' "$s" "$(last_load)"
    rss=$(for p in $(pgrep -P "$(cat "$DIR/logs/nginx.pid")"); do
              grep -E 'VmHWM' /proc/$p/status | awk '{print $2}'; done \
          | sort -n | tail -1)
    printf '%-14s worker peak RSS (shared pages included): %s kB\n' "$s" "$rss"
    stop
done

echo "== latency under wrk, 1 000 000 keys, ${DURATION}s runs"
cp "$DIR/keys-1000000.json" "$DIR/keys.json"
start
key="X-Api-Key: bench-key-4242"
curl -s -H "$key" "http://127.0.0.1:$PORT/"

echo "-- no reload"
wrk -t1 -c16 -d"${DURATION}s" --latency -H "$key" "http://127.0.0.1:$PORT/" \
    | grep -E 'Latency|99%|Requests/sec|Non-2xx'

echo "-- the file reloaded again and again (touched ${RELOAD}s after each load)"
n0=$(loads)
( end=$((SECONDS + DURATION)); n=$n0
  while [ $SECONDS -lt $end ]; do
      sleep "$RELOAD"; touch "$DIR/keys.json"; n=$((n + 1))
      wait_load $n || break
  done ) &
wrk -t1 -c16 -d"${DURATION}s" --latency -H "$key" "http://127.0.0.1:$PORT/" \
    | grep -E 'Latency|99%|Requests/sec|Non-2xx'
wait
sleep 1
echo "loads during the run: $(( $(loads) - n0 ))"
grep "keys loaded" "$DIR/logs/error.log" | tail -n +$((n0 + 1)) \
    | sed 's/.*keys loaded, //'

echo "== one sequential client (bench/keys-probe.pl), ${DURATION}s runs"
echo "-- no reload"
bench/keys-probe.pl "$PORT" "$DURATION" "$key"
echo "-- the file reloaded again and again"
n0=$(loads)
( end=$((SECONDS + DURATION)); n=$n0
  while [ $SECONDS -lt $end ]; do
      sleep "$RELOAD"; touch "$DIR/keys.json"; n=$((n + 1))
      wait_load $n || break
  done ) &
bench/keys-probe.pl "$PORT" "$DURATION" "$key"
wait
echo "loads during the run: $(( $(loads) - n0 ))"
curl -s -H "$key" "http://127.0.0.1:$PORT/"
