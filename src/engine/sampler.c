/* Token sampling: deterministic per seed (xoshiro256**), penalties as Hugging Face and
 * OpenAI define them, truncation (top-k, top-p, min-p) in Hugging Face's order, and the
 * helpers for logprobs and stop strings that may span tokens.
 *
 * Cost matters: the server samples for every running sequence every step, so nothing
 * here sorts the whole vocabulary. Penalties count with a scratch table (linear in the
 * history), top-k keeps a heap, and top-p / min-p sort only the tokens that can matter. */
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

/* ---- penalties --------------------------------------------------------------------------- */

static bool valid_id(int32_t id, int vocab) { return id >= 0 && id < vocab; }

/* Hugging Face's RepetitionPenaltyLogitsProcessor: every distinct token of the prompt and
 * the generated text once — positive logits divided by the penalty, negative multiplied.
 * `mark` is the zeroed scratch table; it is zero again on return. */
static void repetition_penalty(float penalty, float *logits, int vocab, const zse_history *h, int32_t *mark)
{
    const int32_t *lists[2] = {h->prompt, h->generated};
    size_t lens[2] = {h->n_prompt, h->n_generated};
    for (int l = 0; l < 2; l++)
        for (size_t i = 0; i < lens[l]; i++) {
            int32_t id = lists[l][i];
            if (!valid_id(id, vocab) || mark[id])
                continue;
            mark[id] = 1;
            logits[id] = logits[id] > 0 ? logits[id] / penalty : logits[id] * penalty;
        }
    for (int l = 0; l < 2; l++)
        for (size_t i = 0; i < lens[l]; i++)
            if (valid_id(lists[l][i], vocab))
                mark[lists[l][i]] = 0;
}

/* OpenAI: logit -= count * frequency_penalty + (count > 0) * presence_penalty, counting the
 * generated tokens only */
static void count_penalties(const zse_sampling *s, float *logits, int vocab, const zse_history *h, int32_t *count)
{
    for (size_t i = 0; i < h->n_generated; i++)
        if (valid_id(h->generated[i], vocab))
            count[h->generated[i]]++;
    for (size_t i = 0; i < h->n_generated; i++) {
        int32_t id = h->generated[i];
        if (!valid_id(id, vocab) || count[id] == 0)
            continue;
        logits[id] -= (float)count[id] * s->frequency_penalty + s->presence_penalty;
        count[id] = 0; /* once per distinct token; also leaves the table zeroed */
    }
}

static void apply_penalties(const zse_sampling *s, float *logits, int vocab, const zse_history *h, int32_t *scratch)
{
    for (int i = 0; i < s->n_logit_bias; i++)
        if (valid_id(s->logit_bias[i].id, vocab))
            logits[s->logit_bias[i].id] += s->logit_bias[i].bias;
    if (s->repetition_penalty > 0 && s->repetition_penalty != 1.0f)
        repetition_penalty(s->repetition_penalty, logits, vocab, h, scratch);
    if (s->presence_penalty != 0 || s->frequency_penalty != 0)
        count_penalties(s, logits, vocab, h, scratch);
}

/* ---- truncation and the draw -------------------------------------------------------------- */

static int32_t argmax(const float *v, int n) { return (int32_t)zse_argmax_f32(v, n); }

/* candidates order: higher probability first, lower id on ties (deterministic) */
static bool before(const float *p, int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); }

/* qsort has no context argument: the probabilities it sorts by, per thread */
static _Thread_local const float *sort_probs;

static int by_prob_desc(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return before(sort_probs, x, y) ? -1 : before(sort_probs, y, x) ? 1 : 0;
}

/* The same order for many candidates, by an LSD radix sort on one 64-bit key per id: the
 * probability's bits inverted (p >= 0, so its bits order as its value; inverted, the larger
 * comes first) above the id (the lower first on ties). A flat distribution puts most of the
 * vocabulary in the nucleus, where qsort through a comparator is slow (BENCHMARKS.md).
 * False when the scratch cannot be had or a value is NaN (the caller then uses qsort). */
enum { RADIX_BITS = 11, RADIX_MIN = 2048 };

static bool radix_sort_candidates(int32_t *idx, int n, const float *p)
{
    uint64_t *a = malloc((size_t)n * sizeof *a), *b = malloc((size_t)n * sizeof *b);
    if (!a || !b) {
        free(a);
        free(b);
        return false;
    }
    for (int i = 0; i < n; i++) {
        const float v = p[idx[i]];
        if (!(v >= 0)) { /* a NaN (a broken model's logit): qsort's order, whatever it is */
            free(a);
            free(b);
            return false;
        }
        uint32_t bits;
        memcpy(&bits, &v, sizeof bits);
        a[i] = (uint64_t)(~bits) << 32 | (uint32_t)idx[i];
    }
    for (int shift = 0; shift < 64; shift += RADIX_BITS) {
        size_t count[1 << RADIX_BITS] = {0};
        for (int i = 0; i < n; i++)
            count[(a[i] >> shift) & ((1u << RADIX_BITS) - 1)]++;
        if (count[(a[0] >> shift) & ((1u << RADIX_BITS) - 1)] == (size_t)n)
            continue; /* every key has this digit: the pass would change nothing */
        size_t at = 0;
        for (int d = 0; d < 1 << RADIX_BITS; d++) {
            size_t c = count[d];
            count[d] = at;
            at += c;
        }
        for (int i = 0; i < n; i++)
            b[count[(a[i] >> shift) & ((1u << RADIX_BITS) - 1)]++] = a[i];
        uint64_t *t = a;
        a = b;
        b = t;
    }
    for (int i = 0; i < n; i++)
        idx[i] = (int32_t)(uint32_t)a[i];
    free(a);
    free(b);
    return true;
}

