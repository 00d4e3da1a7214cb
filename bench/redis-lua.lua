-- The Lua/Redis style the distinct-lua scenario measures (bench/run.sh):
-- what OpenResty-based gateways (Kong's "redis" policy, APISIX
-- limit-count with redis) do for a fixed-window request limit.  In
-- access_by_lua: one counter key per identity and window, INCR and EXPIRE
-- pipelined in one write on a pooled cosocket, the two replies read, 429
-- over the limit, X-RateLimit-Limit and -Remaining on the response.
--
-- Debian 12 ships libnginx-mod-http-lua but not lua-resty-redis, so the
-- few lines of RESP it needs are here.

local _M = {}

local tcp = ngx.socket.tcp
local floor = math.floor


-- one integer reply (":N\r\n"), or nil and an error
local function integer(sock)
    local line, err = sock:receive("*l")
    if not line then
        return nil, err
    end
    if line:byte(1) ~= 58 then          -- ':'
        return nil, "unexpected reply " .. line
    end
    return tonumber(line:sub(2))
end


local function command(...)
    local args = { ... }
    local out = { "*", #args, "\r\n" }
    for _, a in ipairs(args) do
        a = tostring(a)
        out[#out + 1] = "$"
        out[#out + 1] = #a
        out[#out + 1] = "\r\n"
        out[#out + 1] = a
        out[#out + 1] = "\r\n"
    end
    return table.concat(out)
end


-- identity: the counter's identity; limit per period seconds
function _M.check(host, port, identity, limit, period)
    local sock = tcp()
    sock:settimeout(50)

    local ok, err = sock:connect(host, port)
    if not ok then
        ngx.log(ngx.ERR, "redis connect: ", err)
        return                          -- fail open
    end

    local window = floor(ngx.now() / period)
    local key = "rl:" .. ngx.md5(identity) .. ":" .. period .. ":" .. window

    ok, err = sock:send(command("INCR", key) .. command("EXPIRE", key, period))
    if not ok then
        ngx.log(ngx.ERR, "redis send: ", err)
        sock:close()
        return
    end

    local count, e1 = integer(sock)
    local _, e2 = integer(sock)
    if not count or e2 then
        ngx.log(ngx.ERR, "redis reply: ", e1 or e2)
        sock:close()
        return
    end

    sock:setkeepalive(60000, 256)

    ngx.header["X-RateLimit-Limit"] = limit
    ngx.header["X-RateLimit-Remaining"] = count > limit and 0
                                          or limit - count

    if count > limit then
        return ngx.exit(429)
    end
end


return _M
