-- wrk script for the llmlimit benchmarks (bench/run.sh).
--
-- init() pre-builds every request once, with wrk.format(), into an array;
-- request() only hands out the next string, round-robin.  Building the
-- request per call would make wrk, not nginx, the bottleneck.
--
-- The mix walks the LangSmith table (bench/langsmith.rules): one request
-- type per row, methods and paths as the rows name them, spread over
-- BENCH_KEYS API keys (x-api-key), a few user ids (x-user-id, the
-- "x-user-id + IP" rows) and key-less requests (the IP rows).
--
-- Arguments (after "--" on the wrk command line), all optional:
--   keys=N     distinct API keys / user ids            (default 10000)
--   stop=N     stop after N responses (callgrind runs)  (default: run -d)
--   warmup=1   stop after one pass over all pre-built requests
--   size=N     number of pre-built requests  (default: every key x type
--              pair, capped at 100000)
--   pipeline=N send N requests per write (default 1: no pipelining)
--   distinct=1 the "distinct" workload instead of the mix: every request is
--              POST /runs/query with its own x-api-key, key after key, so
--              no two requests in flight share a counter (size: keys)
--   chat=1     the LLM mix instead: GET /v1/chat/completions with an API
--              key, for the token-budget scenarios

local types = {
    -- method     path                            identity
    { "OPTIONS", "/runs/query",                   "key"  },
    { "GET",     "/info",                         "key"  },
    { "POST",    "/api/v1/metadata/submit",       "key"  },
    { "POST",    "/auth",                         "key"  },
    { "POST",    "/auth",                         "user" },
    { "POST",    "/v1/beacon",                    "none" },
    { "GET",     "/repos/acme/prompt-%d",         "key"  },
    { "POST",    "/runs/batch",                   "key"  },
    { "POST",    "/otel/v1/traces",               "key"  },
    { "POST",    "/api/v1/charts/section/%u",     "key"  },
    { "POST",    "/runs/multipart",               "key"  },
    { "POST",    "/runs/query",                   "key"  },
    { "POST",    "/runs/query",                   "user" },
    { "POST",    "/generate",                     "key"  },
    { "GET",     "/commits/acme/prompt-%d",       "key"  },
    { "DELETE",  "/sessions/%u",                  "key"  },
    { "POST",    "/webhooks/%u/trigger",          "key"  },
    { "POST",    "/runs",                         "key"  },
    { "PATCH",   "/runs/%u",                      "key"  },
    { "POST",    "/feedback",                     "key"  },
    { "GET",     "/runs/%u",                      "key"  },
    { "GET",     "/api/v1/runs/%u",               "key"  },
    { "GET",     "/datasets/%u/examples",         "key"  },
    { "GET",     "/public/download",              "none" },
    { "GET",     "/runs/stats",                   "key"  },
    { "GET",     "/sessions",                     "key"  },
    { "GET",     "/workspaces/current",           "user" },
    { "GET",     "/",                             "none" },
}

local reqs    = {}
local nreqs   = 0
local idx     = 0
local stop    = 0
local seen    = 0
local bad     = 0


local function gcd(a, b)
    while b ~= 0 do
        a, b = b, a % b
    end
    return a
end


local function uuid(n)
    return string.format("%08x-%04x-4%03x-8%03x-%012x",
                         n, n % 65536, n % 4096, (n * 7) % 4096, n * 13)
end


local function build(keys, size, pipeline, distinct)
    local ntypes = #types
    local batch = {}

    if distinct then
        types = { { "POST", "/runs/query", "key" } }
        ntypes = 1
        if size == 0 then
            size = keys
        end
    end

    if size == 0 then
        size = keys * ntypes / gcd(keys, ntypes)
        if size > 100000 then
            size = 100000
        end
    end

    for j = 0, size - 1 do
        local t = types[j % ntypes + 1]
        local k = j % keys
        local path = t[2]:gsub("%%d", tostring(k)):gsub("%%u", uuid(j))
        local headers = { ["Host"] = "api.bench.test",
                          ["User-Agent"] = "llmlimit-bench" }

        if t[3] == "key" then
            -- bench/run.sh's KEY_FORMAT: its key directory holds these
            headers["x-api-key"] =
                string.format("lsv2_pt_%08d5f3c9e1a2b7d4c6e8f0a1b2c3d4e5f_b",
                              k)
        elseif t[3] == "user" then
            headers["x-user-id"] = uuid(k + 1000000)
        end

        batch[#batch + 1] = wrk.format(t[1], path, headers)
        if #batch == pipeline then
            nreqs = nreqs + 1
            reqs[nreqs] = table.concat(batch)
            batch = {}
        end
    end

    return size - #batch
end


function init(args)
    local keys = 10000
    local size = 0
    local pipeline = 1
    local warmup = false
    local distinct = false
    local n

    for _, a in ipairs(args) do
        local name, value = a:match("^(%w+)=(%d+)$")
        if name == "keys" then
            keys = tonumber(value)
        elseif name == "stop" then
            stop = tonumber(value)
        elseif name == "size" then
            size = tonumber(value)
        elseif name == "pipeline" then
            pipeline = math.max(1, tonumber(value))
        elseif name == "warmup" then
            warmup = value ~= "0"
        elseif name == "distinct" then
            distinct = value ~= "0"
        elseif name == "chat" then
            if value ~= "0" then
                types = { { "GET", "/v1/chat/completions", "key" } }
            end
        else
            error("requests.lua: unknown argument " .. a)
        end
    end

    n = build(keys, size, pipeline, distinct)

    if warmup then
        stop = n
    end

    if stop > 0 then
        -- only defined when asked: a response() callback makes wrk parse
        -- every response into Lua, which costs wrk time.  wrk's main thread
        -- sleeps for the whole -d whatever the threads do, so stopping the
        -- thread is not enough: print the count and leave.
        response = function(status)
            seen = seen + 1
            if status < 200 or status > 399 then
                bad = bad + 1
            end
            if seen >= stop then
                io.write(string.format(
                    "BENCHRESULT requests=%d non2xx=%d stopped=1\n",
                    seen, bad))
                io.flush()
                os.exit(0)
            end
        end
    end
end


function request()
    idx = idx + 1
    if idx > nreqs then
        idx = 1
    end
    return reqs[idx]
end


function done(summary, latency, requests)
    local e = summary.errors

    io.write(string.format(
        "BENCHRESULT requests=%d duration_us=%d bytes=%d non2xx=%d"
        .. " connect_errors=%d read_errors=%d write_errors=%d timeouts=%d"
        .. " p50_us=%d p90_us=%d p99_us=%d p999_us=%d mean_us=%.1f"
        .. " max_us=%d\n",
        summary.requests, summary.duration, summary.bytes, e.status,
        e.connect, e.read, e.write, e.timeout,
        latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency:percentile(99.9),
        latency.mean, latency.max))
end
