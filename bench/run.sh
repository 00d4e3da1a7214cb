#!/usr/bin/env bash
#
# llmlimit benchmarks: throughput and latency against bare nginx and
# limit_req, identities held per MB of zone, and instructions per request.
# Usage: make bench    (or bench/run.sh; settings below, from the environment)
# See bench/README.md for what each part measures and why.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench

DURATION=${BENCH_DURATION:-10}          # seconds per measured run
ROUNDS=${BENCH_ROUNDS:-5}               # round-robin rounds
CONNECTIONS=${BENCH_CONNECTIONS:-64}
KEYS=${BENCH_KEYS:-10000}               # distinct API keys in the mix
# the x-api-key of key number i (0 .. KEYS - 1), as bench/requests.lua sends it
KEY_FORMAT='lsv2_pt_%08d5f3c9e1a2b7d4c6e8f0a1b2c3d4e5f_b'
PIPELINE=${BENCH_PIPELINE:-1}           # requests per write (1: none)
PORT=${BENCH_PORT:-18480}
REDIS_PORT=${BENCH_REDIS_PORT:-18479}
NGINX=${BENCH_NGINX:-/usr/sbin/nginx}
MODULE=${BENCH_MODULE:-$ROOT/build/ngx_http_llmlimit_module.so}
SCENARIOS=${BENCH_SCENARIOS:-bare limit_req llmlimit-shm llmlimit-redis llmlimit-redis-sync llmlimit-reject llmlimit-reject-quiet llmlimit-body llmlimit-tokens distinct-bare distinct-shm distinct-redis distinct-lua}
PARTS=${BENCH_PARTS:-throughput fill callgrind chart}
CG_REQUESTS=${BENCH_CALLGRIND_REQUESTS:-20000}
FILL_ZONE=${BENCH_FILL_ZONE:-4m}
FILL_IDS=${BENCH_FILL_IDS:-200000}
NGINX_CPU=${BENCH_NGINX_CPU:-0}         # nginx and redis-server
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}       # wrk
RESULTS=${BENCH_RESULTS:-$BENCH/results}

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=$RESULTS/$STAMP
RUN=$(mktemp -d /tmp/llmlimit-bench.XXXXXX)
chmod 755 "$RUN"        # nginx workers (nobody) look up files under it
HZ=$(getconf CLK_TCK)
PIDS=()
NOTES=()


note() {
    echo "bench: $*" >&2
    NOTES+=("$*")
}


die() {
    echo "bench: $*" >&2
    exit 1
}


cleanup() {
    local pid

    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ -z "${BENCH_KEEP:-}" ]; then
        rm -rf "$RUN"
    else
        echo "bench: kept $RUN" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM


forget() {
    local keep=() pid

    for pid in "${PIDS[@]:-}"; do
        if [ -n "$pid" ] && [ "$pid" != "$1" ]; then keep+=("$pid"); fi
    done
    PIDS=("${keep[@]:-}")
}


# --- prerequisites -------------------------------------------------------

need_packages() {
    local missing="" p

    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
            || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0

    echo "bench: installing$missing" >&2
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
        --no-install-recommends $missing >&2
}


port_free() {
    ! ss -Htln "sport = :$1" 2>/dev/null | grep -q .
}


# --- configurations ------------------------------------------------------

# The LangSmith table: conf.example's llmlimit_rules block that holds the
# "Run query" rows, or bench/langsmith.rules; renamed to "langsmith" on zone
# "bench".  $1: limits: "raised" (x100000 up to the largest COUNT, every
# request passes), "one"
# (1/1d: every request past the first per counter is rejected), "table".
# $2: more parameters of the table (plan=...), optional.
langsmith_table() {
    local src=$BENCH/langsmith.rules

    if [ -f "$ROOT/conf.example" ] \
       && grep -q '^[[:space:]]*llmlimit_rules' "$ROOT/conf.example" \
       && grep -q 'Run query' "$ROOT/conf.example"
    then
        src=$ROOT/conf.example
    fi

    perl -ne '
        BEGIN { $mode = shift @ARGV; }
        if (/^\s*llmlimit_rules\s/) { @b = (); $in = 1; }
        if ($in) {
            push @b, $_;
            if (/^\s*}\s*$/) {
                $in = 0;
                if (grep { /Run query/ } @b) { print @b; exit; }
            }
        }
    ' "$1" "$src" \
    | perl -pe '
        BEGIN { ($mode, $params) = splice @ARGV, 0, 2; }
        s/^(\s*llmlimit_rules\s+)\S+/${1}langsmith/;
        s/\bzone=\S+?(\s|;|\{)/zone=bench$1/;
        s/\@ZONE\@/bench/g;
        s/\s*\{\s*$/  $params {\n/ if $params ne "" && /^\s*llmlimit_rules/;
        next if /^\s*llmlimit_rules/;
        if ($mode eq "raised") {
            # x100000, within the largest COUNT (2^29 - 1)
            s{(?<![\w.])(\d+)/(\d+[a-z]*)}
             {($1 * 100000 > 536870911 ? 536870911 : $1 * 100000) . "/$2"}ge;
        } elsif ($mode eq "one") {
            s{(?<![\w.])(\d+)/(\d+[a-z]*)}{1/1d}g;
        }
    ' "$1" "${2:-}"
}


# The key directory of llmlimit-shm-keys, once per run: every API key the
# mix sends (KEYS), as a deployment would hold them: by their SHA-256, with
# a plan, an organisation (ten keys each) and a short key; $1 "full" adds
# workspace, project and user (llmlimit-shm-usage's groups), in
# keys-full.json.
keys_file() {
    local kind=${1:-} f

    f=$RUN/keys${kind:+-$kind}.json
    [ -s "$f" ] && return 0
    perl "$BENCH/keys-gen.pl" "$KEYS" $kind "$KEY_FORMAT" > "$f.tmp"
    chmod 644 "$f.tmp"
    mv "$f.tmp" "$f"
}


# the "distinct" workload (distinct-*): every request its own API key
workload() {
    case $1 in distinct-*) echo distinct=1 ;; *) echo distinct=0 ;; esac
}


