/* XXH3-64 checksums (libxxhash) and the monotonic clock. */
#include "util/util.h"

#include <stdlib.h>
#include <time.h>
#include <xxhash.h>

uint64_t zse_hash64(const void *p, size_t n)
{
    return XXH3_64bits(p, n);
}

struct zse_hash_state {
    XXH3_state_t *st;
};

zse_hash_state *zse_hash_new(void)
{
    zse_hash_state *s = zse_malloc(sizeof *s);
    if (!s)
        return NULL;
    s->st = XXH3_createState();
    if (!s->st || XXH3_64bits_reset(s->st) != XXH_OK) {
        XXH3_freeState(s->st);
        free(s);
        zse_fail("cannot create a hash state");
        return NULL;
    }
    return s;
}

void zse_hash_update(zse_hash_state *s, const void *p, size_t n)
{
    XXH3_64bits_update(s->st, p, n);
}

uint64_t zse_hash_digest(zse_hash_state *s)
{
    return XXH3_64bits_digest(s->st);
}

void zse_hash_free(zse_hash_state *s)
{
    if (!s)
        return;
    XXH3_freeState(s->st);
    free(s);
}

double zse_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