static void sort_candidates(int32_t *idx, int n, const float *p)
{
    if (n >= RADIX_MIN && radix_sort_candidates(idx, n, p))
        return;
    sort_probs = p;
    qsort(idx, (size_t)n, sizeof *idx, by_prob_desc);
}

/* the k most likely ids into idx[0..k), via a heap whose root is the worst kept */
static void top_k_ids(const float *p, int vocab, int k, int32_t *idx)
{
    int n = 0;
    for (int32_t i = 0; i < vocab; i++) {
        if (n == k && !before(p, i, idx[0]))
            continue;
        int at;
        if (n < k) { /* sift up from the end */
            at = n++;
            while (at > 0 && before(p, idx[(at - 1) / 2], i)) {
                idx[at] = idx[(at - 1) / 2];
                at = (at - 1) / 2;
            }
        } else { /* replace the root, sift down */
            at = 0;
            for (;;) {
                int c = 2 * at + 1;
                if (c >= n)
                    break;
                if (c + 1 < n && before(p, idx[c], idx[c + 1]))
                    c++;
                if (!before(p, i, idx[c]))
                    break;
                idx[at] = idx[c];
                at = c;
            }
        }
        idx[at] = i;
    }
    sort_candidates(idx, k, p);
}

/* The ids that top-p / min-p may keep, sorted, into idx; returns how many. Only tokens
 * above a threshold are sorted. With min-p the floor is that threshold (what top-p keeps
 * beyond it, min-p drops). Without, the threshold drops until the mass above it reaches
 * top_p, so the nucleus ends among the candidates. p's largest value is 1. */
static int nucleus_candidates(const float *p, int vocab, double total, float top_p, float min_p, int32_t *idx)
{
    for (float cut = min_p > 0 ? min_p : 1e-3f;; cut /= 64) {
        if (cut < 1e-30f)
            cut = 0;
        int n = 0;
        double mass = 0;
        for (int32_t i = 0; i < vocab; i++)
            if (p[i] >= cut) {
                idx[n++] = i;
                mass += p[i];
            }
        if (min_p > 0 || mass >= (double)top_p * total || cut == 0) {
            sort_candidates(idx, n, p);
            return n;
        }
    }
}

bool zse_sampling_on_device(const zse_sampling *s)
{
    bool repetition = s->repetition_penalty > 0 && s->repetition_penalty != 1.0f;
    return !repetition && s->presence_penalty == 0 && s->frequency_penalty == 0 && s->n_logit_bias == 0 &&
           !s->logprobs && s->top_logprobs == 0 && s->min_tokens == 0;
}

bool zse_sampling_plain_greedy(const zse_sampling *s)
{
    return (s->temperature <= 0 || s->top_k == 1) && zse_sampling_on_device(s);
}

void zse_sample_dist(const zse_sampling *s, float *logits, int vocab, const zse_history *h, float *p, int32_t *idx,
                     zse_dist *d)
{
    memset(d, 0, sizeof *d);
    apply_penalties(s, logits, vocab, h, idx);
    d->argmax = argmax(logits, vocab);
    if (s->temperature <= 0 || s->top_k == 1) {
        d->greedy = true;
        return;
    }
    float mx = logits[d->argmax];
    double total = 0;
    for (int i = 0; i < vocab; i++) {
        p[i] = expf((logits[i] - mx) / s->temperature);
        total += p[i];
    }
    bool top_k = s->top_k > 0 && s->top_k < vocab;
    bool top_p = s->top_p > 0 && s->top_p < 1;
    bool min_p = s->min_p > 0;
    if (!top_k && !top_p && !min_p) { /* plain temperature: every id, in id order */
        d->all = true;
        d->n = vocab;
        d->total = total;
        return;
    }
    int n;
    if (top_k) {
        n = s->top_k;
        top_k_ids(p, vocab, n, idx);
        total = 0; /* top-p renormalizes over what top-k kept (Hugging Face, vLLM) */
        for (int k = 0; k < n; k++)
            total += p[idx[k]];
    } else {
        n = nucleus_candidates(p, vocab, total, top_p ? s->top_p : 1, s->min_p, idx);
    }
    d->written = n;
    if (top_p) {
        double cum = 0;
        int k = 0;
        while (k < n) {
            cum += p[idx[k++]];
            if (cum >= (double)s->top_p * total)
                break;
        }
        n = k;
    }
    if (min_p) {
        float floor_p = p[idx[0]] * s->min_p;
        int k = 1;
        while (k < n && p[idx[k]] >= floor_p)
            k++;
        n = k;
    }
    double kept = 0;
    for (int k = 0; k < n; k++)
        kept += p[idx[k]];
    d->n = n;
    d->total = kept;
}