# the scenario talks to the harness' redis-server
uses_redis() {
    case $1 in llmlimit-redis* | distinct-redis | distinct-lua) return 0 ;; esac
    return 1
}


# the scenario loads the module
uses_module() {
    case $1 in llmlimit-* | distinct-shm | distinct-redis) return 0 ;; esac
    return 1
}


# $1 scenario, $2 mode (bench | callgrind | fill), $3 directory
write_conf() {
    local scn=$1 mode=$2 dir=$3 load="" http="" loc="" master=on
    local content=/.bench-none

    mkdir -p "$dir/html"
    chmod 755 "$dir" "$dir/html"

    # the distinct workload's scenarios are the mix's, but distinct-lua
    case $scn in
    distinct-bare)  scn=bare ;;
    distinct-shm)   scn=llmlimit-shm ;;
    distinct-redis) scn=llmlimit-redis ;;
    esac

    case $scn in
    bare)
        ;;
    distinct-lua)
        # the Lua/Redis style (bench/redis-lua.lua) on the limit llmlimit's
        # table gives POST /runs/query by API key, raised as for
        # llmlimit-shm: 1500000 per 10s, a fixed window
        load="load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;"
        http="lua_package_path '$BENCH/?.lua;;';"
        loc="access_by_lua_block {
                require('redis-lua').check('127.0.0.1', $REDIS_PORT,
                    ngx.var.http_x_api_key, 1500000, 10)
            }"
        ;;
    limit_req)
        http="limit_req_zone \$http_x_api_key zone=bench:64m rate=1000000r/s;"
        loc="limit_req zone=bench burst=1000000 nodelay;"
        ;;
    llmlimit-shm | llmlimit-shm-keys | llmlimit-shm-usage | llmlimit-redis \
    | llmlimit-redis-sync | llmlimit-reject | llmlimit-reject-quiet \
    | llmlimit-reject-logall)
        local redis="" limits=raised params=""
        if [ "$scn" = llmlimit-redis ]; then redis=" redis=127.0.0.1:$REDIS_PORT"; fi
        # -sync: decisions in shared memory, Redis every 100 ms
        if [ "$scn" = llmlimit-redis-sync ]; then
            redis=" redis=127.0.0.1:$REDIS_PORT redis_sync=100ms"
        fi
        case $scn in llmlimit-reject*) limits=one ;; esac
        load="load_module $MODULE;"
        # -keys: a key directory of every API key of the mix; the table's
        # plan= is the key's plan, evaluated for every request the table
        # matches (all of them), so every request looks its key up; the
        # rules and limits are llmlimit-shm's
        if [ "$scn" = llmlimit-shm-keys ] || [ "$scn" = llmlimit-shm-usage ]
        then
            local kf=""
            if [ "$scn" = llmlimit-shm-usage ]; then kf=full; fi
            keys_file $kf
            load="$load
thread_pool  llmlimit_keys  threads=1;"
            http="llmlimit_keys $RUN/keys${kf:+-$kf}.json thread_pool=llmlimit_keys;
    "
            params="plan=\$llmlimit_key_plan"
            loc="llmlimit_key \$http_x_api_key;
            "
        fi
        # -usage: -keys plus usage recorded for every request, in the
        # groups of the key directory (workspace, project, user, short key)
        if [ "$scn" = llmlimit-shm-usage ]; then
            http="${http}llmlimit_usage_zone usage 32m;
    "
            loc="${loc}llmlimit_usage usage;
            "
        fi
        http="${http}llmlimit_zone bench 64m$redis;
