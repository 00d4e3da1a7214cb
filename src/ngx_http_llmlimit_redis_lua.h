
/*
 * Copyright (C) llmlimit developers
 */


#ifndef _NGX_HTTP_LLMLIMIT_REDIS_LUA_H_INCLUDED_
#define _NGX_HTTP_LLMLIMIT_REDIS_LUA_H_INCLUDED_


/*
 * The Redis script: takes back the refund entries of a call, then checks
 * and counts the requests of one event-loop turn of a worker, in order,
 * each on its own: all counters of a request are checked, then all of them
 * are counted or none.  It mirrors src/ngx_http_llmlimit_algo.c line by
 * line; a change there must be made here too.
 *
 *   KEYS                         the f refund entries' keys, then the
 *                                counters' keys, request after request
 *   ARGV[1]                      the number of requests, m
 *   ARGV[1 + j]                  the number of counters of request j
 *   ARGV[m + 2]                  the number of refund entries, f
 *   ARGV[m + 5e - 2 .. m + 5e + 2]
 *                                refund entry e: kind, period, count,
 *                                Redis' time (ms) when it was counted, and
 *                                the amount (signed)
 *   ARGV[m + 5f + 4i - 1 .. m + 5f + 4i + 2]
 *                                counter i (as in KEYS): kind, period (ms),
 *                                count, cost
 *
 * The kind is the algorithm (0 sliding, 1 fixed, 2 gcra), + 4 for a token
 * budget, which may be overdrawn by up to one COUNT and whose sliding
 * window works in units below 2^21 ms (see src/ngx_http_llmlimit_algo.c).
 * A request fits a counter while max(cost, 1) fits, and counts its cost
 * (1 for a request limit, the estimate for a token budget).
 *
 * A refund entry, as algo_charge(): a negative amount takes back what was
 * counted (a refund: -cost; a token charge below the estimate): GCRA moves
 * the TAT back by as many emission intervals (no further than now); fixed
 * and sliding take it off the window the count went into if the counter
 * has not moved on from it since (the count is still in "cur").  A
 * positive amount charges tokens now, up to the overdraft's room.
 *
 * Returns { now, then request after request status, rejected_1,
 * remaining_1, reset_1, retry_1, ... }: Redis' time in ms (one TIME for
 * all), status 1 when some counter of the request is over its limit
 * (nothing of it counted), else 0.
 *
 * State per key, a string "ALGORITHM T CUR PREV" (T: window start in ms,
 * or the GCRA theoretical arrival time in microseconds), with a TTL at
 * which it is worth no more than a fresh one; keys no request counted are
 * not written.  Lua numbers are doubles: all values stay below 2^53
 * (counts below 2^29, token counts below 2^32).
 */

