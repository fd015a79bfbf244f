/* Token sampling: deterministic per seed (xoshiro256**), penalties as OpenAI and
 * Hugging Face define them, and stop strings that may span tokens. */
#include "engine/engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void zse_rng_seed(zse_rng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

double zse_rng_uniform(zse_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return (double)(result >> 11) * (1.0 / 9007199254740992.0);
}

static void apply_penalties(const zse_sampling *s, float *logits, int vocab, const zse_history *h)
{
    for (int i = 0; i < s->n_logit_bias; i++)
        if (s->logit_bias[i].id >= 0 && s->logit_bias[i].id < vocab)
            logits[s->logit_bias[i].id] += s->logit_bias[i].bias;
    if (s->repetition_penalty != 1.0f && s->repetition_penalty > 0) {
        /* HF: divide positive logits, multiply negative ones, once per distinct token */
        const int32_t *lists[2] = {h->prompt, h->generated};
        size_t lens[2] = {h->n_prompt, h->n_generated};
        for (int l = 0; l < 2; l++)
            for (size_t i = 0; i < lens[l]; i++) {
                int32_t id = lists[l][i];
                if (id < 0 || id >= vocab || isnan(logits[id]))
                    continue;
                float v = logits[id];
                logits[id] = v > 0 ? v / s->repetition_penalty : v * s->repetition_penalty;
                /* mark as done with NaN-free trick: a token seen twice is penalized once */
                for (int l2 = l; l2 < 2; l2++)
                    for (size_t j = (l2 == l ? i + 1 : 0); j < lens[l2]; j++)
                        if (lists[l2][j] == id)
                            goto next;
            next:;
            }
    }
    if (s->presence_penalty != 0 || s->frequency_penalty != 0) {
        /* OpenAI: logit -= count * frequency + (count > 0) * presence, over generated tokens */
        for (size_t i = 0; i < h->n_generated; i++) {
            int32_t id = h->generated[i];
            if (id < 0 || id >= vocab)
                continue;
            bool first = true;
            for (size_t j = 0; j < i; j++)
                if (h->generated[j] == id)
                    first = false;
            logits[id] -= s->frequency_penalty + (first ? s->presence_penalty : 0);
        }
    }
}

static int32_t argmax(const float *v, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best])
            best = i;
    return best;
}

/* qsort has no context argument: the probabilities it sorts by, per thread */
static _Thread_local float *sort_probs;

static int by_prob_desc(const void *a, const void *b)
{
    float pa = sort_probs[*(const int32_t *)a], pb = sort_probs[*(const int32_t *)b];
    if (pa != pb)
        return pa > pb ? -1 : 1;
    return *(const int32_t *)a - *(const int32_t *)b; /* ties by id: deterministic */
}

int32_t zse_sample(const zse_sampling *s, float *logits, int vocab, const zse_history *h, zse_rng *rng,
                   float *probs, int32_t *idx)
{
    apply_penalties(s, logits, vocab, h);
    if (s->temperature <= 0 || s->top_k == 1)
        return argmax(logits, vocab);
    float mx = logits[argmax(logits, vocab)];
    double sum = 0;
    for (int i = 0; i < vocab; i++) {
        probs[i] = expf((logits[i] - mx) / s->temperature);
        sum += probs[i];
        idx[i] = i;
    }
    for (int i = 0; i < vocab; i++)
        probs[i] = (float)(probs[i] / sum);
    /* candidates in descending probability */
    sort_probs = probs;
    qsort(idx, (size_t)vocab, sizeof *idx, by_prob_desc);
    int n = vocab;
    if (s->top_k > 0 && s->top_k < n)
        n = s->top_k;
    if (s->min_p > 0) {
        float floor_p = probs[idx[0]] * s->min_p;
        int k = 1;
        while (k < n && probs[idx[k]] >= floor_p)
            k++;
        n = k;
    }
    if (s->top_p > 0 && s->top_p < 1) {
        double cum = 0;
        int k = 0;
        while (k < n) {
            cum += probs[idx[k++]];
            if (cum >= s->top_p)
                break;
        }
        n = k;
    }
    double total = 0;
    for (int k = 0; k < n; k++)
        total += probs[idx[k]];
    double r = zse_rng_uniform(rng) * total, acc = 0;
    for (int k = 0; k < n; k++) {
        acc += probs[idx[k]];
        if (r < acc)
            return idx[k];
    }
    return idx[n - 1];
}

size_t zse_stop_holdback(const char *text, size_t n, const char *const *stop, int n_stop)
{
    size_t hold = 0;
    for (int i = 0; i < n_stop; i++) {
        size_t sl = strlen(stop[i]);
        for (size_t k = sl > 1 ? sl - 1 : 0; k > hold; k--)
            if (k <= n && memcmp(text + n - k, stop[i], k) == 0) {
                hold = k;
                break;
            }
    }
    return hold;
}