$(langsmith_table $limits "$params")"
        loc="${loc}llmlimit langsmith;"
        # rejections: by default up to 100 error-log lines a second are
        # written and the rest counted; -quiet logs below the error_log
        # level (no line at all), -logall writes one line per rejection
        # as limit_req does (not in the default set)
        case $scn in
        llmlimit-reject-quiet)
            loc="$loc
            llmlimit_log_level info;" ;;
        llmlimit-reject-logall)
            loc="$loc
            llmlimit_log_limit off;" ;;
        esac
        ;;
    llmlimit-body | llmlimit-tokens | llmlimit-body-64k | llmlimit-tokens-64k)
        # an LLM API: every response a JSON body with usage at its end (1 KB,
        # or 64 KB), GET /v1/chat/completions by 10 000 API keys; -body
        # limits requests only, -tokens adds a token budget, so that every
        # response is read by the usage scanner and charged
        local size=1024 tokens=""
        case $scn in *-64k) size=65536 ;; esac
        case $scn in llmlimit-tokens*) tokens=",2000000000tokens/60s" ;; esac
        usage_body "$size" > "$dir/html/usage.json"
        chmod 644 "$dir/html/usage.json"
        load="load_module $MODULE;"
        http="llmlimit_zone bench 64m;
    llmlimit_rules chat zone=bench {
        \"Chat\"  GET  /v1/chat/completions  \$http_x_api_key  100000000/60s$tokens;
    }
    sendfile off;"
        loc="llmlimit chat;"
        content="/usage.json"
        ;;
    fill)
        load="load_module $MODULE;"
        http="llmlimit_zone fill $FILL_ZONE;
    llmlimit_rules fill zone=fill {
        fill  *  *  \$http_x_api_key  1/1h;
    }"
        loc="llmlimit fill;"
        ;;
    *)
        die "unknown scenario $scn"
        ;;
    esac

    if [ "$mode" = callgrind ]; then master=off; fi

    cat > "$dir/nginx.conf" <<EOF
# written by bench/run.sh: scenario $scn, mode $mode
$load
worker_processes  1;
daemon            off;
master_process    $master;
error_log         $dir/error.log warn;
pid               $dir/nginx.pid;

events {
    worker_connections  1024;
}

http {
    access_log          off;
    keepalive_requests  1000000;
    keepalive_timeout   75s;

    # try_files below runs in the precontent phase, after preaccess (where
    # limit_req and llmlimit run), for every method; the miss is cached, so
    # the content costs no system call.  See bench/README.md.
    open_file_cache         max=16 inactive=1h;
    open_file_cache_valid   1h;
    open_file_cache_errors  on;

    $http

    server {
        listen       127.0.0.1:$PORT;
        server_name  api.bench.test;
        root         $dir/html;

        location / {
            $loc
            try_files  $content =204;
        }
    }
}
EOF
}