static const char  ngx_http_llmlimit_redis_lua[] =
"local floor, max, min = math.floor, math.max, math.min\n"
"local tm = redis.call('TIME')\n"
"local now = tonumber(tm[1]) * 1000 + floor(tonumber(tm[2]) / 1000)\n"
"local states, dirty, out = {}, {}, {}\n"
"\n"
"local function unit(P, tok)\n"
"  local u, lim = 1, tok and 2097152 or 16777216\n"
"  while floor(P / u) >= lim do u = u * 2 end\n"
"  return u\n"
"end\n"
"\n"
"local function load(key, a)\n"
"  local s = states[key]\n"
"  if s then return s end\n"
"  s = {key = key, a = a, t = 0, cur = 0, prev = 0}\n"
"  local v = redis.call('GET', key)\n"
"  if v then\n"
"    local va, t, cur, prev =\n"
"      string.match(v, '^(%d+) (%-?%d+) (%d+) (%d+)$')\n"
"    if va and tonumber(va) == a then\n"
"      s.t, s.cur, s.prev = tonumber(t), tonumber(cur), tonumber(prev)\n"
"    end\n"
"  end\n"
"  states[key] = s\n"
"  return s\n"
"end\n"
"\n"
"local function roll(s, a, P)\n"
"  if a == 2 then return end\n"
"  local w = now - now % P\n"
"  if w <= s.t then return end\n"
"  if a == 0 and w - s.t == P then s.prev = s.cur else s.prev = 0 end\n"
"  s.cur = 0\n"
"  s.t = w\n"
"end\n"
"\n"
"local function gnow(s, T, C, tok)\n"
"  return max(now * 1000, s.t - C * T * (tok and 2 or 1))\n"
"end\n"
"\n"
"local function remaining(s, a, P, C, tok)\n"
"  local used\n"
"  if a == 2 then\n"
"    local T = floor((P * 1000 + C - 1) / C)\n"
"    local us = gnow(s, T, C, tok)\n"
"    local tat = max(s.t, us)\n"
"    used = floor((tat - us + T - 1) / T)\n"
"  elseif a == 1 then\n"
"    used = s.cur\n"
"  else\n"
"    local u = unit(P, tok)\n"
"    local p = floor(P / u)\n"
"    local e = min(floor(max(now - s.t, 0) / u), p)\n"
"    used = s.cur + floor(s.prev * max(p - 1 - e, 0) / p)\n"
"  end\n"
"  if used >= C then return 0 end\n"
"  return C - used\n"
"end\n"
"\n"
"local function wait(s, a, P, C, tok, k)\n"
"  if k > C then return 0 end\n"
"  if a == 2 then\n"
"    local T = floor((P * 1000 + C - 1) / C)\n"
"    local us = gnow(s, T, C, tok)\n"
"    local tat = max(s.t, us)\n"
"    local w = tat + (k - C) * T - us\n"
"    if w <= 0 then return 0 end\n"
"    return floor((w + 999) / 1000)\n"
"  elseif a == 1 then\n"
"    if s.cur + k <= C then return 0 end\n"
"    return P - max(now - s.t, 0)\n"
"  end\n"
"  local u = unit(P, tok)\n"
"  local p = floor(P / u)\n"
"  local d = max(now - s.t, 0)\n"
"  local e = min(floor(d / u), p)\n"
"  local w\n"
"  if s.cur + k <= C then\n"
"    local K = C - s.cur - k\n"
"    if s.prev <= K then return 0 end\n"
"    w = p - floor(((K + 1) * p + s.prev - 1) / s.prev) - e\n"
"    if w <= 0 then return 0 end\n"
"  else\n"
"    local K = C - k\n"
"    w = p - e + p - floor(((K + 1) * p + s.cur - 1) / s.cur)\n"
"  end\n"
"  return w * u - d % u\n"
"end\n"
"\n"
"local nd = 0\n"
"\n"
"local function add(s, a, P, C, tok, k)\n"
"  if a == 2 then\n"
"    local T = floor((P * 1000 + C - 1) / C)\n"
"    local us = gnow(s, T, C, tok)\n"
"    local tat = max(s.t, us)\n"
"    if tok then k = min(k, 2 * C - floor((tat - us) / T)) end\n"
"    s.t = tat + k * T\n"
"  else\n"
"    roll(s, a, P)\n"
"    s.cur = min(s.cur + k, tok and 2 * C or 4294967295)\n"
"  end\n"
"end\n"
"\n"
"local function touch(s, P)\n"
"  if not s.P then\n"
"    s.P = P\n"
"    nd = nd + 1\n"
"    dirty[nd] = s\n"
"  end\n"
"end\n"
"\n"
"local m = tonumber(ARGV[1])\n"
"local f = tonumber(ARGV[m + 2])\n"
"local ki, ai, o = f, m + 2 + 5 * f, 1\n"
"local cs, ca, cP, cC, ct, ck = {}, {}, {}, {}, {}, {}\n"
"out[1] = now\n"
"\n"
"for e = 1, f do\n"
"  local b = m + 5 * e - 2\n"
"  local a = tonumber(ARGV[b])\n"
"  local P = tonumber(ARGV[b + 1])\n"
"  local C = tonumber(ARGV[b + 2])\n"
"  local tc = tonumber(ARGV[b + 3])\n"
"  local k = tonumber(ARGV[b + 4])\n"
"  local tok = a >= 4\n"
"  if tok then a = a - 4 end\n"
"  local s = load(KEYS[e], a)\n"
"  if k > 0 then\n"
"    add(s, a, P, C, tok, k)\n"
"    touch(s, P)\n"
"  elseif a == 2 then\n"
"    if k < 0 and s.t > now * 1000 then\n"
"      local T = floor((P * 1000 + C - 1) / C)\n"
"      s.t = max(s.t - min(-k, C) * T, now * 1000)\n"
"      touch(s, P)\n"
"    end\n"
"  elseif k < 0 and s.cur > 0 and s.t == tc - tc % P then\n"
"    s.cur = s.cur - min(-k, s.cur)\n"
"    touch(s, P)\n"
"  end\n"
"end\n"
"\n"
"for j = 1, m do\n"
"  local n = tonumber(ARGV[1 + j])\n"
"  out[o + 1] = 0\n"
"\n"
"  for i = 1, n do\n"
"    local a = tonumber(ARGV[ai + 4 * i - 3])\n"
"    local P = tonumber(ARGV[ai + 4 * i - 2])\n"
"    local C = tonumber(ARGV[ai + 4 * i - 1])\n"
"    local k = tonumber(ARGV[ai + 4 * i])\n"
"    local tok = a >= 4\n"
"    if tok then a = a - 4 end\n"
"    local need = min(max(k, 1), C)\n"
"    local s = load(KEYS[ki + i], a)\n"
"    roll(s, a, P)\n"
"    local r = remaining(s, a, P, C, tok)\n"
"    local rej, retry = 0, 0\n"
"    if r < need then\n"
"      rej, retry = 1, wait(s, a, P, C, tok, need)\n"
"      out[o + 1] = 1\n"
"    end\n"
"    cs[i], ca[i], cP[i], cC[i], ct[i], ck[i] = s, a, P, C, tok, k\n"
"    out[o + 4 * i - 2] = rej\n"
"    out[o + 4 * i - 1] = r\n"
"    out[o + 4 * i] = 0\n"
"    out[o + 4 * i + 1] = retry\n"
"  end\n"
"\n"
"  if out[o + 1] == 1 then\n"
"    for i = 1, n do\n"
"      if out[o + 4 * i - 2] == 1 then\n"
"        out[o + 4 * i] = out[o + 4 * i + 1]\n"
"      else\n"
"        out[o + 4 * i] = wait(cs[i], ca[i], cP[i], cC[i], ct[i],\n"
"                              out[o + 4 * i - 1] + 1)\n"
"      end\n"
"    end\n"
"  else\n"
"    for i = 1, n do\n"
"      local s, a, P, C, tok = cs[i], ca[i], cP[i], cC[i], ct[i]\n"
"      if ck[i] > 0 then add(s, a, P, C, tok, ck[i]) end\n"
"      local r = remaining(s, a, P, C, tok)\n"
"      out[o + 4 * i - 1] = r\n"
"      out[o + 4 * i] = wait(s, a, P, C, tok, r + 1)\n"
"      touch(s, P)\n"
"    end\n"
"  end\n"
"\n"
"  ki, ai, o = ki + n, ai + 4 * n, o + 1 + 4 * n\n"
"end\n"
"\n"
"for i = 1, nd do\n"
"  local s = dirty[i]\n"
"  local key, a, P = s.key, s.a, s.P\n"
"  local e\n"
"  if a == 2 then\n"
"    e = floor((s.t + 999) / 1000)\n"
"  elseif a == 1 then\n"
"    e = s.t + P\n"
"  else\n"
"    e = s.t + 2 * P\n"
"  end\n"
"  redis.call('SET', key,\n"
"    string.format('%d %.0f %.0f %.0f', a, s.t, s.cur, s.prev),\n"
"    'PX', max(e - now, 1))\n"
"end\n"
"\n"
"return out\n";


#endif /* _NGX_HTTP_LLMLIMIT_REDIS_LUA_H_INCLUDED_ */
