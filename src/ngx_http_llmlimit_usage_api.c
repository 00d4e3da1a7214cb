
/*
 * Copyright (C) llmlimit developers
 */


/*
 * llmlimit_usage_api: the granular usage API of the LangSmith seed, read
 * only.  GET ...?start_time=&end_time=&workspace_ids=&group_by= answers
 * JSON (jansson), GET .../export.csv?... the same rows as CSV.
 *
 * The rows are made by adding each bucket of the range to the row of its
 * (stride bucket, group id), in a hash table in the request's pool, then
 * sorted by stride bucket and group id.  Without Redis the buckets are the
 * zone's; with redis= the fleet's totals come from Redis and this host's
 * deltas not flushed yet are added (src/ngx_http_llmlimit_usage_redis.c).
 */


#include "ngx_http_llmlimit_usage.h"

#include <jansson.h>


/* workspace ids of one query, at most */
#define NGX_HTTP_LLMLIMIT_USAGE_MAX_IDS   1000

/* an ISO 8601 time, at most this long */
#define NGX_HTTP_LLMLIMIT_USAGE_TIME_MAX  64

#define NGX_HTTP_LLMLIMIT_USAGE_HOUR      (3600 * 1000LL)
#define NGX_HTTP_LLMLIMIT_USAGE_DAY       (86400 * 1000LL)


typedef struct {
    const char                       *parameter;
    const char                       *message;
} ngx_http_llmlimit_usage_error_t;


static ngx_int_t ngx_http_llmlimit_usage_parse(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_query_t *q, ngx_http_llmlimit_usage_error_t *err);
static ngx_int_t ngx_http_llmlimit_usage_ids(ngx_http_llmlimit_usage_query_t *q,
    ngx_array_t *ids, ngx_str_t *value, ngx_http_llmlimit_usage_error_t *err);
static ngx_int_t ngx_http_llmlimit_usage_index_ids(
    ngx_http_llmlimit_usage_query_t *q, ngx_array_t *ids);
static ngx_uint_t ngx_http_llmlimit_usage_wanted(
    ngx_http_llmlimit_usage_query_t *q, ngx_str_t *ws, uint32_t hash);
static ngx_int_t ngx_http_llmlimit_usage_time(u_char *p, size_t len,
    int64_t *ms);
static ngx_int_t ngx_http_llmlimit_usage_digits(u_char **pp, u_char *last,
    ngx_uint_t n, ngx_int_t *v);
static ngx_int_t ngx_http_llmlimit_usage_grow(
    ngx_http_llmlimit_usage_query_t *q);
static int ngx_libc_cdecl ngx_http_llmlimit_usage_cmp(const void *one,
    const void *two);
static u_char *ngx_http_llmlimit_usage_iso(u_char *p, int64_t ms);
static ngx_int_t ngx_http_llmlimit_usage_json(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_query_t *q);
static json_t *ngx_http_llmlimit_usage_string(u_char *data, size_t len);
static ngx_int_t ngx_http_llmlimit_usage_csv(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_query_t *q);
static u_char *ngx_http_llmlimit_usage_csv_field(u_char *p, ngx_str_t *s);
static ngx_int_t ngx_http_llmlimit_usage_send(ngx_http_request_t *r,
    ngx_uint_t status, ngx_str_t *type, u_char *data, size_t len,
    ngx_uint_t csv);
static ngx_int_t ngx_http_llmlimit_usage_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, const char *parameter,
    const char *message);


static ngx_str_t  ngx_http_llmlimit_usage_group_bys[] = {
    ngx_string("workspace"),
    ngx_string("project"),
    ngx_string("user"),
    ngx_string("api_key")
};


/* the JSON names of a group_by's id and name */
static char  *ngx_http_llmlimit_usage_json_names[][2] = {
    { "workspace_id", "workspace_name" },
    { "project_id", "project_name" },
    { "user_id", "user_email" },
    { "api_key_short_key", NULL }
};


static ngx_str_t  ngx_http_llmlimit_usage_csv_header = ngx_string(
    "Time Bucket Start,Time Bucket End,Workspace ID,Workspace Name,"
    "Project ID,Project Name,User ID,User Email,API Key Short Key,"
    "Requests,Rejected,Tokens\r\n");