# $1 bytes: an OpenAI chat completion of about that size, the usage last
usage_body() {
    perl -e '
        my $n = shift;
        my $head = q({"id":"chatcmpl-bench","object":"chat.completion",)
                 . q("model":"bench","choices":[{"index":0,"message":)
                 . q({"role":"assistant","content":");
        my $tail = q("},"finish_reason":"stop"}],"usage":{"prompt_tokens":)
                 . q(12,"completion_tokens":30,"total_tokens":42}});
        my $fill = $n - length($head) - length($tail) - 1;
        my $text = substr("The quick brown fox jumps over the lazy dog. "
                          x ($fill / 45 + 1), 0, $fill);
        print $head, $text, $tail, "\n";
    ' "$1"
}


# the wrk mix of a scenario: the LLM one for the token scenarios
wrk_mix() {
    case $1 in
    llmlimit-body* | llmlimit-tokens*) WRK_MIX="chat=1" ;;
    *) WRK_MIX="chat=0" ;;
    esac
}


# --- processes -----------------------------------------------------------

wait_http() {
    local i

    for ((i = 0; i < ${2:-100}; i++)); do
        curl -s -o /dev/null -m 2 "http://127.0.0.1:$PORT/" && return 0
        kill -0 "$1" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}


# $1 directory; starts nginx pinned, sets NGINX_PID and WORKER_PID
start_nginx() {
    local i

    taskset -c "$NGINX_CPU" "$NGINX" -p "$1" -c "$1/nginx.conf" \
        2>>"$1/stderr.log" &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")

    if ! wait_http "$NGINX_PID"; then
        stop_nginx
        return 1
    fi

    WORKER_PID=""
    for ((i = 0; i < 50; i++)); do
        WORKER_PID=$(pgrep -P "$NGINX_PID" | head -1 || true)
        [ -n "$WORKER_PID" ] && break
        sleep 0.1
    done
    [ -n "$WORKER_PID" ]
}


stop_nginx() {
    kill -QUIT "$NGINX_PID" 2>/dev/null || true
    wait "$NGINX_PID" 2>/dev/null || true
    forget "$NGINX_PID"
}


start_redis() {
    local i

    port_free "$REDIS_PORT" || { note "port $REDIS_PORT in use"; return 1; }
    command -v redis-server >/dev/null || return 1

    taskset -c "$NGINX_CPU" redis-server --port "$REDIS_PORT" \
        --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
        --logfile "$RUN/redis.log" &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")

    for ((i = 0; i < 50; i++)); do
        redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && return 0
        sleep 0.1
    done
    return 1
}


redis_cli() {
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"
}


cpu_ticks() {
    if [ -z "${1:-}" ]; then
        echo 0
        return
    fi
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}


# busy and steal ticks of the two CPUs used, from /proc/stat
core_ticks() {
    awk -v a="cpu$NGINX_CPU" -v b="cpu$CLIENT_CPU" '
        $1 == a || $1 == b { busy += $2 + $3 + $4 + $7 + $8 + $9; st += $9 }
        END { print busy, st }' /proc/stat
}


# user + system seconds of this shell's finished children (wrk included):
# `times` must run in this shell, not in a $( ) subshell, so it writes $1
children_cpu() {
    times > "$1"
}


seconds() {
    tail -1 "$1" | perl -ne '
        my $t = 0;
        $t += $1 * 60 + $2 while /(\d+)m([\d.]+)s/g;
        print $t, "\n";'
}


# wrk pinned to the client CPU; extra arguments go to requests.lua
wrk_run() {
    local conns=$1 dur=$2
    shift 2

    taskset -c "$CLIENT_CPU" wrk -t1 -c"$conns" -d"$dur" --latency \
        --timeout 10s -s "$BENCH/requests.lua" "http://127.0.0.1:$PORT/" \
        -- keys="$KEYS" pipeline="$PIPELINE" "${WRK_MIX:-chat=0}" "$@"
}


# the redis-server's pid for a scenario that uses it, else nothing
redis_pid() {
    if uses_redis "$1"; then echo "$REDIS_PID"; fi
}


field() {
    # field NAME < "BENCHRESULT a=1 b=2"
    tr ' ' '\n' | sed -n "s/^$1=//p"
}


# --- sanity: does the scenario do what it claims? ------------------------

# $1 scenario; after warm-up. Prints nothing, returns 1 with a note if wrong.
check_scenario() {
    local scn=$1 hdr code want=204 method=POST uri=/runs/query

    case $scn in
    llmlimit-body* | llmlimit-tokens*)
        want=200 method=GET uri=/v1/chat/completions ;;
    esac

    hdr=$(curl -s -D - -o /dev/null -m 5 -X "$method" \
          -H "x-api-key: lsv2_pt_00000012bench-sanity" \
          "http://127.0.0.1:$PORT$uri") || true
    code=$(printf '%s' "$hdr" | sed -n '1s/^HTTP[^ ]* \([0-9]*\).*/\1/p')

    case $scn in llmlimit-reject*) want=429 ;; esac

    if [ "$want" = 429 ]; then
        # a second one: the first of a new key passes
        code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 -X POST \
               -H "x-api-key: lsv2_pt_00000012bench-sanity" \
               "http://127.0.0.1:$PORT/runs/query") || true
    fi

    if [ "$code" != "$want" ]; then
        note "$scn: sanity request answered $code, expected $want"
        return 1
    fi

    case $scn in
    llmlimit-* | distinct-shm | distinct-redis | distinct-lua)
        if ! printf '%s' "$hdr" | grep -qi '^x-ratelimit-limit:'; then
            note "$scn: no X-RateLimit-Limit header on a limited request"
            return 1
        fi
        ;;
    esac

    if uses_redis "$scn"; then
        local keys
        keys=$(redis_cli dbsize 2>/dev/null || echo 0)
        if [ "${keys:-0}" -lt 1 ]; then
            note "$scn: redis holds no keys: the zone is not using Redis"
            return 1
        fi
    fi
    return 0
}


# --- part 1: throughput and latency, round-robin -------------------------

