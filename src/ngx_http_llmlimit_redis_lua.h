
/*
 * Copyright (C) llmlimit developers
 */


#ifndef _NGX_HTTP_LLMLIMIT_REDIS_LUA_H_INCLUDED_
#define _NGX_HTTP_LLMLIMIT_REDIS_LUA_H_INCLUDED_


/*
 * The Redis script: applies the charge entries of a call, then checks and
 * counts the requests of one event-loop turn of a worker, in order, each
 * on its own: all counters of a request are checked, then all of them are
 * counted or none.  The arithmetic mirrors src/ngx_http_llmlimit_algo.c;
 * a change there must be made here too.
 *
 *   KEYS                      the f entries' keys, then the counters' keys,
 *                             request after request: PREFIX{HASH}:PERIOD
 *                             ("t" after it for a token budget)
 *   ARGV[1], [2], [3]         m requests, L limits, f entries
 *   ARGV[4l .. 4l + 3]        limit l: kind (the algorithm, 0 sliding,
 *                             1 fixed, 2 gcra, + 4 for a token budget),
 *                             period (ms), count, cost (what a counter of
 *                             this limit counts: 1 a request, a token
 *                             budget its estimate, maybe 0)
 *   ARGV[B + 3e - 2 .. 3e]    entry e (B = 3 + 4L): limit, amount (signed),
 *                             and Redis' time (ms) of the count it corrects
 *   ARGV[B + 3f + 1]          m bytes: byte j is the number of counters of
 *                             request j
 *   ARGV[B + 3f + 2]          a byte per counter (as in KEYS after the
 *                             entries): its limit - 1
 *
 * The calls of a worker share few distinct limits: each is sent once, and
 * the per-limit arithmetic (window, its key suffix, weights) is done once.
 * A counter costs one argument, its key; bytes, not numbers, say which
 * request and limit it belongs to (no string to number conversion).
 *
 * State.  fixed and sliding: one integer key per window, KEY:fINDEX or
 * KEY:sINDEX (INDEX = floor(now / PERIOD); the letter, so that a change of
 * algorithm starts afresh), INCRBY'd by the cost of each counted request,
 * created with a TTL at which it no longer matters (the end of the window,
 * or of the next for sliding: the "previous" count is the previous
 * window's key) and never rewritten but by INCRBY; gcra: KEY holds the
 * theoretical arrival time "T CUR", T + CUR / COUNT in units of u ms (see
 * src/ngx_http_llmlimit_algo.c: exact, no rounded emission interval).  All keys of a call are read
 * by one MGET; a request counted writes one command per counter: INCRBY,
 * or for a window's first count a SET with its TTL (gcra: a SET); a
 * rejected one writes nothing.
 *
 * Costs, as src/ngx_http_llmlimit_algo.c: a request fits a counter while
 * min(max(cost, 1), count) fits, and counts its cost.  A token budget may
 * be overdrawn: its state is written up to one more COUNT (a window's
 * count up to 2 COUNT, the TAT up to now + 2 PERIOD, and the TAT counts
 * as set by a clock stepped back only beyond that), and its sliding
 * window works in units below 2^21 ms, so that prev * units stays exact.
 *
 * An entry corrects a count: a negative amount takes back (a refund is
 * -cost; a token charge of a fixed or sliding budget takes its estimate
 * back, of a gcra one what it used below the estimate) from the window
 * the count went into if that window still counts (the current one, or
 * the previous for sliding), never below zero; gcra moves the TAT back by
 * up to COUNT intervals.  A positive amount (what a request used; for gcra
 * what it used above the estimate) is charged now, as a counted request
 * is, up to the overdraft's room.
 *
 * Returns { now, then request after request: status 0 (counted) with
 * remaining_i, reset_i per counter; or status 1 (some counter over its
 * limit, nothing counted) with rejected_i, remaining_i, reset_i, retry_i
 * per counter }: now is Redis' time in ms (one TIME for all).  Lua numbers
 * are doubles: all values stay below 2^53 (request counts below 2^29,
 * token counts below 2^32).
 */

