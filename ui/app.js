/*
 * llmlimit's Granular Usage page: the usage API (llmlimit_usage_api) as a
 * chart, a table of totals and a CSV export.  Plain browser JavaScript, no
 * build step, no library: the chart is SVG drawn here.
 *
 * The whole view lives in the page's query string (range, start, end, agg,
 * group_by, ws; api and timeout for deployments and tests), so a link
 * shows the same view and reloading restores it.
 */
(function () {
    'use strict';

    var HOUR = 3600e3, DAY = 24 * HOUR;
    var PRESETS = { '7d': 7, '30d': 30, '3m': 90, '6m': 182, '1y': 365 };
    var AGGS = { daily: DAY, weekly: 7 * DAY, monthly: 30 * DAY };
    var CHUNK = 28 * DAY;           /* well inside the API's daily stride */
    var MAX_BUCKETS = 400;
    var MAX_CHART_GROUPS = 8;       /* then "Other" in the chart */
    var COLORS = ['#4269d0', '#efb118', '#6cc5b0', '#3ca951', '#ff8ab7',
                  '#a463f2', '#97bbf5', '#9c6b4e'];
    var OTHER_COLOR = '#9498a0', REJECTED_COLOR = '#c2185b';
    var GROUPS = {
        workspace: { id: 'workspace_id', name: 'workspace_name',
                     title: 'Workspace' },
        project: { id: 'project_id', name: 'project_name',
                   title: 'Project' },
        user: { id: 'user_id', name: 'user_email', title: 'User' },
        api_key: { id: 'api_key_short_key', name: null, title: 'API key' }
    };
    var CSV_COLUMNS = ['Time Bucket Start', 'Time Bucket End',
        'Workspace ID', 'Workspace Name', 'Project ID', 'Project Name',
        'User ID', 'User Email', 'API Key Short Key', 'Requests', 'Rejected',
        'Tokens'];
    var CSV_FIELDS = ['workspace_id', 'workspace_name', 'project_id',
        'project_name', 'user_id', 'user_email', 'api_key_short_key'];

    var $ = function (id) { return document.getElementById(id); };

    var state = null;       /* the view, as read from the address */
    var loadSeq = 0;        /* the newest load; older answers are dropped */
    var current = null;     /* that load's AbortController and timer */
    var shown = null;       /* the data on screen, redrawn on resize */
    var blobUrl = null;
    var memo = {};          /* this load's API answers by query string */
    var workspaces = [];    /* [{id, name}] of the range */


    /* ---- the view in the address --------------------------------------- */

    function readState() {
        var q = new URLSearchParams(location.search);
        var s = {
            range: q.get('range') || '7d',
            start: q.get('start') || '',
            end: q.get('end') || '',
            agg: q.get('agg') || 'auto',
            group_by: q.get('group_by') || 'workspace',
            ws: (q.get('ws') || '').split(',').filter(Boolean),
            api: q.get('api') || '',
            timeout: Math.min(600, Math.max(1,
                                  parseFloat(q.get('timeout')) || 15))
        };
        if (s.range !== 'custom' && !PRESETS[s.range]) { s.range = '7d'; }
        if (s.agg !== 'auto' && !AGGS[s.agg]) { s.agg = 'auto'; }
        if (!GROUPS[s.group_by]) { s.group_by = 'workspace'; }
        return s;
    }

    /* the address, readable: times and id lists keep their ":" and "," */
    function stateQuery(s) {
        var q = [['range', s.range]];
        if (s.range === 'custom') {
            q.push(['start', s.start], ['end', s.end]);
        }
        q.push(['agg', s.agg], ['group_by', s.group_by]);
        if (s.ws.length) { q.push(['ws', s.ws.join(',')]); }
        if (s.api) { q.push(['api', s.api]); }
        if (s.timeout !== 15) { q.push(['timeout', String(s.timeout)]); }
        return '?' + q.map(function (kv) {
            return kv[0] + '=' + encodeURIComponent(kv[1])
                .replace(/%3A/g, ':').replace(/%2C/g, ',')
                .replace(/%2F/g, '/');
        }).join('&');
    }

    /* a control changed: a new history entry, then a new load */
    function navigate(change) {
        var s = Object.assign({}, state, change);
        history.pushState(null, '', stateQuery(s));
        state = s;
        showControls();
        load();
    }

    /* the usage API: a path on this origin only (a shared link must not
     * send the page's requests, with its cookies, elsewhere) */
    function apiBase() {
        var p = state.api || '../usage/';
        var u = new URL(p, location.href);
        if (u.origin !== location.origin) {
            u = new URL('../usage/', location.href);
        }
        if (!/\/$/.test(u.pathname)) { u.pathname += '/'; }
        u.search = '';
        u.hash = '';
        return u;
    }


    /* ---- time ----------------------------------------------------------- */

    function iso(ms) {
        return new Date(ms).toISOString().replace(/\.000Z$/, 'Z');
    }

    function parseTime(v) {
        if (!v) { return NaN; }
        /* a datetime-local value has no zone: it is UTC on this page */
        if (/^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?$/.test(v)) {
            v += 'Z';
        }
        return Date.parse(v);
    }

    /* [start, end) in ms: a preset ends at the next UTC midnight, so its
     * daily buckets are calendar days and the view is the same all day */
    function range(s) {
        if (s.range === 'custom') {
            return { start: parseTime(s.start), end: parseTime(s.end) };
        }
        var now = new Date();
        var end = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(),
                           now.getUTCDate() + 1);
        return { start: end - PRESETS[s.range] * DAY, end: end };
    }

    /* the API's stride for a range, as the seed's table says */
    function apiStride(ms) {
        var days = ms / DAY;
        if (days < 1) { return HOUR; }
        if (days <= 31) { return DAY; }
        if (days <= 93) { return 7 * DAY; }
        if (days <= 366) { return 30 * DAY; }
        return 365 * DAY;
    }

    function strideMs(st) {
        if (!st || typeof st !== 'object') { return NaN; }
        return (st.hours || 0) * HOUR + (st.days || 0) * DAY;
    }

    function strideName(ms) {
        return { 3600000: 'hourly', 86400000: 'daily', 604800000: 'weekly',
                 2592000000: 'monthly (30 days)',
                 31536000000: 'yearly (365 days)' }[ms]
               || (ms / DAY) + '-day';
    }

    function fmtBucket(ms, stride) {
        var d = new Date(ms);
        var o = { timeZone: 'UTC' };
        if (stride < DAY) {
            o.month = 'short'; o.day = 'numeric'; o.hour = '2-digit';
            o.minute = '2-digit'; o.hourCycle = 'h23';
        } else if (stride >= 365 * DAY) {
            o.year = 'numeric'; o.month = 'short';
        } else {
            o.month = 'short'; o.day = 'numeric';
        }
        return d.toLocaleString('en-GB', o);
    }

    function fmtDay(ms) {
        return new Date(ms).toLocaleString('en-GB', {
            timeZone: 'UTC', year: 'numeric', month: 'short', day: 'numeric',
            hour: '2-digit', minute: '2-digit', hourCycle: 'h23'
        }) + ' UTC';
    }

    function toLocalInput(ms) {
        return iso(ms).slice(0, 16);
    }


    /* ---- the API -------------------------------------------------------- */

    function ApiError(message, kind) {
        this.message = message;
        this.kind = kind;
    }

    function query(start, end, groupBy, ws) {
        var q = new URLSearchParams();
        q.set('start_time', iso(start));
        q.set('end_time', iso(end));
        if (ws && ws.length) { q.set('workspace_ids', ws.join(',')); }
        q.set('group_by', groupBy);
        return q.toString();
    }

    function explain(status, text, url) {
        var where = url.pathname;
        var j = null;
        try { j = JSON.parse(text); } catch (e) { j = null; }
        var err = j && j.error;
        if (status === 400) {
            if (err && err.message) {
                return 'The usage API refused the request (400)'
                    + (err.parameter ? ', parameter ' + err.parameter : '')
                    + ': ' + err.message;
            }
            return 'The usage API refused the request (400 Bad Request).';
        }
        if (status === 401) {
            return 'Not signed in (401): the usage API at ' + where
                + ' asks for credentials that this browser did not give.';
        }
        if (status === 403) {
            return 'Access denied (403): the usage API at ' + where
                + ' does not allow this client. Its nginx location decides'
                + ' who may read usage (allow/deny, auth_basic,'
                + ' auth_request); ask whoever runs it.';
        }
        if (status === 404) {
            return 'No usage API at ' + where + ' (404). The page expects'
                + ' a location with llmlimit_usage_api there, or an api='
                + ' parameter naming it.';
        }
        if (status >= 500) {
            return 'The usage API failed (HTTP ' + status + ') at ' + where
                + '. nginx\'s error log on the server says why.';
        }
        return 'Unexpected answer from the usage API at ' + where
            + ' (HTTP ' + status + ').';
    }

    function getJson(qs, signal) {
        if (!memo[qs]) { memo[qs] = fetchJson(qs, signal); }
        return memo[qs];
    }

    function fetchJson(qs, signal) {
        var url = new URL(apiBase().href);
        url.search = qs;
        return fetch(url.href, {
            signal: signal, credentials: 'same-origin',
            headers: { Accept: 'application/json' }
        }).then(function (r) {
            return r.text().then(function (text) {
                if (r.status !== 200) {
                    throw new ApiError(explain(r.status, text, url),
                                       'http-' + r.status);
                }
                var j = null;
                try { j = JSON.parse(text); } catch (e) { j = null; }
                if (!j || !Array.isArray(j.usage) || !j.stride) {
                    throw new ApiError('The usage API at ' + url.pathname
                        + ' answered with something that is not usage data.',
                        'bad-json');
                }
                return j;
            });
        }, function (e) {
            if (e && e.name === 'AbortError') { throw e; }
            throw new ApiError('Could not reach the usage API at '
                + url.pathname + ' (network error).', 'network');
        });
    }

    /* run fns (each returning a promise) at most n at a time, in order */
    function limited(fns, n) {
        var results = new Array(fns.length), next = 0;
        function worker() {
            if (next >= fns.length) { return Promise.resolve(); }
            var i = next++;
            return fns[i]().then(function (v) {
                results[i] = v;
                return worker();
            });
        }
        var ws = [];
        for (var k = 0; k < Math.min(n, fns.length); k++) {
            ws.push(worker());
        }
        return Promise.all(ws).then(function () { return results; });
    }

    /*
     * The buckets of the view: {buckets: [{start, end}], rows: [...],
     * stride, requests (how many API calls), csv: URL of the API's CSV or
     * null (the page writes it), truncated, retention_start}.
     */
    function fetchView(s, r, signal) {
        var span = r.end - r.start;
        var want = s.agg === 'auto' ? null : AGGS[s.agg];

        if (want === null || want === apiStride(span)) {
            var qs = query(r.start, r.end, s.group_by, s.ws);
            return getJson(qs, signal).then(function (j) {
                var st = strideMs(j.stride);
                if (want !== null && st !== want) {
                    /* the API bucketed otherwise: assemble instead */
                    return assemble(s, r, want, signal);
                }
                if (!(st > 0)) {
                    throw new ApiError('The usage API answered a stride the'
                        + ' page does not know: '
                        + JSON.stringify(j.stride), 'bad-json');
                }
                var csv = new URL(apiBase().href + 'export.csv');
                csv.search = qs;
                return view(r, st, j.usage, 1, csv.href, j);
            });
        }
        return assemble(s, r, want, signal);
    }

    function assemble(s, r, want, signal) {
        var n = Math.ceil((r.end - r.start) / want);
        if (n > MAX_BUCKETS) {
            return Promise.reject(new ApiError(n + ' ' + strideName(want)
                + ' buckets are too many to draw for this range (at most '
                + MAX_BUCKETS + '): pick a coarser aggregation or a shorter'
                + ' range.', 'too-many'));
        }
        var fns = [];
        for (var t = r.start; t < r.end; t += CHUNK) {
            (function (a, b) {
                fns.push(function () {
                    return getJson(query(a, b, s.group_by, s.ws), signal);
                });
            })(t, Math.min(t + CHUNK, r.end));
        }
        return limited(fns, 3).then(function (parts) {
            var sums = {}, rows = [], truncated = null;
            parts.forEach(function (j) {
                if (strideMs(j.stride) > DAY) {
                    throw new ApiError('The usage API answered '
                        + JSON.stringify(j.stride) + ' buckets for a piece'
                        + ' of at most 28 days; the page cannot split them'
                        + ' into days.', 'bad-json');
                }
                if (j.truncated && !truncated) { truncated = j; }
                j.usage.forEach(function (u) {
                    var t0 = Date.parse(u.time_bucket_start);
                    var i = Math.floor((t0 - r.start) / want);
                    var key = i + '\u0000' + groupId(s.group_by, u);
                    var row = sums[key];
                    if (!row) {
                        row = sums[key] = Object.assign({}, u, {
                            time_bucket_start: iso(r.start + i * want),
                            time_bucket_end: iso(Math.min(
                                r.start + (i + 1) * want, r.end)),
                            requests: 0, rejected: 0, tokens: 0
                        });
                        rows.push(row);
                    }
                    row.requests += u.requests || 0;
                    row.rejected += u.rejected || 0;
                    row.tokens += u.tokens || 0;
                });
            });
            return view(r, want, rows, parts.length, null,
                        truncated || {});
        });
    }

    function view(r, stride, rows, requests, csv, j) {
        var buckets = [];
        for (var t = r.start; t < r.end; t += stride) {
            buckets.push({ start: t, end: Math.min(t + stride, r.end) });
        }
        return { buckets: buckets, rows: rows, stride: stride,
                 requests: requests, csv: csv, range: r,
                 truncated: !!j.truncated,
                 retention_start: j.retention_start };
    }

    function groupId(groupBy, u) {
        var v = u[GROUPS[groupBy].id];
        return v === undefined || v === null ? '' : String(v);
    }


    /* ---- loading -------------------------------------------------------- */

    function setStatus(kind, message, retry) {
        var el = $('status');
        el.dataset.state = kind;
        delete el.dataset.kind;
        el.className = 'status ' + kind;
        el.textContent = '';
        if (kind === 'loading') {
            var sp = document.createElement('span');
            sp.className = 'spinner';
            sp.setAttribute('aria-hidden', 'true');
            el.appendChild(sp);
        }
        var p = document.createElement('span');
        p.className = 'message';
        p.textContent = message;
        el.appendChild(p);
        if (retry) {
            var b = document.createElement('button');
            b.type = 'button';
            b.textContent = 'Try again';
            b.addEventListener('click', load);
            el.appendChild(b);
        }
    }

    function load() {
        var s = state, r = range(s), seq = ++loadSeq;

        if (current) {
            current.ctl.abort();
            clearTimeout(current.timer);
        }
        $('result').hidden = true;
        shown = null;

        if (isNaN(r.start) || isNaN(r.end) || r.end <= r.start) {
            setStatus('error', isNaN(r.start) || isNaN(r.end)
                      ? 'Pick a start and an end for the custom range.'
                      : 'The end of the range must be after its start.',
                      false);
            return;
        }

        var ctl = new AbortController();
        var timedOut = false;
        memo = {};
        var timer = setTimeout(function () {
            timedOut = true;
            ctl.abort();
        }, s.timeout * 1000);
        current = { ctl: ctl, timer: timer };
        document.body.dataset.loads = String(seq);

        setStatus('loading', 'Loading usage from ' + fmtDay(r.start)
                  + ' to ' + fmtDay(r.end) + '…', false);

        /* the workspace list: the range's usage by workspace, unfiltered */
        var wsQs = query(r.start, r.end, 'workspace', []);
        var wsList = getJson(wsQs, ctl.signal);

        Promise.all([wsList, fetchView(s, r, ctl.signal)]).then(function (a) {
            if (seq !== loadSeq) { return; }
            clearTimeout(timer);
            fillWorkspaces(a[0].usage);
            render(a[1]);
        }).catch(function (e) {
            if (seq !== loadSeq) { return; }
            clearTimeout(timer);
            if (timedOut) {
                setStatus('error', 'The usage API did not answer within '
                    + s.timeout + ' s (' + apiBase().pathname + '). It may be'
                    + ' busy or the range too long: try again, or a shorter'
                    + ' range.', true);
            } else if (e instanceof ApiError) {
                setStatus('error', e.message, true);
                $('status').dataset.kind = e.kind;
            } else if (e && e.name === 'AbortError') {
                /* replaced by a newer load */
            } else {
                setStatus('error', 'The page failed to show this usage: '
                    + (e && e.message ? e.message : String(e)), true);
            }
        });
    }


    /* ---- workspaces ------------------------------------------------------ */

    function fillWorkspaces(rows) {
        var seen = {};
        workspaces = [];
        rows.forEach(function (u) {
            var id = u.workspace_id || '';
            if (!seen.hasOwnProperty(id)) {
                seen[id] = true;
                workspaces.push({ id: id, name: u.workspace_name || '' });
            }
        });
        state.ws.forEach(function (id) {
            if (!seen.hasOwnProperty(id)) {
                seen[id] = true;
                workspaces.push({ id: id, name: '', absent: true });
            }
        });
        workspaces.sort(function (a, b) {
            return (a.name || a.id).localeCompare(b.name || b.id);
        });
        showWorkspaces();
    }

    function showWorkspaces() {
        var list = $('ws-list');
        list.textContent = '';
        workspaces.forEach(function (w, i) {
            if (w.id === '') { return; }    /* keys without a workspace */
            var lab = document.createElement('label');
            var box = document.createElement('input');
            box.type = 'checkbox';
            box.value = w.id;
            box.id = 'ws-' + i;
            box.checked = state.ws.indexOf(w.id) >= 0;
            box.addEventListener('change', onWorkspace);
            lab.appendChild(box);
            lab.appendChild(document.createTextNode(' '
                + (w.name || w.id)
                + (w.absent ? ' (no usage in this range)' : '')));
            lab.title = w.id;
            list.appendChild(lab);
        });
        $('ws-hint').textContent = list.children.length
            ? 'None ticked: all workspaces.'
            : 'No workspace has usage in this range.';
    }

    function onWorkspace() {
        var ids = [];
        $('ws-list').querySelectorAll('input:checked').forEach(function (b) {
            ids.push(b.value);
        });
        navigate({ ws: ids });
    }


    /* ---- drawing -------------------------------------------------------- */

    function groupLabel(groupBy, u) {
        var g = GROUPS[groupBy];
        var id = groupId(groupBy, u);
        var name = g.name ? (u[g.name] || '') : '';
        return { id: id, name: name,
                 label: name || id || '(none)' };
    }

    function totals(groupBy, rows) {
        var by = {}, list = [];
        rows.forEach(function (u) {
            var l = groupLabel(groupBy, u);
            var t = by[l.id];
            if (!t) {
                t = by[l.id] = { id: l.id, name: l.name, label: l.label,
                                 requests: 0, rejected: 0, tokens: 0 };
                list.push(t);
            }
            t.requests += u.requests || 0;
            t.rejected += u.rejected || 0;
            t.tokens += u.tokens || 0;
        });
        list.sort(function (a, b) {
            return b.requests - a.requests || b.rejected - a.rejected
                || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
        });
        return list;
    }

    function render(v) {
        var s = state;
        var groups = totals(s.group_by, v.rows);

        shown = { v: v, groups: groups };
        setCsv(v);

        var what = describe(v);
        if (!v.rows.length) {
            setStatus('empty', 'No usage recorded from ' + fmtDay(v.range.start)
                + ' to ' + fmtDay(v.range.end)
                + (s.ws.length ? ' in the selected workspaces' : '')
                + '. Requests show up here once a location with'
                + ' llmlimit_usage has served some.', false);
            $('result').hidden = true;
            return;
        }
        setStatus('ready', groups.length + ' '
            + GROUPS[s.group_by].title.toLowerCase()
            + (groups.length === 1 ? '' : 's') + ', '
            + strideName(v.stride) + ' buckets, ' + fmtDay(v.range.start)
            + ' to ' + fmtDay(v.range.end) + '.', false);
        $('note').textContent = what;
        $('result').hidden = false;
        drawChart();
        drawTable(groups);
    }

    function describe(v) {
        var s = state, parts = [];
        var api = apiStride(v.range.end - v.range.start);
        if (v.csv) {
            parts.push(strideName(v.stride) + ' buckets as the API chose'
                       + ' them; the CSV is the API\'s export.');
        } else {
            parts.push(strideName(v.stride) + ' buckets assembled from '
                + v.requests + ' API request' + (v.requests > 1 ? 's' : '')
                + ' of daily data (the API alone would give '
                + strideName(api) + ' for this range); the CSV holds these'
                + ' buckets.');
        }
        if (v.truncated && v.retention_start) {
            parts.push('Usage before ' + fmtDay(Date.parse(v.retention_start))
                       + ' is no longer kept.');
        }
        if (s.ws.length) {
            parts.push('Workspaces: ' + s.ws.length + ' selected.');
        }
        return parts.join(' ');
    }

    function setCsv(v) {
        var a = $('csv');
        if (blobUrl) {
            URL.revokeObjectURL(blobUrl);
            blobUrl = null;
        }
        if (v.csv) {
            a.href = v.csv;
            a.dataset.source = 'api';
        } else {
            blobUrl = URL.createObjectURL(new Blob([csvText(v.rows)],
                                          { type: 'text/csv' }));
            a.href = blobUrl;
            a.dataset.source = 'page';
        }
    }

    function csvField(x) {
        x = x === undefined || x === null ? '' : String(x);
        return /[",\r\n]/.test(x) ? '"' + x.replace(/"/g, '""') + '"' : x;
    }

    function csvText(rows) {
        var out = [CSV_COLUMNS.join(',')];
        var sorted = rows.slice().sort(function (a, b) {
            var ka = a.time_bucket_start + '\u0000' + groupId(state.group_by, a);
            var kb = b.time_bucket_start + '\u0000' + groupId(state.group_by, b);
            return ka < kb ? -1 : ka > kb ? 1 : 0;
        });
        sorted.forEach(function (u) {
            var f = [u.time_bucket_start, u.time_bucket_end];
            CSV_FIELDS.forEach(function (k) { f.push(u[k] || ''); });
            f.push(u.requests || 0, u.rejected || 0, u.tokens || 0);
            out.push(f.map(csvField).join(','));
        });
        return out.join('\r\n') + '\r\n';
    }

    var SVG = 'http://www.w3.org/2000/svg';

    function el(name, attrs, text) {
        var e = document.createElementNS(SVG, name);
        Object.keys(attrs || {}).forEach(function (k) {
            e.setAttribute(k, attrs[k]);
        });
        if (text !== undefined) { e.textContent = text; }
        return e;
    }

    function niceMax(m) {
        if (m <= 0) { return { max: 1, step: 1 }; }
        var raw = m / 5, p = Math.pow(10, Math.floor(Math.log10(raw)));
        var step = [1, 2, 5, 10].map(function (k) { return k * p; })
            .filter(function (x) { return x >= raw; })[0];
        step = Math.max(1, step);
        return { max: Math.ceil(m / step) * step, step: step };
    }

    function drawChart() {
        if (!shown) { return; }
        var v = shown.v, groups = shown.groups, box = $('chart');
        var chartGroups = groups.slice(0, MAX_CHART_GROUPS);
        var other = groups.length > MAX_CHART_GROUPS;
        var color = {};
        chartGroups.forEach(function (g, i) { color[g.id] = COLORS[i]; });

        /* per bucket: requests per chart group, Other, rejected */
        var idx = {};
        v.buckets.forEach(function (b, i) { idx[iso(b.start)] = i; });
        var data = v.buckets.map(function () {
            return { by: {}, other: 0, rejected: 0, total: 0 };
        });
        v.rows.forEach(function (u) {
            var i = idx[iso(Date.parse(u.time_bucket_start))];
            if (i === undefined) { return; }
            var d = data[i], id = groupId(state.group_by, u);
            if (color[id] !== undefined) {
                d.by[id] = (d.by[id] || 0) + (u.requests || 0);
            } else {
                d.other += u.requests || 0;
            }
            d.rejected += u.rejected || 0;
            d.total += u.requests || 0;
        });

        var W = Math.max(300, box.clientWidth || 800);
        var narrow = W < 560;
        var H = narrow ? 260 : 340;
        var m = { l: narrow ? 44 : 56, r: 12, t: 12, b: 44 };
        var pw = W - m.l - m.r, ph = H - m.t - m.b;
        var top = 0;
        data.forEach(function (d) {
            top = Math.max(top, d.total, d.rejected);
        });
        var ny = niceMax(top);
        var y = function (x) { return m.t + ph - x / ny.max * ph; };
        var n = data.length, slot = pw / n;
        var bw = Math.max(1, Math.min(48, slot * 0.72));

        var svg = el('svg', {
            viewBox: '0 0 ' + W + ' ' + H, width: W, height: H,
            role: 'img', 'class': 'bars',
            'aria-label': 'Stacked bars of requests per '
                + strideName(v.stride) + ' bucket per '
                + GROUPS[state.group_by].title.toLowerCase()
                + ', with rejected requests as a line; the table below'
                + ' has the totals.'
        });

        for (var t = 0; t <= ny.max; t += ny.step) {
            svg.appendChild(el('line', { x1: m.l, x2: W - m.r, y1: y(t),
                                         y2: y(t), 'class': 'grid' }));
            svg.appendChild(el('text', { x: m.l - 6, y: y(t) + 4,
                                         'class': 'ytick' },
                               t.toLocaleString('en')));
        }

        var labelEvery = Math.max(1, Math.ceil(n * (narrow ? 52 : 64) / pw));
        data.forEach(function (d, i) {
            var x = m.l + i * slot + (slot - bw) / 2, base = 0;
            var b = v.buckets[i];
            var g = el('g', { 'class': 'bucket' });
            var segs = chartGroups.map(function (c) {
                return { id: c.id, label: c.label, n: d.by[c.id] || 0,
                         fill: color[c.id] };
            });
            if (other) {
                segs.push({ label: 'Other', n: d.other, fill: OTHER_COLOR });
            }
            segs.forEach(function (sg) {
                if (!sg.n) { return; }
                var rect = el('rect', {
                    x: x, width: bw, y: y(base + sg.n),
                    height: Math.max(0.5, y(base) - y(base + sg.n)),
                    fill: sg.fill
                });
                rect.appendChild(el('title', {}, fmtBucket(b.start, v.stride)
                    + ' · ' + sg.label + ': ' + sg.n.toLocaleString('en')
                    + ' requests'));
                g.appendChild(rect);
                base += sg.n;
            });
            svg.appendChild(g);
            if (i % labelEvery === 0) {
                svg.appendChild(el('text', {
                    x: m.l + i * slot + slot / 2, y: H - m.b + 16,
                    'class': 'xtick'
                }, fmtBucket(b.start, v.stride)));
            }
        });

        /* rejected: a line with a dot per bucket */
        var pts = data.map(function (d, i) {
            return (m.l + i * slot + slot / 2).toFixed(1) + ','
                + y(d.rejected).toFixed(1);
        });
        if (data.some(function (d) { return d.rejected > 0; })) {
            svg.appendChild(el('polyline', { points: pts.join(' '),
                                             'class': 'rejected' }));
            data.forEach(function (d, i) {
                var c = el('circle', {
                    cx: m.l + i * slot + slot / 2, cy: y(d.rejected),
                    r: n > 60 ? 1.5 : 3, 'class': 'rejected-dot'
                });
                c.appendChild(el('title', {},
                    fmtBucket(v.buckets[i].start, v.stride) + ' · rejected: '
                    + d.rejected.toLocaleString('en')));
                svg.appendChild(c);
            });
        }
        svg.appendChild(el('line', { x1: m.l, x2: W - m.r, y1: y(0),
                                     y2: y(0), 'class': 'axis' }));

        box.textContent = '';
        box.appendChild(svg);

        var legend = $('legend');
        legend.textContent = '';
        var items = chartGroups.map(function (c) {
            return { label: c.label, fill: color[c.id] };
        });
        if (other) {
            items.push({ label: 'Other (' + (groups.length - MAX_CHART_GROUPS)
                         + ' more, in the table)', fill: OTHER_COLOR });
        }
        items.push({ label: 'Rejected (429)', line: true });
        items.forEach(function (it) {
            var span = document.createElement('span');
            span.className = 'key' + (it.line ? ' key-line' : '');
            var sw = document.createElement('i');
            sw.setAttribute('aria-hidden', 'true');
            if (!it.line) { sw.style.background = it.fill; }
            span.appendChild(sw);
            span.appendChild(document.createTextNode(it.label));
            legend.appendChild(span);
        });
    }

    function cell(tr, tag, text, cls) {
        var c = document.createElement(tag);
        c.textContent = text;
        if (cls) { c.className = cls; }
        tr.appendChild(c);
        return c;
    }

    function drawTable(groups) {
        var g = GROUPS[state.group_by], tbl = $('totals');
        var head = tbl.tHead, body = tbl.tBodies[0], foot = tbl.tFoot;
        head.textContent = body.textContent = foot.textContent = '';
        var hr = document.createElement('tr');
        cell(hr, 'th', g.title).scope = 'col';
        if (g.name) { cell(hr, 'th', 'ID', 'id').scope = 'col'; }
        ['Requests', 'Rejected', 'Tokens'].forEach(function (h) {
            cell(hr, 'th', h, 'num').scope = 'col';
        });
        head.appendChild(hr);

        var sum = { requests: 0, rejected: 0, tokens: 0 };
        groups.forEach(function (t, i) {
            var tr = document.createElement('tr');
            tr.dataset.group = t.id;
            var th = cell(tr, 'th', '', 'name');
            th.scope = 'row';
            if (i < MAX_CHART_GROUPS) {
                var sw = document.createElement('i');
                sw.className = 'swatch';
                sw.setAttribute('aria-hidden', 'true');
                sw.style.background = COLORS[i];
                th.appendChild(sw);
            }
            th.appendChild(document.createTextNode(t.label));
            if (g.name) { cell(tr, 'td', t.id, 'id'); }
            cell(tr, 'td', t.requests.toLocaleString('en'), 'num requests');
            cell(tr, 'td', t.rejected.toLocaleString('en'), 'num rejected');
            cell(tr, 'td', t.tokens.toLocaleString('en'), 'num tokens');
            body.appendChild(tr);
            sum.requests += t.requests;
            sum.rejected += t.rejected;
            sum.tokens += t.tokens;
        });
        var fr = document.createElement('tr');
        cell(fr, 'th', 'Total').scope = 'row';
        if (g.name) { cell(fr, 'td', '', 'id'); }
        cell(fr, 'td', sum.requests.toLocaleString('en'), 'num requests');
        cell(fr, 'td', sum.rejected.toLocaleString('en'), 'num rejected');
        cell(fr, 'td', sum.tokens.toLocaleString('en'), 'num tokens');
        foot.appendChild(fr);
    }


    /* ---- controls -------------------------------------------------------- */

    function showControls() {
        var s = state, r = range(s), custom = s.range === 'custom';
        $('range').value = s.range;
        $('agg').value = s.agg;
        $('group_by').value = s.group_by;
        ['custom-fields', 'custom-fields-end', 'custom-apply']
            .forEach(function (id) { $(id).hidden = !custom; });
        if (!isNaN(r.start)) { $('start').value = toLocalInput(r.start); }
        if (!isNaN(r.end)) { $('end').value = toLocalInput(r.end); }
        var auto = $('agg').querySelector('option[value=auto]');
        auto.textContent = isNaN(r.end - r.start) || r.end <= r.start
            ? 'Auto (as the API)'
            : 'Auto (' + strideName(apiStride(r.end - r.start)) + ')';
        $('api-url').textContent = apiBase().pathname;
        document.querySelectorAll('#ws-list input').forEach(function (b) {
            b.checked = s.ws.indexOf(b.value) >= 0;
        });
    }

    function init() {
        state = readState();
        showControls();

        $('range').addEventListener('change', function () {
            var v = $('range').value;
            if (v === 'custom') {
                /* start from the range shown, applied with the button */
                var r = range(state);
                state = Object.assign({}, state, {
                    range: 'custom', start: iso(r.start), end: iso(r.end)
                });
                showControls();
                $('start').focus();
                return;
            }
            navigate({ range: v, start: '', end: '' });
        });
        $('controls').addEventListener('submit', function (e) {
            e.preventDefault();
            var a = parseTime($('start').value), b = parseTime($('end').value);
            navigate({ range: 'custom',
                       start: isNaN(a) ? '' : iso(a),
                       end: isNaN(b) ? '' : iso(b) });
        });
        $('agg').addEventListener('change', function () {
            navigate({ agg: $('agg').value });
        });
        $('group_by').addEventListener('change', function () {
            navigate({ group_by: $('group_by').value });
        });
        window.addEventListener('popstate', function () {
            state = readState();
            showControls();
            load();
        });
        var rt = null;
        window.addEventListener('resize', function () {
            clearTimeout(rt);
            rt = setTimeout(drawChart, 120);
        });
        load();
    }

    if (document.readyState === 'loading') {
        document.addEventListener('DOMContentLoaded', init);
    } else {
        init();
    }
})();