throughput() {
    local r i n scn dir res t0 t1 cpu live=() order=() skip=" "

    echo "bench: throughput: $ROUNDS rounds x {$SCENARIOS}, ${DURATION}s each," \
         "$CONNECTIONS connections" >&2

    printf 'round\tscenario\trps\tp50_us\tp90_us\tp99_us\tp999_us\trequests' \
        > "$OUT/raw.tsv"
    printf '\tnon2xx\tsocket_errors\tnginx_cpu_pct\tnginx_cpu_us_per_req' \
        >> "$OUT/raw.tsv"
    printf '\tredis_cpu_pct\tserver_cpu_us_per_req\twrk_cpu_pct' \
        >> "$OUT/raw.tsv"
    printf '\tother_cpu_pct\tsteal_pct\tloadavg\tredis_cpu_us_per_req\n' \
        >> "$OUT/raw.tsv"

    for scn in $SCENARIOS; do
        if uses_module "$scn" && [ ! -f "$MODULE" ]; then
            note "$scn skipped: no module at $MODULE"
            continue
        fi
        if uses_redis "$scn" && [ -z "${REDIS_PID:-}" ] && ! start_redis; then
            note "$scn skipped: redis-server did not start"
            continue
        fi
        dir=$RUN/$scn
        write_conf "$scn" bench "$dir"
        if ! "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" \
             2> "$dir/test.log"
        then
            note "$scn skipped: nginx -t failed: $(grep emerg "$dir/test.log" \
                  | head -1)"
            continue
        fi
        live+=("$scn")
    done

    n=${#live[@]}
    [ "$n" -gt 0 ] || die "no scenario left to run"

    for ((r = 1; r <= ROUNDS; r++)); do
        # rotate the order each round: no scenario always runs first
        order=()
        for ((i = 0; i < n; i++)); do
            order+=("${live[$(( (i + r - 1) % n ))]}")
        done

        for scn in "${order[@]}"; do
            case $skip in *" $scn "*) continue ;; esac
            dir=$RUN/$scn
            wrk_mix "$scn"

            if uses_redis "$scn"; then redis_cli flushall >/dev/null; fi

            if ! start_nginx "$dir"; then
                note "$scn skipped: nginx did not start:" \
                     "$(tail -2 "$dir/error.log" "$dir/stderr.log" 2>/dev/null)"
                skip="$skip$scn "
                continue
            fi

            # warm-up: one full pass over the pre-built requests, so every
            # counter exists (and, for reject, is over its limit)
            wrk_run "$CONNECTIONS" 120s warmup=1 "$(workload "$scn")" \
                > "$dir/warmup.log" 2>&1 || true

            if ! check_scenario "$scn"; then
                stop_nginx
                note "$scn skipped from round $r on"
                skip="$skip$scn "
                continue
            fi

            redis=$(redis_pid "$scn")

            children_cpu "$RUN/times.0"
            t0="$(cpu_ticks "$WORKER_PID") $(cpu_ticks "$redis")"
            t0="$t0 $(seconds "$RUN/times.0") $(core_ticks)"
            res=$(wrk_run "$CONNECTIONS" "${DURATION}s" "$(workload "$scn")" 2>&1 \
                  | tee "$dir/wrk.$r.log" | grep '^BENCHRESULT' || true)
            children_cpu "$RUN/times.1"
            t1="$(cpu_ticks "$WORKER_PID") $(cpu_ticks "$redis")"
            t1="$t1 $(seconds "$RUN/times.1") $(core_ticks)"
            stop_nginx

            if [ -z "$res" ]; then
                note "$scn round $r: wrk gave no result"
                continue
            fi

            # a log line per request would be measured too: say so
            nlog=$(grep -c -v -e '\[notice\]' -e '\[info\]' "$dir/error.log" \
                   || true)
            case $scn in
            llmlimit-reject) ;;
            *)
                if [ "$nlog" -gt 0 ]; then
                    note "$scn round $r: $nlog error.log lines:" \
                         "$(grep -v -e '\[notice\]' -e '\[info\]' \
                            "$dir/error.log" | tail -1 | cut -c1-200)"
                fi
                ;;
            esac
            : > "$dir/error.log"

            # nginx, redis (ticks), wrk (s), both cores busy, steal (ticks)
            perl -e '
                my ($r, $scn, $res, $t0, $t1, $hz, $load) = @ARGV;
                my %f = $res =~ /(\w+)=([\d.]+)/g;
                my @a = split " ", $t0;
                my @b = split " ", $t1;
                my @d = map { $b[$_] - $a[$_] } 0 .. 4;
                my $s = $f{duration_us} / 1e6;
                my $n = $f{requests} || 1;
                my ($ngx, $red, $wrk) = ($d[0] / $hz, $d[1] / $hz, $d[2]);
                my $other = $d[3] / $hz - $ngx - $red - $wrk;
                $other = 0 if $other < 0;
                printf "%d\t%s\t%.0f\t%d\t%d\t%d\t%d\t%d\t%d\t%d"
                    . "\t%.1f\t%.2f\t%.1f\t%.2f\t%.1f\t%.1f\t%.1f\t%s\t%.2f\n",
                    $r, $scn, $f{requests} / $s, $f{p50_us}, $f{p90_us},
                    $f{p99_us}, $f{p999_us}, $f{requests}, $f{non2xx},
                    $f{connect_errors} + $f{read_errors} + $f{write_errors}
                        + $f{timeouts},
                    100 * $ngx / $s, 1e6 * $ngx / $n,
                    100 * $red / $s, 1e6 * ($ngx + $red) / $n,
                    100 * $wrk / $s, 100 * $other / $s,
                    100 * $d[4] / $hz / $s, $load, 1e6 * $red / $n;
            ' "$r" "$scn" "$res" "$t0" "$t1" "$HZ" \
              "$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' /)" \
              | tee -a "$OUT/raw.tsv" | awk -F'\t' '{
                  printf "bench: round %s %-16s %6s req/s  p50 %5.2f ms" \
                         "  p99 %6.2f ms  cpu: nginx %s%% redis %s%%" \
                         " wrk %s%% other %s%%  redis %s us/req\n",
                         $1, $2, $3, $4 / 1000, $6 / 1000, $11, $13, $15,
                         $16, $19 }' >&2
        done
    done

    summarize
}


