#!/usr/bin/env bash
#
# llmlimit accuracy under load: how many requests one identity gets through
# a COUNT/PERIOD limit when many connections hammer it, for each algorithm
# and store, against the bound the README states (C * (T/P + 1)).
#
#   bench/hammer.sh                      # 20/1s, 6 s, 2 workers, tr 100ms
#   HAMMER_TR= HAMMER_LIMIT=10/2s bench/hammer.sh
#
# Settings (environment): HAMMER_LIMIT (20/1s), HAMMER_SECONDS (6),
# HAMMER_WORKERS (2), HAMMER_TR (timer_resolution, "100ms"; empty: none),
# HAMMER_CONNECTIONS (4), HAMMER_STORES ("shm redis"), HAMMER_ALGORITHMS
# ("sliding fixed gcra"), HAMMER_MODULE, HAMMER_NGINX.  Needs wrk and,
# for the Redis store, redis-server.  Prints one line per run.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LIMIT=${HAMMER_LIMIT:-20/1s}
SECONDS_=${HAMMER_SECONDS:-6}
WORKERS=${HAMMER_WORKERS:-2}
TR=${HAMMER_TR-100ms}
CONNS=${HAMMER_CONNECTIONS:-4}
STORES=${HAMMER_STORES:-shm redis}
ALGOS=${HAMMER_ALGORITHMS:-sliding fixed gcra}
MODULE=${HAMMER_MODULE:-$ROOT/build/ngx_http_llmlimit_module.so}
NGINX=${HAMMER_NGINX:-/usr/sbin/nginx}
PORT=${HAMMER_PORT:-18580}
REDIS_PORT=${HAMMER_REDIS_PORT:-18579}

RUN=$(mktemp -d /tmp/llmlimit-hammer.XXXXXX)
chmod 755 "$RUN"
REDIS_PID=

cleanup() {
    [ -f "$RUN/logs/nginx.pid" ] \
        && kill "$(cat "$RUN/logs/nginx.pid")" 2>/dev/null || true
    [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null || true
    sleep 0.3
    rm -rf "$RUN"
}
trap cleanup EXIT

COUNT=${LIMIT%%/*}
PERIOD=${LIMIT#*/}
case $PERIOD in
    *ms) P_MS=${PERIOD%ms} ;;
    *s)  P_MS=$(( ${PERIOD%s} * 1000 )) ;;
    *m)  P_MS=$(( ${PERIOD%m} * 60000 )) ;;
    *)   echo "hammer: period $PERIOD: use ms, s or m" >&2; exit 1 ;;
esac

# the README's bounds over the run's measured length L (wrk's "in 6.01s"):
# fixed, sliding C * (ceil(L/P) + 1); gcra C + floor(L * C / P); and the
# least a hammer must get, C * (L/P - 1)
bounds() {
    awk -v c="$COUNT" -v p="$P_MS" -v l="$1" -v a="$2" 'BEGIN {
        l = l * 1000; w = int(l / p); if (w * p < l) w++
        b = (a == "gcra") ? c + int(l * c / p) : c * (w + 1)
        f = int(c * (l / p - 1)); if (f < 0) f = 0
        print b, f }'
}

if [[ " $STORES " == *" redis "* ]]; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
        --appendonly no --daemonize no >"$RUN/redis.log" 2>&1 &
    REDIS_PID=$!
    sleep 0.5
fi

mkdir -p "$RUN/logs" "$RUN/html"
echo ok > "$RUN/html/ok.txt"

printf '%-6s %-8s %6s %9s %9s %6s %6s\n' store algo secs requests \
    admitted bound floor

for store in $STORES; do
    for algo in $ALGOS; do
        redis=
        [ "$store" = redis ] && redis="redis=127.0.0.1:$REDIS_PORT"
        cat > "$RUN/nginx.conf" <<CONF
load_module $MODULE;
worker_processes $WORKERS;
${TR:+timer_resolution $TR;}
error_log logs/error.log warn;
pid logs/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    llmlimit_log_limit 1;
    llmlimit_zone z 1m $redis;
    llmlimit_rules t zone=z algorithm=$algo {
        "Hammer" * * \$http_x_api_key $LIMIT;
    }
    server {
        listen 127.0.0.1:$PORT reuseport;
        root $RUN/html;
        llmlimit t;
        location / { try_files /ok.txt =404; }
    }
}
CONF
        "$NGINX" -p "$RUN/" -c "$RUN/nginx.conf" -g 'daemon on;'
        sleep 0.5
        key="hammer-$store-$algo-$RANDOM$RANDOM"
        out=$(wrk -t2 -c"$CONNS" -d"${SECONDS_}s" -H "x-api-key: $key" \
                  "http://127.0.0.1:$PORT/x")
        total=$(awk '/requests in/ { print $1 }' <<<"$out")
        secs=$(awk '/requests in/ { sub(/s,$/, "", $4); print $4 }' <<<"$out")
        non2xx=$(awk '/Non-2xx/ { print $NF }' <<<"$out")
        admitted=$(( total - ${non2xx:-0} ))
        read -r bound floor < <(bounds "$secs" "$algo")
        printf '%-6s %-8s %6s %9s %9s %6s %6s\n' "$store" "$algo" "$secs" \
            "$total" "$admitted" "$bound" "$floor"
        kill "$(cat "$RUN/logs/nginx.pid")"
        sleep 0.5
        if grep -q 'lost' "$RUN/logs/error.log" 2>/dev/null; then
            echo "  error.log: $(grep -c 'lost' "$RUN/logs/error.log")" \
                 "'lost' lines, e.g.: $(grep -m1 'lost' "$RUN/logs/error.log" \
                 | cut -c1-150)"
        fi
        : > "$RUN/logs/error.log"
    done
done
