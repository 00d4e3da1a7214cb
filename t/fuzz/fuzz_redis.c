/*
 * Copyright (C) llmlimit developers
 *
 * The Redis reply validator, ngx_http_llmlimit_redis_result(): a call of
 * 1-4 waiting requests with 1-4 counters each (COUNT, PERIOD from the
 * first bytes), then the rest of the input parsed by hiredis' own reader
 * into replies, each validated.  A reply it accepts must give results in
 * range: remaining <= COUNT, reset and retry <= 2 PERIOD + 1 s.
 *
 * redis.c is included, not linked, to reach its static functions.
 *
 * Inputs with a multi-bulk header above 1024 elements are skipped:
 * hiredis 0.14 (no maxelements, unlike 1.x) allocates the array of a
 * "*N" header before any element arrives, so "*200000000" alone makes
 * it calloc 1.6 GB, beyond libFuzzer's memory limit; that is hiredis'
 * behaviour, not the validator's.
 */

#include "fuzz.h"
#include "../../src/ngx_http_llmlimit_redis.c"


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    void                             *reply;
    uint64_t                          n;
    ngx_uint_t                        i, j, k, nw;
    redisReader                      *reader;
    ngx_http_request_t                fake_r;
    ngx_http_llmlimit_zone_t          zone;
    ngx_http_llmlimit_redis_t         redis;
    ngx_http_llmlimit_batch_t         batches[4];
    ngx_http_llmlimit_counter_t       counters[4][4];
    ngx_http_llmlimit_redis_wait_t    waits[4];
    ngx_http_llmlimit_redis_call_t    call;
    ngx_http_llmlimit_redis_counter_t *wc;

    fuzz_init();

    if (size < 1) {
        return 0;
    }

    ngx_memzero(&zone, sizeof(zone));
    ngx_memzero(&redis, sizeof(redis));
    ngx_memzero(&call, sizeof(call));
    ngx_memzero(waits, sizeof(waits));
    ngx_memzero(batches, sizeof(batches));
    ngx_memzero(counters, sizeof(counters));

    ngx_str_set(&zone.name, "fuzz");
    redis.zone = &zone;
    ngx_str_set(&redis.addr, "127.0.0.1:6379");
    redis.log = &fuzz_log;
    redis.healthy = data[0] & 0x80 ? 1 : 0;

    call.redis = &redis;

    nw = (data[0] & 3) + 1;
    data++;
    size--;

    for (k = 0; k < nw; k++) {
        waits[k].redis = &redis;
        waits[k].n = size ? (data[0] & 3) + 1 : 1;
        waits[k].r = (size && (data[0] & 4)) ? NULL : &fake_r;
        waits[k].b = &batches[k];
        batches[k].counters = counters[k];
        batches[k].n = waits[k].n;

        if (size) {
            data++;
            size--;
        }

        for (i = 0; i < waits[k].n; i++) {
            wc = &waits[k].counters[i];
            wc->count = 1 + (size ? data[0] : 0) * 7;
            wc->period = 1000 * (1 + (size > 1 ? data[1] : 0));

            if (size > 1) {
                data += 2;
                size -= 2;
            }
        }

        call.waits[k] = &waits[k];
        call.nkeys += waits[k].n;
    }

    call.nwaits = nw;

    for (i = 0; i < size; i++) {
        if (data[i] != '*') {
            continue;
        }

        for (j = i + 1, n = 0;
             j < size && j < i + 12 && data[j] >= '0' && data[j] <= '9';
             j++)
        {
            n = n * 10 + (data[j] - '0');
        }

        if (n > 1024) {
            return 0;
        }
    }

    reader = redisReaderCreate();
    if (reader == NULL) {
        return 0;
    }

    if (redisReaderFeed(reader, (const char *) data, size) == REDIS_OK) {

        while (redisReaderGetReply(reader, &reply) == REDIS_OK
               && reply != NULL)
        {
            if (ngx_http_llmlimit_redis_result(&redis, &call, reply)
                == NGX_OK)
            {
                for (k = 0; k < nw; k++) {
                    if (waits[k].r == NULL) {
                        continue;
                    }

                    for (i = 0; i < waits[k].n; i++) {
                        wc = &waits[k].counters[i];

                        if (counters[k][i].remaining > wc->count
                            || counters[k][i].reset > 2 * wc->period + 1000
                            || counters[k][i].retry > 2 * wc->period + 1000)
                        {
                            __builtin_trap();
                        }
                    }
                }
            }

            freeReplyObject(reply);
        }
    }

    redisReaderFree(reader);

    return 0;
}