summarize() {
    perl - "$OUT/raw.tsv" "$OUT/summary.dat" > "$OUT/summary.md" <<'EOF'
use strict;
use warnings;

my ($raw, $dat) = @ARGV;
my (%rows, %round, @order);

open my $in, '<', $raw or die "$raw: $!";
<$in>;
while (<$in>) {
    chomp;
    my @f = split /\t/;
    my %row;
    @row{qw(round scn rps p50 p90 p99 p999 requests non2xx sockerr cpu
            ngxreq rcpu cpureq wrk other steal load redisreq)} = @f;
    push @order, $row{scn} unless $rows{$row{scn}};
    push @{ $rows{$row{scn}} }, \%row;
    $round{$row{round}}{$row{scn}} = \%row;
}
close $in;

sub median {
    my @v = sort { $a <=> $b } grep { defined } @_;
    return undef unless @v;
    return @v % 2 ? $v[$#v / 2] : ($v[@v / 2 - 1] + $v[@v / 2]) / 2;
}

my @sorted = grep { $rows{$_} }
             qw(bare limit_req llmlimit-shm llmlimit-shm-keys
                llmlimit-shm-usage llmlimit-redis llmlimit-redis-sync
                llmlimit-reject
                llmlimit-reject-quiet llmlimit-reject-logall
                llmlimit-body llmlimit-tokens llmlimit-body-64k
                llmlimit-tokens-64k
                distinct-bare distinct-shm distinct-redis distinct-lua);
my %known = map { $_ => 1 } @sorted;
push @sorted, grep { !$known{$_} } @order;

print "| scenario | req/s | p50 ms | p99 ms | ratio to bare | non-2xx"
    . " | nginx CPU | server CPU us/req | CPU ratio | redis CPU us/req"
    . " | wrk CPU | other load |\n";
print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";

open my $out, '>', $dat or die "$dat: $!";
print $out "# scenario rps p50_ms p99_ms ratio\n";

# each workload's scenarios against its own bare run: distinct-* against
# distinct-bare, the others against bare
sub base { return $_[0] =~ /^distinct-/ ? "distinct-bare" : "bare"; }

my %bare_cpureq;
for my $b (qw(bare distinct-bare)) {
    $bare_cpureq{$b} = median(map { $_->{cpureq} } @{ $rows{$b} })
        if $rows{$b};
}

for my $scn (@sorted) {
    my $base = base($scn);
    my $bare_cpureq = $bare_cpureq{$base};
    my $r = $rows{$scn};
    my $rps = median(map { $_->{rps} } @$r);
    my $p50 = median(map { $_->{p50} } @$r) / 1000;
    my $p99 = median(map { $_->{p99} } @$r) / 1000;
    my $cpu = median(map { $_->{cpu} } @$r);
    my $cpureq = median(map { $_->{cpureq} } @$r);
    my ($req, $bad) = (0, 0);
    for (@$r) { $req += $_->{requests}; $bad += $_->{non2xx}; }

    # the median of the per-round ratios: each pairs runs minutes apart
    my @ratios;
    for my $n (keys %round) {
        my ($s, $b) = ($round{$n}{$scn}, $round{$n}{$base});
        push @ratios, $s->{rps} / $b->{rps} if $s && $b && $b->{rps};
    }
    my $ratio = median(@ratios);
    my $cpuratio = $bare_cpureq && $cpureq ? $bare_cpureq / $cpureq : undef;
    my $wrk = median(map { $_->{wrk} } @$r);
    my $other = median(map { $_->{other} } @$r);
    my $redisreq = median(map { $_->{redisreq} } @$r);

    printf "| %s | %.0f | %.2f | %.2f | %s | %s | %.0f%% | %.2f | %s | %s"
        . " | %.0f%% | %.0f%% |\n",
        $scn, $rps, $p50, $p99,
        defined $ratio ? sprintf("%.3f", $ratio) : "-",
        $req ? sprintf("%.1f%%", 100 * $bad / $req) : "-",
        $cpu, $cpureq,
        defined $cpuratio ? sprintf("%.3f", $cpuratio) : "-",
        $redisreq ? sprintf("%.2f", $redisreq) : "-",
        $wrk, $other;
    printf $out "%s %.0f %.3f %.3f %s\n", $scn, $rps, $p50, $p99,
        defined $ratio ? sprintf("%.3f", $ratio) : "NaN";
}
close $out;
EOF
}


# --- part 2: identities held per MB of zone ------------------------------

fill() {
    local dir=$RUN/fill first second held mb evicted

    if [ ! -f "$MODULE" ]; then
        note "fill skipped: no module at $MODULE"
        return
    fi

    echo "bench: fill: $FILL_IDS identities into a $FILL_ZONE zone" >&2
    write_conf fill bench "$dir"
    if ! start_nginx "$dir"; then
        note "fill skipped: nginx did not start: $(tail -1 "$dir/error.log")"
        return
    fi

    # every identity once (each passes, the zone evicts the oldest when
    # full), then every identity again, newest first: an identity still held
    # is over its 1/1h limit (429); the first one not held passes and from
    # then on only evicts identities already checked.
    first=$(perl "$BENCH/fill.pl" "$PORT" "$FILL_IDS" forward)
    second=$(perl "$BENCH/fill.pl" "$PORT" "$FILL_IDS" reverse)
    stop_nginx

    held=$(printf '%s\n' "$second" | field s429)
    mb=$(perl -e '
        my $s = shift;
        my %u = (k => 1 / 1024, m => 1, g => 1024);
        $s =~ /^(\d+)([kmg]?)$/i or die "bad size $s\n";
        print $1 * ($2 ? $u{lc $2} : 1 / 1048576);
    ' "$FILL_ZONE")
    evicted=$(grep -ci 'evict\|full' "$dir/error.log" || true)

    {
        echo "zone $FILL_ZONE, rule fill * * \$http_x_api_key 1/1h"
        echo "pass 1 (ids 1..$FILL_IDS): $first"
        echo "pass 2 (ids $FILL_IDS..1): $second"
        echo "identities held: $held"
        echo "identities per MB: $(perl -e 'printf "%.0f", $ARGV[0] / $ARGV[1]' \
             "${held:-0}" "$mb")"
        echo "zone-full log lines: $evicted"
        if [ "${held:-0}" -ge "$FILL_IDS" ]; then
            echo "note: every identity was held; raise BENCH_FILL_IDS"
        fi
    } | tee "$OUT/fill.txt" >&2
}


# --- part 3: instructions per request (callgrind) ------------------------

callgrind() {
    local scn dir pid res n ir reqs

    command -v valgrind >/dev/null || { note "callgrind skipped: no valgrind"; return; }

    echo "bench: callgrind: $CG_REQUESTS requests per scenario, 1 connection" >&2
    mkdir -p "$OUT/callgrind"
    printf 'scenario\trequests\tinstructions\tIr_per_request\n' \
        > "$OUT/callgrind.tsv"

    for scn in $SCENARIOS; do
        if uses_module "$scn" && [ ! -f "$MODULE" ]; then continue; fi
        # LuaJIT's machine code is not what valgrind measures well
        if [ "$scn" = distinct-lua ]; then continue; fi
        if uses_redis "$scn"; then
            if ! redis_cli ping >/dev/null 2>&1 && ! start_redis; then
                note "callgrind $scn skipped: redis-server did not start"
                continue
            fi
            redis_cli flushall >/dev/null
        fi

        dir=$RUN/cg-$scn
        wrk_mix "$scn"
        write_conf "$scn" callgrind "$dir"
        if ! "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" \
                2> "$dir/test.log"
        then
            note "callgrind $scn skipped: nginx -t failed:" \
                 "$(grep emerg "$dir/test.log" | head -1)"
            continue
        fi

        taskset -c "$NGINX_CPU" valgrind --tool=callgrind \
            --callgrind-out-file="$dir/callgrind.out" \
            "$NGINX" -p "$dir" -c "$dir/nginx.conf" 2> "$dir/valgrind.log" &
        pid=$!
        PIDS+=("$pid")

        if ! wait_http "$pid" 600; then
            note "callgrind $scn: nginx did not start under valgrind"
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            forget "$pid"
            continue
        fi

        wrk_run 1 600s warmup=1 "$(workload "$scn")" > "$dir/warmup.log" 2>&1 \
            || true
        callgrind_control -z "$pid" > /dev/null
        res=$(wrk_run 1 600s stop="$CG_REQUESTS" "$(workload "$scn")" 2>&1 \
              | grep '^BENCHRESULT' || true)
        callgrind_control -d "$pid" > /dev/null
        kill -QUIT "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        forget "$pid"

        reqs=$(printf '%s\n' "$res" | field requests)
        ir=$(sed -n 's/^summary: //p' "$dir/callgrind.out.1" 2>/dev/null || true)
        if [ -z "$reqs" ] || [ -z "$ir" ] || [ "$reqs" = 0 ]; then
            note "callgrind $scn: no result"
            continue
        fi
        printf '%s\t%s\t%s\t%.0f\n' "$scn" "$reqs" "$ir" \
            "$(perl -e 'print $ARGV[0] / $ARGV[1]' "$ir" "$reqs")" \
            | tee -a "$OUT/callgrind.tsv" >&2

        cp "$dir/callgrind.out.1" "$OUT/callgrind/$scn.out"
        callgrind_annotate --inclusive=yes "$dir/callgrind.out.1" 2>/dev/null \
            | head -80 > "$OUT/callgrind/$scn.inclusive.txt" || true
        callgrind_annotate "$dir/callgrind.out.1" 2>/dev/null \
            | head -60 > "$OUT/callgrind/$scn.self.txt" || true

        # where the module's instructions go: its functions and the nginx
        # ones it calls, inclusive, per request
        callgrind_annotate --inclusive=yes --threshold=100 \
            "$dir/callgrind.out.1" 2>/dev/null \
            | perl -ne '
                BEGIN { $n = shift @ARGV; }
                next unless /^\s*([\d,]+) \(.*?\)\s+(\S+?):(\w+)(?: \[(.*)\])?$/;
                my ($ir, $fn, $obj) = ($1, $3, $4 // "");
                next unless $obj =~ /llmlimit/ || $fn =~ /^ngx_(log_error_core|vslprintf|http_send_header|http_output_filter)$/;
                next if $seen{$fn}++;
                $ir =~ tr/,//d;
                printf "%8.0f  %s\n", $ir / $n, $fn;
            ' "$reqs" > "$OUT/callgrind/$scn.per-request.txt" || true
    done

    perl -e '
        my (%ir, @order);
        <STDIN>;
        while (<STDIN>) {
            chomp;
            my ($s, $n, $i, $per) = split /\t/;
            $ir{$s} = $per;
            push @order, $s;
        }
        print "| scenario | instructions per request | over its bare |\n";
        print "|---|---:|---:|\n";
        for my $s (@order) {
            my $b = $s =~ /^distinct-/ ? "distinct-bare" : "bare";
            printf "| %s | %.0f | %s |\n", $s, $ir{$s},
                defined $ir{$b} ? sprintf("%+.0f", $ir{$s} - $ir{$b})
                                : "-";
        }
    ' < "$OUT/callgrind.tsv" > "$OUT/callgrind.md"
}


# --- part 4: chart -------------------------------------------------------

chart() {
    [ -s "$OUT/summary.dat" ] || return 0
    command -v gnuplot >/dev/null || { note "chart skipped: no gnuplot"; return; }
    gnuplot -e "datafile='$OUT/summary.dat'; outfile='$OUT/chart.png'" \
        "$BENCH/chart.gp" || note "gnuplot failed"
}


# --- main ----------------------------------------------------------------

need_packages wrk gnuplot-nox valgrind redis-server curl libnginx-mod-http-lua

port_free "$PORT" || die "port $PORT is in use (set BENCH_PORT)"

if [ ! -f "$MODULE" ] && [ "$(basename "$MODULE")" = ngx_http_llmlimit_module.so ]
then
    echo "bench: building $MODULE" >&2
    make -C "$ROOT" build BUILD="$(dirname "$MODULE")" >&2 \
        || note "module build failed: llmlimit scenarios skipped"
fi

mkdir -p "$OUT"
ln -sfn "$STAMP" "$RESULTS/latest"

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "command: BENCH_DURATION=$DURATION BENCH_ROUNDS=$ROUNDS" \
         "BENCH_CONNECTIONS=$CONNECTIONS BENCH_KEYS=$KEYS make bench"
    echo "nginx: $("$NGINX" -v 2>&1 | sed 's/.*: //')"
    echo "module: $MODULE"
    echo "wrk: $(wrk -v 2>&1 | head -1)"
    echo "cpu: $(nproc) x $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "kernel: $(uname -r)"
    echo "nginx + redis on CPU $NGINX_CPU, wrk on CPU $CLIENT_CPU"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/env.txt"

for part in $PARTS; do
    case $part in
    throughput) throughput ;;
    fill)       fill ;;
    callgrind)  callgrind ;;
    chart)      chart ;;
    *)          die "unknown part $part" ;;
    esac