static ngx_str_t  ngx_http_llmlimit_usage_json_type =
    ngx_string("application/json");
static ngx_str_t  ngx_http_llmlimit_usage_csv_type =
    ngx_string("text/csv; charset=utf-8");


ngx_int_t
ngx_http_llmlimit_usage_api_handler(ngx_http_request_t *r)
{
    int64_t                              now, kept;
    ngx_int_t                            rc;
    ngx_http_llmlimit_usage_zone_t      *uz;
    ngx_http_llmlimit_usage_query_t     *q;
    ngx_http_llmlimit_usage_error_t      err;
    ngx_http_llmlimit_usage_loc_conf_t  *ulcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    ulcf = ngx_http_get_module_loc_conf(r, ngx_http_llmlimit_usage_module);
    uz = ulcf->api;

    q = ngx_pcalloc(r->pool, sizeof(ngx_http_llmlimit_usage_query_t));
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    q->pool = r->pool;

    if (ngx_array_init(&q->rows, r->pool, 64,
                       sizeof(ngx_http_llmlimit_usage_row_t))
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    q->mask = 127;
    q->index = ngx_pcalloc(r->pool, (q->mask + 1) * sizeof(uint32_t));
    if (q->index == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    q->csv = (r->uri.len >= sizeof("/export.csv") - 1
              && ngx_strncmp(r->uri.data + r->uri.len
                             - (sizeof("/export.csv") - 1),
                             "/export.csv", sizeof("/export.csv") - 1)
                 == 0);

    err.parameter = NULL;
    err.message = NULL;

    rc = ngx_http_llmlimit_usage_parse(r, q, &err);

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rc == NGX_DECLINED) {
        return ngx_http_llmlimit_usage_error(r, NGX_HTTP_BAD_REQUEST,
                                             "invalid_parameter",
                                             err.parameter, err.message);
    }

    /* the oldest bucket retention= keeps */

    now = ngx_time();
    kept = now - uz->retention;
    kept -= kept % uz->bucket;
    q->kept = (time_t) kept;

    if (uz->redis) {
        return ngx_http_llmlimit_usage_redis_query(r, uz, q);
    }

    if (ngx_http_llmlimit_usage_collect(uz, q, 0) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_llmlimit_usage_answer(r, q);
}


/*
 * NGX_DECLINED with err filled: a bad parameter.  Parameters other than
 * the four are let be; each of the four may be given once, but
 * workspace_ids, which may be repeated.
 */

static ngx_int_t
ngx_http_llmlimit_usage_parse(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_query_t *q, ngx_http_llmlimit_usage_error_t *err)
{
    u_char       *p, *last, *amp, *eq, *dst;
    int64_t       range;
    ngx_str_t     name, value;
    ngx_int_t     rc;
    ngx_uint_t    i, seen;
    ngx_array_t   ids;

    if (ngx_array_init(&ids, r->pool, 8, sizeof(ngx_str_t)) != NGX_OK) {
        return NGX_ERROR;
    }

    seen = 0;
    q->group_by = NGX_HTTP_LLMLIMIT_USAGE_BY_WORKSPACE;

    p = r->args.data;
    last = p + r->args.len;

    while (p < last) {
        amp = ngx_strlchr(p, last, '&');
        if (amp == NULL) {
            amp = last;
        }

        eq = ngx_strlchr(p, amp, '=');

        name.data = p;
        name.len = (eq ? eq : amp) - p;

        value.data = eq ? eq + 1 : amp;
        value.len = amp - value.data;

        p = amp + 1;

        if (name.len == 10 && ngx_strncmp(name.data, "start_time", 10) == 0) {
            i = 0;

        } else if (name.len == 8
                   && ngx_strncmp(name.data, "end_time", 8) == 0)
        {
            i = 1;

        } else if (name.len == 8
                   && ngx_strncmp(name.data, "group_by", 8) == 0)
        {
            i = 2;

        } else if (name.len == 13
                   && ngx_strncmp(name.data, "workspace_ids", 13) == 0)
        {
            i = 3;

        } else {
            continue;
        }

        err->parameter = (i == 0) ? "start_time"
                         : (i == 1) ? "end_time"
                         : (i == 2) ? "group_by" : "workspace_ids";

        if ((seen & (1 << i)) && i != 3) {
            err->message = "given more than once";
            return NGX_DECLINED;
        }

        seen |= 1 << i;

        if (i != 3 && value.len > NGX_HTTP_LLMLIMIT_USAGE_TIME_MAX) {
            err->message = (i == 2) ? "must be one of workspace, project, "
                                      "user, api_key"
                                    : "not an ISO 8601 time";
            return NGX_DECLINED;
        }

        dst = ngx_pnalloc(r->pool, value.len + 1);
        if (dst == NULL) {
            return NGX_ERROR;
        }

        p = value.data;
        value.data = dst;
        ngx_unescape_uri(&dst, &p, value.len, 0);
        value.len = dst - value.data;
        p = amp + 1;

        switch (i) {

        case 0:
            if (ngx_http_llmlimit_usage_time(value.data, value.len, &q->start)
                != NGX_OK)
            {
                err->message = "not an ISO 8601 time";
                return NGX_DECLINED;
            }

            break;

        case 1:
            if (ngx_http_llmlimit_usage_time(value.data, value.len, &q->end)
                != NGX_OK)
            {
                err->message = "not an ISO 8601 time";
                return NGX_DECLINED;
            }

            break;

        case 2:
            for (q->group_by = 0;
                 q->group_by < NGX_HTTP_LLMLIMIT_USAGE_GROUP_BYS;
                 q->group_by++)
            {
                name = ngx_http_llmlimit_usage_group_bys[q->group_by];

                if (name.len == value.len
                    && ngx_strncmp(name.data, value.data, value.len) == 0)
                {
                    break;
                }
            }

            if (q->group_by == NGX_HTTP_LLMLIMIT_USAGE_GROUP_BYS) {
                err->message = "must be one of workspace, project, user, "
                               "api_key";
                return NGX_DECLINED;
            }

            break;

        default: /* 3 */
            rc = ngx_http_llmlimit_usage_ids(q, &ids, &value, err);
            if (rc != NGX_OK) {
                return rc;
            }
        }
    }

    if (!(seen & 1)) {
        err->parameter = "start_time";
        err->message = "is required";
        return NGX_DECLINED;
    }

    if (!(seen & 2)) {
        err->parameter = "end_time";
        err->message = "is required";
        return NGX_DECLINED;
    }

    if (q->end <= q->start) {
        err->parameter = "end_time";
        err->message = "must be after start_time";
        return NGX_DECLINED;
    }

    /* the seed's table */

    range = q->end - q->start;

    if (range < NGX_HTTP_LLMLIMIT_USAGE_DAY) {
        q->stride = NGX_HTTP_LLMLIMIT_USAGE_HOUR;

    } else if (range <= 31 * NGX_HTTP_LLMLIMIT_USAGE_DAY) {
        q->stride = NGX_HTTP_LLMLIMIT_USAGE_DAY;

    } else if (range <= 93 * NGX_HTTP_LLMLIMIT_USAGE_DAY) {
        q->stride = 7 * NGX_HTTP_LLMLIMIT_USAGE_DAY;

    } else if (range <= 366 * NGX_HTTP_LLMLIMIT_USAGE_DAY) {
        q->stride = 30 * NGX_HTTP_LLMLIMIT_USAGE_DAY;

    } else {
        q->stride = 365 * NGX_HTTP_LLMLIMIT_USAGE_DAY;
    }

    if (ids.nelts) {
        return ngx_http_llmlimit_usage_index_ids(q, &ids);
    }

    return NGX_OK;
}


/* comma-separated ids, empty ones skipped */

static ngx_int_t
ngx_http_llmlimit_usage_ids(ngx_http_llmlimit_usage_query_t *q,
    ngx_array_t *ids, ngx_str_t *value, ngx_http_llmlimit_usage_error_t *err)
{
    u_char     *p, *last, *comma;
    ngx_str_t  *id;

    p = value->data;
    last = p + value->len;

    while (p < last) {
        comma = ngx_strlchr(p, last, ',');
        if (comma == NULL) {
            comma = last;
        }

        if (comma > p) {
            if (comma - p > NGX_HTTP_LLMLIMIT_USAGE_FIELD_MAX) {
                err->message = "an id is longer than 512 bytes";
                return NGX_DECLINED;
            }

            if (ids->nelts == NGX_HTTP_LLMLIMIT_USAGE_MAX_IDS) {
                err->message = "more than 1000 ids";
                return NGX_DECLINED;
            }

            id = ngx_array_push(ids);
            if (id == NULL) {
                return NGX_ERROR;
            }

            id->data = p;
            id->len = comma - p;
        }

        p = comma + 1;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_usage_index_ids(ngx_http_llmlimit_usage_query_t *q,
    ngx_array_t *ids)
{
    uint32_t    h;
    ngx_str_t  *id;
    ngx_uint_t  i, j, n;

    for (n = 16; n < 2 * ids->nelts; n *= 2) { /* void */ }

    q->ids = ids->elts;
    q->ids_mask = n - 1;

    q->ids_index = ngx_pcalloc(q->pool, n * sizeof(uint32_t));
    if (q->ids_index == NULL) {
        return NGX_ERROR;
    }

    id = ids->elts;

    for (i = 0; i < ids->nelts; i++) {
        h = ngx_http_llmlimit_usage_hash(id[i].data, id[i].len);

        for (j = h & q->ids_mask; q->ids_index[j]; j = (j + 1) & q->ids_mask) {
            /* void */
        }

        q->ids_index[j] = i + 1;
    }

    return NGX_OK;
}


static ngx_uint_t
ngx_http_llmlimit_usage_wanted(ngx_http_llmlimit_usage_query_t *q,
    ngx_str_t *ws, uint32_t hash)
{
    ngx_str_t   *id;
    ngx_uint_t   j;

    if (q->ids_index == NULL) {
        return 1;
    }

    for (j = hash & q->ids_mask; q->ids_index[j]; j = (j + 1) & q->ids_mask) {
        id = &q->ids[q->ids_index[j] - 1];

        if (id->len == ws->len && ngx_memcmp(id->data, ws->data, ws->len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


uint32_t
ngx_http_llmlimit_usage_hash(u_char *data, size_t len)
{
    return ngx_murmur_hash2(data, len);
}


/*
 * ISO 8601 as clients send it: 2026-01-05, 2026-01-05T00:00,
 * 2026-01-05T00:00:00, with fractional seconds, and Z, +01:00, +0100, +01
 * or no zone (UTC).  'T' may be 't' or a space.
 */

static ngx_int_t
ngx_http_llmlimit_usage_time(u_char *p, size_t len, int64_t *ms)
{
    u_char     *last;
    int64_t     days, t, y, m, era, yoe, doy, doe;
    ngx_int_t   year, month, day, hour, min, sec, frac, oh, om, sign, mdays;
    ngx_uint_t  n;

    static ngx_int_t  month_days[] = {
        31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31
    };

    last = p + len;
    hour = 0;
    min = 0;
    sec = 0;
    frac = 0;

    if (ngx_http_llmlimit_usage_digits(&p, last, 4, &year) != NGX_OK
        || p == last || *p++ != '-'
        || ngx_http_llmlimit_usage_digits(&p, last, 2, &month) != NGX_OK
        || p == last || *p++ != '-'
        || ngx_http_llmlimit_usage_digits(&p, last, 2, &day) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (year < 1970 || month < 1 || month > 12 || day < 1) {
        return NGX_ERROR;
    }

    mdays = month_days[month - 1];

    if (month == 2
        && (year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)))
    {
        mdays = 29;
    }

    if (day > mdays) {
        return NGX_ERROR;
    }

    if (p < last && (*p == 'T' || *p == 't' || *p == ' ')) {
        p++;

        if (ngx_http_llmlimit_usage_digits(&p, last, 2, &hour) != NGX_OK
            || p == last || *p++ != ':'
            || ngx_http_llmlimit_usage_digits(&p, last, 2, &min) != NGX_OK)
        {
            return NGX_ERROR;
        }

        if (p < last && *p == ':') {
            p++;

            if (ngx_http_llmlimit_usage_digits(&p, last, 2, &sec) != NGX_OK) {
                return NGX_ERROR;
            }

            if (p < last && (*p == '.' || *p == ',')) {
                p++;

                /* milliseconds: the first three digits, of up to nine */

                for (n = 0; p < last && *p >= '0' && *p <= '9'; n++, p++) {
                    if (n == 9) {
                        return NGX_ERROR;
                    }

                    if (n < 3) {
                        frac = frac * 10 + (*p - '0');
                    }
                }

                if (n == 0) {
                    return NGX_ERROR;
                }

                for ( /* void */ ; n < 3; n++) {
                    frac *= 10;
                }
            }
        }

        if (hour > 23 || min > 59 || sec > 59) {
            return NGX_ERROR;
        }
    }

    oh = 0;
    om = 0;
    sign = 1;

    if (p < last) {
        if (*p == 'Z' || *p == 'z') {
            p++;

        } else if (*p == '+' || *p == '-') {
            sign = (*p++ == '-') ? -1 : 1;

            if (ngx_http_llmlimit_usage_digits(&p, last, 2, &oh) != NGX_OK) {
                return NGX_ERROR;
            }

            if (p < last && *p == ':') {
                p++;
            }

            if (p < last
                && ngx_http_llmlimit_usage_digits(&p, last, 2, &om) != NGX_OK)
            {
                return NGX_ERROR;
            }

            if (oh > 23 || om > 59) {
                return NGX_ERROR;
            }

        } else {
            return NGX_ERROR;
        }
    }

    if (p != last) {
        return NGX_ERROR;
    }

    /* days since 1970-01-01 of a proleptic Gregorian date */

    y = year - (month <= 2);
    m = month;
    era = y / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + day - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    days = era * 146097 + doe - 719468;

    t = days * 86400 + hour * 3600 + min * 60 + sec
        - sign * (oh * 3600 + om * 60);

    *ms = t * 1000 + frac;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_usage_digits(u_char **pp, u_char *last, ngx_uint_t n,
    ngx_int_t *v)
{
    u_char  *p;

    p = *pp;

    if ((size_t) (last - p) < n) {
        return NGX_ERROR;
    }

    *v = 0;

    while (n--) {
        if (*p < '0' || *p > '9') {
            return NGX_ERROR;
        }

        *v = *v * 10 + (*p++ - '0');
    }

    *pp = p;

    return NGX_OK;
}


/*
 * Adds a bucket's counters to the row of its stride bucket and group id;
 * "start" is the bucket's start, "ws" its group's workspace.
 */

ngx_int_t
ngx_http_llmlimit_usage_add(ngx_http_llmlimit_usage_query_t *q, time_t start,
    ngx_str_t *ws, uint32_t ws_hash, ngx_str_t *id, uint32_t id_hash,
    ngx_str_t *name, uint64_t requests, uint64_t rejected, uint64_t tokens)
{
    int64_t                         from, idx;
    uint32_t                        h;
    ngx_uint_t                      j;
    ngx_http_llmlimit_usage_row_t  *row;

    if (!ngx_http_llmlimit_usage_wanted(q, ws, ws_hash)) {
        return NGX_OK;
    }

    from = (int64_t) start * 1000;

    if (from < q->start) {
        from = q->start;
    }

    idx = (from - q->start) / q->stride;
    h = id_hash ^ (uint32_t) (idx * 0x9e3779b1);

    for (j = h & q->mask; q->index[j]; j = (j + 1) & q->mask) {
        row = (ngx_http_llmlimit_usage_row_t *) q->rows.elts
              + q->index[j] - 1;

        if (row->hash == h && row->idx == idx && row->id.len == id->len
            && ngx_memcmp(row->id.data, id->data, id->len) == 0)
        {
            goto found;
        }
    }

    row = ngx_array_push(&q->rows);
    if (row == NULL) {
        return NGX_ERROR;
    }

    ngx_memzero(row, sizeof(ngx_http_llmlimit_usage_row_t));

    row->idx = idx;
    row->hash = h;

    row->id.data = ngx_pnalloc(q->pool, id->len + name->len + 1);
    if (row->id.data == NULL) {
        return NGX_ERROR;
    }

    row->id.len = id->len;
    row->name.data = ngx_cpymem(row->id.data, id->data, id->len);
    row->name.len = name->len;
    ngx_memcpy(row->name.data, name->data, name->len);

    q->index[j] = q->rows.nelts;

    if (q->rows.nelts * 2 > q->mask
        && ngx_http_llmlimit_usage_grow(q) != NGX_OK)
    {
        return NGX_ERROR;
    }

found:

    row->requests += requests;
    row->rejected += rejected;
    row->tokens += tokens;

    return NGX_OK;
}


static ngx_int_t
ngx_http_llmlimit_usage_grow(ngx_http_llmlimit_usage_query_t *q)
{
    uint32_t                       *index;
    ngx_uint_t                      i, j, mask;
    ngx_http_llmlimit_usage_row_t  *rows;

    mask = q->mask * 2 + 1;

    index = ngx_pcalloc(q->pool, (mask + 1) * sizeof(uint32_t));
    if (index == NULL) {
        return NGX_ERROR;
    }

    rows = q->rows.elts;

    for (i = 0; i < q->rows.nelts; i++) {
        for (j = rows[i].hash & mask; index[j]; j = (j + 1) & mask) {
            /* void */
        }

        index[j] = i + 1;
    }

    ngx_pfree(q->pool, q->index);

    q->index = index;
    q->mask = mask;

    return NGX_OK;
}


static int ngx_libc_cdecl
ngx_http_llmlimit_usage_cmp(const void *one, const void *two)
{
    const ngx_http_llmlimit_usage_row_t  *a = one;
    const ngx_http_llmlimit_usage_row_t  *b = two;

    int  rc;

    if (a->idx != b->idx) {
        return (a->idx < b->idx) ? -1 : 1;
    }

    rc = ngx_memcmp(a->id.data, b->id.data, ngx_min(a->id.len, b->id.len));

    if (rc != 0) {
        return rc;
    }

    return (a->id.len < b->id.len) ? -1 : (a->id.len > b->id.len);
}


ngx_int_t
ngx_http_llmlimit_usage_answer(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_query_t *q)
{
    if (q->rows.nelts > 1) {
        qsort(q->rows.elts, q->rows.nelts,
              sizeof(ngx_http_llmlimit_usage_row_t),
              ngx_http_llmlimit_usage_cmp);
    }

    if (q->csv) {
        return ngx_http_llmlimit_usage_csv(r, q);
    }

    return ngx_http_llmlimit_usage_json(r, q);
}


/* 2026-11-01T00:00:00Z, with .mmm if there are milliseconds */

static u_char *
ngx_http_llmlimit_usage_iso(u_char *p, int64_t ms)
{
    ngx_tm_t  tm;

    ngx_gmtime((time_t) (ms / 1000), &tm);

    p = ngx_sprintf(p, "%4d-%02d-%02dT%02d:%02d:%02d",
                    tm.ngx_tm_year, tm.ngx_tm_mon, tm.ngx_tm_mday,
                    tm.ngx_tm_hour, tm.ngx_tm_min, tm.ngx_tm_sec);

    if (ms % 1000) {
        p = ngx_sprintf(p, ".%03d", (int) (ms % 1000));
    }

    *p++ = 'Z';

    return p;
}


/* v is evaluated once: json_object_set_new() owns it, even on failure */
#define ngx_http_llmlimit_usage_set(o, k, v)                                 \
    do {                                                                     \
        json_t  *value_ = (v);                                               \
                                                                             \
        if (value_ == NULL || json_object_set_new(o, k, value_) != 0) {      \
            goto failed;                                                     \
        }                                                                    \
    } while (0)


static ngx_int_t
ngx_http_llmlimit_usage_json(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_query_t *q)
{
    char                           *text, **names;
    u_char                          buf[NGX_HTTP_LLMLIMIT_USAGE_TIME_MAX];
    u_char                         *p;
    size_t                          len;
    json_t                         *root, *usage, *row, *stride;
    int64_t                         bstart, bend;
    ngx_int_t                       rc;
    ngx_uint_t                      i;
    ngx_http_llmlimit_usage_row_t  *rows;

    root = json_object();
    if (root == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_http_llmlimit_usage_iso(buf, q->start);
    ngx_http_llmlimit_usage_set(root, "start_time",
                                json_stringn((char *) buf, p - buf));

    p = ngx_http_llmlimit_usage_iso(buf, q->end);
    ngx_http_llmlimit_usage_set(root, "end_time",
                                json_stringn((char *) buf, p - buf));

    ngx_http_llmlimit_usage_set(root, "group_by",
        json_stringn((char *) ngx_http_llmlimit_usage_group_bys[q->group_by]
                                                                   .data,
                     ngx_http_llmlimit_usage_group_bys[q->group_by].len));

    if (q->stride == NGX_HTTP_LLMLIMIT_USAGE_HOUR) {
        stride = json_pack("{sI}", "hours", (json_int_t) 1);

    } else {
        stride = json_pack("{sI}", "days",
                        (json_int_t) (q->stride / NGX_HTTP_LLMLIMIT_USAGE_DAY));
    }

    ngx_http_llmlimit_usage_set(root, "stride", stride);

    p = ngx_http_llmlimit_usage_iso(buf, (int64_t) q->kept * 1000);
    ngx_http_llmlimit_usage_set(root, "retention_start",
                                json_stringn((char *) buf, p - buf));

    ngx_http_llmlimit_usage_set(root, "truncated",
                        json_boolean(q->start < (int64_t) q->kept * 1000));

    usage = json_array();
    ngx_http_llmlimit_usage_set(root, "usage", usage);

    names = ngx_http_llmlimit_usage_json_names[q->group_by];
    rows = q->rows.elts;

    for (i = 0; i < q->rows.nelts; i++) {
        row = json_object();

        if (row == NULL || json_array_append_new(usage, row) != 0) {
            goto failed;
        }

        bstart = q->start + rows[i].idx * q->stride;
        bend = ngx_min(bstart + q->stride, q->end);

        p = ngx_http_llmlimit_usage_iso(buf, bstart);
        ngx_http_llmlimit_usage_set(row, "time_bucket_start",
                                    json_stringn((char *) buf, p - buf));

        p = ngx_http_llmlimit_usage_iso(buf, bend);
        ngx_http_llmlimit_usage_set(row, "time_bucket_end",
                                    json_stringn((char *) buf, p - buf));

        ngx_http_llmlimit_usage_set(row, names[0],
                                    ngx_http_llmlimit_usage_string(
                                        rows[i].id.data, rows[i].id.len));

        if (names[1]) {
            ngx_http_llmlimit_usage_set(row, names[1],
                                        ngx_http_llmlimit_usage_string(
                                        rows[i].name.data, rows[i].name.len));
        }

        ngx_http_llmlimit_usage_set(row, "requests",
                                json_integer((json_int_t) rows[i].requests));
        ngx_http_llmlimit_usage_set(row, "rejected",
                                json_integer((json_int_t) rows[i].rejected));
        ngx_http_llmlimit_usage_set(row, "tokens",
                                json_integer((json_int_t) rows[i].tokens));
    }

    text = json_dumps(root, JSON_COMPACT|JSON_PRESERVE_ORDER);
    json_decref(root);

    if (text == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    len = ngx_strlen(text);

    p = ngx_pnalloc(r->pool, len + 1);
    if (p == NULL) {
        free(text);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_memcpy(p, text, len);
    p[len] = LF;
    free(text);

    rc = ngx_http_llmlimit_usage_send(r, NGX_HTTP_OK,
                                      &ngx_http_llmlimit_usage_json_type,
                                      p, len + 1, 0);
    return rc;

failed:

    json_decref(root);

    return NGX_HTTP_INTERNAL_SERVER_ERROR;
}


/* a JSON string of bytes that may not be UTF-8: bad bytes become '?' */

static json_t *
ngx_http_llmlimit_usage_string(u_char *data, size_t len)
{
    char    *copy;
    json_t  *s;
    size_t   i;

    s = json_stringn((char *) data, len);
    if (s) {
        return s;
    }

    copy = malloc(len + 1);
    if (copy == NULL) {
        return NULL;
    }

    for (i = 0; i < len; i++) {
        copy[i] = (data[i] < 0x80 && data[i] != '\0') ? data[i] : '?';
    }

    s = json_stringn(copy, len);
    free(copy);

    return s;
}


static ngx_int_t
ngx_http_llmlimit_usage_csv(ngx_http_request_t *r,
    ngx_http_llmlimit_usage_query_t *q)
{
    u_char                         *p, *start;
    size_t                          len;
    int64_t                         bstart;
    ngx_str_t                       empty;
    ngx_uint_t                      i, f;
    ngx_http_llmlimit_usage_row_t  *rows;

    rows = q->rows.elts;
    len = ngx_http_llmlimit_usage_csv_header.len;

    for (i = 0; i < q->rows.nelts; i++) {
        len += 2 * NGX_HTTP_LLMLIMIT_USAGE_TIME_MAX
               + 2 * (rows[i].id.len + rows[i].name.len) + 4
               + 12 + 3 * NGX_INT64_LEN + 2;
    }

    start = ngx_pnalloc(r->pool, len);
    if (start == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_cpymem(start, ngx_http_llmlimit_usage_csv_header.data,
                   ngx_http_llmlimit_usage_csv_header.len);

    ngx_str_null(&empty);

    for (i = 0; i < q->rows.nelts; i++) {
        bstart = q->start + rows[i].idx * q->stride;

        p = ngx_http_llmlimit_usage_iso(p, bstart);
        *p++ = ',';
        p = ngx_http_llmlimit_usage_iso(p, ngx_min(bstart + q->stride,
                                                   q->end));

        /* the id and name columns: two a group_by, one for api_key */

        for (f = 0; f < NGX_HTTP_LLMLIMIT_USAGE_NFIELDS; f++) {
            *p++ = ',';

            if (f == 2 * q->group_by) {
                p = ngx_http_llmlimit_usage_csv_field(p, &rows[i].id);

            } else if (f == 2 * q->group_by + 1) {
                p = ngx_http_llmlimit_usage_csv_field(p, &rows[i].name);
            }
        }

        p = ngx_sprintf(p, ",%uL,%uL,%uL\r\n", rows[i].requests,
                        rows[i].rejected, rows[i].tokens);
    }

    return ngx_http_llmlimit_usage_send(r, NGX_HTTP_OK,
                                        &ngx_http_llmlimit_usage_csv_type,
                                        start, p - start, 1);
}


/* RFC 4180: quoted, with quotes doubled, if it holds , " CR or LF */

static u_char *
ngx_http_llmlimit_usage_csv_field(u_char *p, ngx_str_t *s)
{
    size_t  i;

    for (i = 0; i < s->len; i++) {
        if (s->data[i] == ',' || s->data[i] == '"' || s->data[i] == CR
            || s->data[i] == LF)
        {
            break;
        }
    }

    if (i == s->len) {
        return ngx_cpymem(p, s->data, s->len);
    }

    *p++ = '"';

    for (i = 0; i < s->len; i++) {
        if (s->data[i] == '"') {
            *p++ = '"';
        }

        *p++ = s->data[i];
    }

    *p++ = '"';

    return p;
}


static ngx_int_t
ngx_http_llmlimit_usage_send(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, u_char *data, size_t len, ngx_uint_t csv)
{
    ngx_int_t         rc;
    ngx_buf_t        *b;
    ngx_chain_t       out;
    ngx_table_elt_t  *h;

    r->headers_out.status = status;
    r->headers_out.content_type = *type;
    r->headers_out.content_type_len = type->len;
    r->headers_out.content_length_n = len;

    if (csv) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "Content-Disposition");
        ngx_str_set(&h->value, "attachment; filename=\"usage.csv\"");
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->pos = data;
    b->last = data + len;
    b->memory = (len > 0);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


static ngx_int_t
ngx_http_llmlimit_usage_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *parameter, const char *message)
{
    char    *text;
    u_char  *p;
    size_t   len;
    json_t  *err;

    if (parameter) {
        err = json_pack("{s{ssssss}}", "error", "type", type,
                        "parameter", parameter, "message", message);

    } else {
        err = json_pack("{s{ssss}}", "error", "type", type,
                        "message", message);
    }

    if (err == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    text = json_dumps(err, JSON_COMPACT|JSON_PRESERVE_ORDER);
    json_decref(err);

    if (text == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    len = ngx_strlen(text);

    p = ngx_pnalloc(r->pool, len + 1);
    if (p == NULL) {
        free(text);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_memcpy(p, text, len);
    p[len] = LF;
    free(text);

    return ngx_http_llmlimit_usage_send(r, status,
                                        &ngx_http_llmlimit_usage_json_type,
                                        p, len + 1, 0);
}


/* an answer that is not a usage: 503 when Redis cannot answer */

ngx_int_t
ngx_http_llmlimit_usage_fail(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *message)
{
    return ngx_http_llmlimit_usage_error(r, status, type, NULL, message);
}