/* the candidate at rank k (its id) */
static int32_t dist_id(const zse_dist *d, const int32_t *idx, int k) { return d->all ? k : idx[k]; }

/* the candidate the walk reaches u * mass, skipping `skip` (-1: none); the last one
 * when rounding leaves the walk short */
static int32_t dist_walk(const zse_dist *d, const float *p, const int32_t *idx, double target, int32_t skip)
{
    double acc = 0;
    int32_t last = -1;
    for (int k = 0; k < d->n; k++) {
        int32_t id = dist_id(d, idx, k);
        if (id == skip)
            continue;
        acc += p[id];
        last = id;
        if (target < acc)
            return id;
    }
    return last;
}

int32_t zse_dist_draw(const zse_dist *d, const float *p, const int32_t *idx, double u)
{
    if (d->greedy)
        return d->argmax;
    int32_t t = dist_walk(d, p, idx, u * d->total, -1);
    return t >= 0 ? t : d->argmax;
}

int32_t zse_dist_verify(const zse_dist *d, const float *p, const int32_t *idx, int32_t x, zse_rng *rng,
                        bool *accepted)
{
    if (d->greedy) {
        *accepted = d->argmax == x;
        return d->argmax;
    }
    double w = 0;
    for (int k = 0; k < d->n && w == 0; k++)
        if (dist_id(d, idx, k) == x)
            w = p[x];
    /* the draft was proposed with certainty (q(x) = 1): accept with probability p(x) */
    if (zse_rng_uniform(rng) * d->total < w) {
        *accepted = true;
        return x;
    }
    /* else a draw from max(0, p - q) normalized: p without x */
    *accepted = false;
    double rest = d->total - w;
    int32_t t = rest > 0 ? dist_walk(d, p, idx, zse_rng_uniform(rng) * rest, x) : -1;
    return t >= 0 ? t : d->argmax;
}

void zse_dist_release(zse_dist *d, int32_t *idx)
{
    /* idx was scratch: hand it back zeroed for the next call's penalty tables */
    if (d->written)
        memset(idx, 0, (size_t)d->written * sizeof *idx);
    d->written = 0;
}

int32_t zse_sample(const zse_sampling *s, float *logits, int vocab, const zse_history *h, zse_rng *rng,
                   float *p, int32_t *idx)
{
    zse_dist d;
    zse_sample_dist(s, logits, vocab, h, p, idx, &d);
    int32_t t = d.greedy ? d.argmax : zse_dist_draw(&d, p, idx, zse_rng_uniform(rng));
    zse_dist_release(&d, idx);
    return t;
}

/* ---- logprobs ----------------------------------------------------------------------------- */

void zse_compute_logprobs(const float *logits, int vocab, int32_t token, int n_top, zse_logprobs *out)
{
    memset(out, 0, sizeof *out);
    float mx = logits[argmax(logits, vocab)];
    double sum = 0;
    for (int i = 0; i < vocab; i++)
        sum += exp((double)logits[i] - mx);
    double log_z = mx + log(sum);
    out->logprob = valid_id(token, vocab) ? (float)(logits[token] - log_z) : -INFINITY;
    out->rank = 1;
    for (int i = 0; valid_id(token, vocab) && i < vocab; i++)
        out->rank += logits[i] > logits[token] || (logits[i] == logits[token] && i < token);
    if (n_top > ZSE_MAX_TOP_LOGPROBS)
        n_top = ZSE_MAX_TOP_LOGPROBS;
    if (n_top > vocab)
        n_top = vocab;
    /* insertion into a short sorted list; ids scanned ascending keep lower ids first on ties */
    int n = 0;
    for (int32_t i = 0; i < vocab; i++) {
        if (n == n_top && (n == 0 || logits[i] <= logits[out->top_ids[n - 1]]))
            continue;
        int at = n < n_top ? n++ : n - 1;
        while (at > 0 && logits[i] > logits[out->top_ids[at - 1]]) {
            out->top_ids[at] = out->top_ids[at - 1];
            at--;
        }
        out->top_ids[at] = i;
    }
    out->n_top = n;
    for (int k = 0; k < n; k++)
        out->top_logprobs[k] = (float)(logits[out->top_ids[k]] - log_z);
}

/* ---- stop strings ------------------------------------------------------------------------- */

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

const char *zse_stop_find(const char *text, size_t n, const char *const *stop, int n_stop)
{
    const char *first = NULL;
    for (int i = 0; i < n_stop; i++) {
        size_t sl = strlen(stop[i]);
        if (sl == 0 || sl > n)
            continue;
        const char *hit = memmem(text, first ? (size_t)(first - text) + sl - 1 : n, stop[i], sl);
        if (hit && (!first || hit < first))
            first = hit;
    }
    return first;
}

void zse_sampling_default(zse_sampling *s)
{
    memset(s, 0, sizeof *s);
    s->temperature = 1.0f;
    s->top_p = 1.0f;
    s->repetition_penalty = 1.0f;
}