done

echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"

{
    echo "# llmlimit benchmark $STAMP"
    echo
    sed 's/^/    /' "$OUT/env.txt"
    if [ -s "$OUT/summary.md" ]; then
        echo
        echo "## Throughput and latency ($ROUNDS rounds x ${DURATION}s," \
             "medians; ratio = median of per-round ratios to bare)"
        echo
        cat "$OUT/summary.md"
    fi
    if [ -s "$OUT/fill.txt" ]; then
        echo
        echo "## Identities held per MB of zone"
        echo
        sed 's/^/    /' "$OUT/fill.txt"
    fi
    if [ -s "$OUT/callgrind.md" ]; then
        echo
        echo "## Instructions per request (callgrind, $CG_REQUESTS requests)"
        echo
        cat "$OUT/callgrind.md"
        for f in "$OUT"/callgrind/llmlimit-*.per-request.txt \
                 "$OUT"/callgrind/distinct-*.per-request.txt; do
            [ -s "$f" ] || continue
            echo
            echo "$(basename "$f" .per-request.txt): inclusive instructions" \
                 "per request"
            echo
            head -15 "$f" | sed 's/^/    /'
        done
    fi
    if [ ${#NOTES[@]} -gt 0 ]; then
        echo
        echo "## Notes"
        echo
        printf -- '- %s\n' "${NOTES[@]}"
    fi
    echo
    echo "Numbers from a shared machine are noisy: compare ratios from one run," \
         "not absolute numbers across runs."
} > "$OUT/report.md"

echo
cat "$OUT/report.md"
echo
echo "bench: results in $OUT"
