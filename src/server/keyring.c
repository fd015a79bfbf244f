/* The keys a running server accepts, held in memory so a request never waits on the
 * database. The background audit thread replaces them when the key table changes. A
 * presented key is hashed and compared with every stored hash in constant time
 * (CRYPTO_memcmp), so neither timing nor early exits tell how much of a guess was right. */
#include "server/server.h"

#include <openssl/crypto.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#define RATE_WINDOW_S 60.0

typedef struct {
    srv_key key;
    srv_window window;      /* used when key.rate_limit > 0 */
} ring_key;

struct srv_keyring {
    pthread_mutex_t mu;
    ring_key *keys;
    size_t n;
    bool has_plain;             /* --api-key / ZSE_API_KEY: one key given at start, not stored */
    unsigned char plain_hash[32];
};

srv_keyring *srv_keyring_new(void)
{
    srv_keyring *kr = zse_calloc(1, sizeof *kr);
    if (kr)
        pthread_mutex_init(&kr->mu, NULL);
    return kr;
}

static void free_keys(ring_key *keys, size_t n)
{
    for (size_t i = 0; i < n; i++)
        srv_window_free(&keys[i].window);
    free(keys);
}

void srv_keyring_free(srv_keyring *kr)
{
    if (!kr)
        return;
    free_keys(kr->keys, kr->n);
    pthread_mutex_destroy(&kr->mu);
    free(kr);
}

/* the old entry of the same key with the same limit, whose window history carries over */
static ring_key *find_same(srv_keyring *kr, const srv_key *k)
{
    for (size_t i = 0; i < kr->n; i++)
        if (strcmp(kr->keys[i].key.name, k->name) == 0 && kr->keys[i].key.rate_limit == k->rate_limit &&
            memcmp(kr->keys[i].key.hash, k->hash, 32) == 0)
            return &kr->keys[i];
    return NULL;
}

int srv_keyring_set(srv_keyring *kr, const srv_key *keys, size_t n)
{
    ring_key *fresh = n ? zse_calloc(n, sizeof *fresh) : NULL;
    if (n && !fresh)
        return -1;
    for (size_t i = 0; i < n; i++) {
        fresh[i].key = keys[i];
        if (keys[i].rate_limit > 0 && srv_window_init(&fresh[i].window, keys[i].rate_limit) != 0) {
            free_keys(fresh, n);
            return -1;
        }
    }
    pthread_mutex_lock(&kr->mu);
    for (size_t i = 0; i < n; i++) {
        ring_key *old = find_same(kr, &keys[i]);
        if (old && old->window.times) {
            srv_window tmp = fresh[i].window;
            fresh[i].window = old->window;
            old->window = tmp;
        }
    }
    ring_key *stale = kr->keys;
    size_t n_stale = kr->n;
    kr->keys = fresh;
    kr->n = n;
    pthread_mutex_unlock(&kr->mu);
    free_keys(stale, n_stale);
    return 0;
}

int srv_keyring_set_plain(srv_keyring *kr, const char *key)
{
    if (!key || !*key)
        return zse_fail("the API key is empty");
    pthread_mutex_lock(&kr->mu);
    srv_key_hash(key, strlen(key), kr->plain_hash);
    kr->has_plain = true;
    pthread_mutex_unlock(&kr->mu);
    return 0;
}

size_t srv_keyring_size(srv_keyring *kr)
{
    pthread_mutex_lock(&kr->mu);
    size_t n = kr->n + (kr->has_plain ? 1 : 0);
    pthread_mutex_unlock(&kr->mu);
    return n;
}

/* the token of "Bearer TOKEN" (scheme case-insensitive, spaces around allowed), or NULL */
static const char *bearer_token(const char *h, size_t *len)
{
    if (!h)
        return NULL;
    while (*h == ' ' || *h == '\t')
        h++;
    if (strncasecmp(h, "bearer", 6) != 0 || (h[6] != ' ' && h[6] != '\t'))
        return NULL;
    h += 6;
    while (*h == ' ' || *h == '\t')
        h++;
    size_t n = strlen(h);
    while (n > 0 && (h[n - 1] == ' ' || h[n - 1] == '\t'))
        n--;
    if (n == 0)
        return NULL;
    *len = n;
    return h;
}

srv_auth srv_keyring_check(srv_keyring *kr, const char *authorization, double now,
                           char name_out[SRV_KEY_NAME_MAX + 1], int *priority, srv_rate *rate)
{
    name_out[0] = '\0';
    *priority = 0;
    memset(rate, 0, sizeof *rate);
    size_t len = 0;
    const char *token = bearer_token(authorization, &len);
    if (!token)
        return SRV_AUTH_MISSING;
    unsigned char hash[32];
    srv_key_hash(token, len, hash);
    pthread_mutex_lock(&kr->mu);
    ring_key *hit = NULL;
    for (size_t i = 0; i < kr->n; i++) {
        /* every stored hash is compared; the loop never stops early */
        bool same = CRYPTO_memcmp(kr->keys[i].key.hash, hash, 32) == 0;
        if (same)
            hit = &kr->keys[i];
    }
    srv_auth result = SRV_AUTH_UNKNOWN;
    bool plain = kr->has_plain && CRYPTO_memcmp(kr->plain_hash, hash, 32) == 0;
    if (plain && !hit) { /* the start-up key: no limit, the default priority */
        snprintf(name_out, SRV_KEY_NAME_MAX + 1, "%s", SRV_PLAIN_KEY_NAME);
        result = SRV_AUTH_OK;
    }
    if (hit) {
        memcpy(name_out, hit->key.name, SRV_KEY_NAME_MAX + 1);
        *priority = hit->key.priority;
        if (!hit->key.enabled) {
            result = SRV_AUTH_DISABLED;
        } else if (hit->key.rate_limit > 0) {
            *rate = srv_window_admit(&hit->window, now, RATE_WINDOW_S);
            result = rate->allowed ? SRV_AUTH_OK : SRV_AUTH_LIMITED;
        } else {
            result = SRV_AUTH_OK;
        }
    }
    pthread_mutex_unlock(&kr->mu);
    return result;
}

bool srv_keyring_is_admin(srv_keyring *kr, const char *name)
{
    if (!name || !name[0])
        return false;
    bool admin = false;
    pthread_mutex_lock(&kr->mu);
    for (size_t i = 0; i < kr->n; i++)
        if (strcmp(kr->keys[i].key.name, name) == 0)
            admin = kr->keys[i].key.enabled && kr->keys[i].key.admin;
    pthread_mutex_unlock(&kr->mu);
    return admin;
}