static const char  ngx_http_llmlimit_redis_lua[] =
"local floor, max, min = math.floor, math.max, math.min\n"
"local call, tonumber, byte = redis.call, tonumber, string.byte\n"
"local tm = call('TIME')\n"
"local now = tm[1] * 1000 + floor(tm[2] / 1000)\n"
"local m, L, f = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])\n"
"local la, lP, lC, lk, ln, lt, lr, lm = {}, {}, {}, {}, {}, {}, {}, {}\n"
"local lw, lx, lu, lp, le, ld, lq, sc, sp = {}, {}, {}, {}, {}, {},\n"
"  {}, {}, {}\n"
"local lG = {}\n"
"\n"
"for l = 1, L do\n"
"  local b = 4 * l\n"
"  local a, P, C = tonumber(ARGV[b]), tonumber(ARGV[b + 1]),\n"
"    tonumber(ARGV[b + 2])\n"
"  local k, tok = tonumber(ARGV[b + 3]), a >= 4\n"
"  if tok then a = a - 4 end\n"
"  la[l], lP[l], lC[l], lk[l], ln[l] = a, P, C, ARGV[b + 3], k\n"
"  lt[l], lr[l] = tok, min(max(k, 1), C)\n"
"  lm[l] = tok and 2 * C or 4294967295\n"
"  if a == 2 then\n"
"    local u, lim = 1, floor(2251799813685248 / C)\n"
"    while floor(P / u) >= lim do u = u * 2 end\n"
"    local p = floor(P / u)\n"
"    lu[l], lp[l], lx[l], lG[l] = u, p, floor(now / u), tok and 2 * p or p\n"
"  else\n"
"    local w = now - now % P\n"
"    local i = floor(now / P)\n"
"    local t = a == 0 and ':s' or ':f'\n"
"    lw[l], lx[l], sc[l], sp[l] = w, i, t .. i, t .. (i - 1)\n"
"    if a == 0 then\n"
"      local u = 1\n"
"      local lim = tok and 2097152 or 16777216\n"
"      while floor(P / u) >= lim do u = u * 2 end\n"
"      local p = floor(P / u)\n"
"      local e = min(floor((now - w) / u), p)\n"
"      lu[l], lp[l], le[l], ld[l], lq[l] = u, p, e, now - w, max(p - 1 - e, 0)\n"
"    end\n"
"  end\n"
"end\n"
"\n"
"local B = 3 + 4 * L\n"
"local ns, cs = ARGV[B + 3 * f + 1], ARGV[B + 3 * f + 2]\n"
"local nc = #cs\n"
"local cl = {byte(cs, 1, nc)}\n"
"local mk, nk, ek, ea, el, ck, pk = {}, 0, {}, {}, {}, {}, {}\n"
"\n"
"for e = 1, f do\n"
"  local l = tonumber(ARGV[B + 3 * e - 2])\n"
"  local amt = tonumber(ARGV[B + 3 * e - 1])\n"
"  local k = KEYS[e]\n"
"  if amt == 0 then\n"
"    k = nil\n"
"  elseif la[l] ~= 2 then\n"
"    local i = lx[l]\n"
"    if amt < 0 then\n"
"      i = floor(tonumber(ARGV[B + 3 * e]) / lP[l])\n"
"    end\n"
"    if i == lx[l] then\n"
"      k = k .. sc[l]\n"
"    elseif la[l] == 0 and i == lx[l] - 1 then\n"
"      k = k .. sp[l]\n"
"    else\n"
"      k = nil\n"
"    end\n"
"  end\n"
"  if k then\n"
"    nk = nk + 1\n"
"    mk[nk] = k\n"
"  end\n"
"  ek[e], ea[e], el[e] = k, amt, l\n"
"end\n"
"\n"
"for i = 1, nc do\n"
"  local l = cl[i] + 1\n"
"  local a, k = la[l], KEYS[f + i]\n"
"  cl[i] = l\n"
"  if a ~= 2 then\n"
"    k = k .. sc[l]\n"
"    if a == 0 then\n"
"      local kp = KEYS[f + i] .. sp[l]\n"
"      pk[i] = kp\n"
"      nk = nk + 1\n"
"      mk[nk] = kp\n"
"    end\n"
"  end\n"
"  ck[i] = k\n"
"  nk = nk + 1\n"
"  mk[nk] = k\n"
"end\n"
"\n"
"local v, vc = {}, {}\n"
"if nk > 0 then\n"
"  local r = call('MGET', unpack(mk))\n"
"  for i = 1, nk do\n"
"    local s = r[i]\n"
"    local x = tonumber(s)\n"
"    if not x and s then\n"
"      local t, c = string.match(s, '^(%-?%d+) (%d+)$')\n"
"      x, vc[mk[i]] = tonumber(t), tonumber(c)\n"
"    end\n"
"    v[mk[i]] = x or 0\n"
"  end\n"
"end\n"
"\n"
"local function px(e)\n"
"  return max(e - now, 1)\n"
"end\n"
"\n"
"local function ttl(l)\n"
"  if la[l] == 0 then return px(lw[l] + 2 * lP[l]) end\n"
"  return px(lw[l] + lP[l])\n"
"end\n"
"\n"
"local function add(k, l, x, c)\n"
"  local r = call('INCRBY', k, c)\n"
"  if x == 0 then call('PEXPIRE', k, ttl(l)) end\n"
"  v[k] = r\n"
"end\n"
"\n"
"local function debt(l, t, c)\n"
"  local d, g = t - lx[l], lG[l]\n"
"  if d < 0 then return lx[l], 0 end\n"
"  if d >= g then return t - g, g * lC[l] + c end\n"
"  return lx[l], d * lC[l] + c\n"
"end\n"
"\n"
"local function gset(k, l, b, x)\n"
"  local C = lC[l]\n"
"  local q = floor(x / C)\n"
"  local t, c = b + q, x - q * C\n"
"  call('SET', k, string.format('%.0f %.0f', t, c),\n"
"    'PX', px((t + (c > 0 and 1 or 0)) * lu[l]))\n"
"  v[k], vc[k] = t, c\n"
"  return t, c\n"
"end\n"
"\n"
"local function gadd(k, l, t, y, c)\n"
"  local b, x = debt(l, t, y)\n"
"  if lt[l] then\n"
"    c = min(c, lm[l] - floor(x / lp[l]))\n"
"    if c <= 0 then return t, y end\n"
"  end\n"
"  return gset(k, l, b, x + c * lp[l])\n"
"end\n"
"\n"
"local function used(l, x, y)\n"
"  local a = la[l]\n"
"  if a == 0 then\n"
"    local z = y * lq[l]\n"
"    return x + (z - z % lp[l]) / lp[l]\n"
"  elseif a == 1 then\n"
"    return x\n"
"  end\n"
"  local b, d = debt(l, x, y)\n"
"  return floor((d + lp[l] - 1) / lp[l])\n"
"end\n"
"\n"
"local function wait(l, x, y, n)\n"
"  local a, C = la[l], lC[l]\n"
"  if n > C then return 0 end\n"
"  if a == 2 then\n"
"    local b, d = debt(l, x, y)\n"
"    local w = d + (n - C) * lp[l]\n"
"    if w <= 0 then return 0 end\n"
"    return floor((w + C - 1) / C) * lu[l] - now % lu[l]\n"
"  elseif a == 1 then\n"
"    if x + n <= C then return 0 end\n"
"    return lP[l] - (now - lw[l])\n"
"  end\n"
"  local p, e, w = lp[l], le[l]\n"
"  if x + n <= C then\n"
"    local K = C - x - n\n"
"    if y <= K then return 0 end\n"
"    w = p - floor(((K + 1) * p + y - 1) / y) - e\n"
"    if w <= 0 then return 0 end\n"
"  else\n"
"    w = p - e + p - floor(((C - n + 1) * p + x - 1) / x)\n"
"  end\n"
"  return w * lu[l] - ld[l] % lu[l]\n"
"end\n"
"\n"
"for e = 1, f do\n"
"  local k, amt, l = ek[e], ea[e], el[e]\n"
"  if k then\n"
"    local x = v[k]\n"
"    if la[l] == 2 then\n"
"      local y = vc[k] or 0\n"
"      if amt > 0 then\n"
"        gadd(k, l, x, y, amt)\n"
"      elseif x >= lx[l] then\n"
"        gset(k, l, x, y - min(-amt, lC[l]) * lp[l])\n"
"      end\n"
"    elseif amt > 0 then\n"
"      amt = min(amt, lm[l] - x)\n"
"      if amt > 0 then add(k, l, x, amt) end\n"
"    elseif x > 0 then\n"
"      add(k, l, x, max(amt, -x))\n"
"    end\n"
"  end\n"
"end\n"
"\n"
"local out, o, c0, r = {now}, 1, 0, {}\n"
"\n"
"for j = 1, m do\n"
"  local n = byte(ns, j)\n"
"  local st = 0\n"
"  for i = c0 + 1, c0 + n do\n"
"    local l = cl[i]\n"
"    local y = 0\n"
"    if pk[i] then y = v[pk[i]]\n"
"    elseif la[l] == 2 then y = vc[ck[i]] or 0 end\n"
"    local u = lC[l] - used(l, v[ck[i]], y)\n"
"    if u < 0 then u = 0 end\n"
"    r[i] = u\n"
"    if u < lr[l] then st = 1 end\n"
"  end\n"
"  o = o + 1\n"
"  out[o] = st\n"
"  for i = c0 + 1, c0 + n do\n"
"    local l, k, u = cl[i], ck[i], r[i]\n"
"    local y = 0\n"
"    if pk[i] then y = v[pk[i]]\n"
"    elseif la[l] == 2 then y = vc[ck[i]] or 0 end\n"
"    local x, c = v[k], ln[l]\n"
"    if st == 1 then\n"
"      if u < lr[l] then\n"
"        local retry = wait(l, x, y, lr[l])\n"
"        out[o + 1], out[o + 2], out[o + 3], out[o + 4] =\n"
"          1, u, retry, retry\n"
"      else\n"
"        out[o + 1], out[o + 2], out[o + 3], out[o + 4] =\n"
"          0, u, wait(l, x, y, u + 1), 0\n"
"      end\n"
"      o = o + 4\n"
"    else\n"
"      if la[l] == 2 then\n"
"        x, y = gadd(k, l, x, y, c)\n"
"      else\n"
"        local d = lk[l]\n"
"        if lt[l] then\n"
"          c = min(c, lm[l] - x)\n"
"          d = c\n"
"        end\n"
"        if c > 0 then\n"
"          if x == 0 then\n"
"            call('SET', k, d, 'PX', ttl(l))\n"
"            x = c\n"
"          else\n"
"            x = call('INCRBY', k, d)\n"
"          end\n"
"          v[k] = x\n"
"        end\n"
"      end\n"
"      if lt[l] then\n"
"        u = max(lC[l] - used(l, x, y), 0)\n"
"      else\n"
"        u = u - c\n"
"      end\n"
"      out[o + 1], out[o + 2] = u, wait(l, x, y, u + 1)\n"
"      o = o + 2\n"
"    end\n"
"  end\n"
"  c0 = c0 + n\n"
"end\n"
"\n"
"return out\n";


#endif /* _NGX_HTTP_LLMLIMIT_REDIS_LUA_H_INCLUDED_ */
