/* The expert cache's planner: for one MoE layer's step, which of the routed experts are on
 * the device already (hits), which are fetched into which slots (misses; the least recently
 * routed slot not in use by this layer makes room), which run on the host instead, and what
 * to prefetch for the next layer. It only decides and keeps the books: src/model/offload.c
 * issues the copies and kernels, so these rules are unit-tested with a fake clock and no
 * device (tests/unit/test_offload.c).
 *
 * The clock is the caller's (seconds). Each layer's step is one tick: the slots a tick's
 * routing (or prediction) wants are in use until the next tick, and nothing evicts them —
 * their weights may still be read by kernels queued in this tick.
 *
 * Host or fetch, per missing expert (AUTO): the copy engine and the host each finish their
 * queued work at an estimated time (copy_free, host_free); a miss goes to whichever would
 * finish it first — fetching costs its bytes over the measured PCIe bandwidth, computing
 * on the host its bytes once per tile of pairs over the host's measured bandwidth, so a
 * prefill's many tokens stream the expert while one decode token may compute it where it
 * lies. Until the host has been measured nothing runs there.
 *
 * Prefetching guesses the next layer's experts from this layer's rows (its router on them):
 * a right guess hides a fetch behind this layer's compute, a wrong one holds the copy engine
 * that the next layer's real misses wait on, and evicts an expert that may be wanted. So the
 * planner keeps a running share of prefetched experts that were routed to before being
 * evicted, and below ZSE_PREFETCH_MIN_HIT prefetches for one layer in ZSE_PREFETCH_PROBE
 * only — enough to notice when the guesses start to pay again. Under AUTO a guess is also
 * left alone when the copy engine is so far behind that the host would finish the expert
 * first (the rule misses follow, with the pairs the step's rows give each guess): a decode
 * whose misses outrun the link then splits them between the link and the host instead of
 * queueing every guess on the link. (Trained models' routing is
 * well predicted a layer ahead; random weights' is not, and prefetching them moved 3 GB a
 * Mixtral decode step for nothing: docs/BENCHMARKS.md §Models larger than the GPU.) */
#include "model/internal.h"

#include <string.h>

int zse_xcache_init(zse_xcache *c, int n_layers, int n_experts, int n_slots)
{
    memset(c, 0, sizeof *c);
    size_t keys;
    if (n_layers < 1 || n_experts < 1 || n_slots < n_experts || !zse_mul_ok((size_t)n_layers, (size_t)n_experts, &keys))
        return zse_fail("an expert cache of %d slots for %d layers of %d experts: it must hold at least one layer's "
                        "experts", n_slots, n_layers, n_experts);
    c->n_layers = n_layers;
    c->n_experts = n_experts;
    c->n_slots = n_slots;
    c->slot_of = zse_malloc(keys * sizeof *c->slot_of);
    c->key = zse_malloc((size_t)n_slots * sizeof *c->key);
    c->prev = zse_malloc((size_t)n_slots * sizeof *c->prev);
    c->next = zse_malloc((size_t)n_slots * sizeof *c->next);
    c->used = zse_calloc((size_t)n_slots, sizeof *c->used);
    c->prefetched = zse_calloc((size_t)n_slots, sizeof *c->prefetched);
    c->use_mark = zse_malloc((size_t)n_slots * sizeof *c->use_mark);
    c->ready_mark = zse_malloc((size_t)n_slots * sizeof *c->ready_mark);
    if (!c->slot_of || !c->key || !c->prev || !c->next || !c->used || !c->prefetched || !c->use_mark ||
        !c->ready_mark) {
        zse_xcache_free(c);
        return -1;
    }
    for (size_t i = 0; i < keys; i++)
        c->slot_of[i] = -1;
    for (int s = 0; s < n_slots; s++) {
        c->key[s] = -1;
        c->prev[s] = s - 1;
        c->next[s] = s + 1 < n_slots ? s + 1 : -1;
        c->use_mark[s] = c->ready_mark[s] = -1;
    }
    c->head = 0;
    c->tail = n_slots - 1;
    c->tick = 1; /* used[] 0: never wanted */
    c->host_mode = ZSE_HOST_EXPERTS_AUTO;
    c->host_max_pairs = ZSE_HOST_MAX_PAIRS;
    c->prefetch_hit = 1.0;
    return 0;
}

void zse_xcache_free(zse_xcache *c)
{
    free(c->slot_of);
    free(c->key);
    free(c->prev);
    free(c->next);
    free(c->used);
    free(c->prefetched);
    free(c->use_mark);
    free(c->ready_mark);
    memset(c, 0, sizeof *c);
}

/* the slot becomes the most recently wanted, in use for the rest of this tick */
static void touch(zse_xcache *c, int s)
{
    c->used[s] = c->tick;
    if (c->tail == s)
        return;
    const int p = c->prev[s], n = c->next[s]; /* n >= 0: s is not the tail */
    if (p >= 0)
        c->next[p] = n;
    else
        c->head = n;
    c->prev[n] = p;
    c->prev[s] = c->tail;
    c->next[s] = -1;
    c->next[c->tail] = s;
    c->tail = s;
}

/* the least recently wanted slot that this tick does not use, or -1 when every slot is in
 * use (the ones this tick touched are at the tail, so the walk rarely goes far) */
static int victim(const zse_xcache *c)
{
    for (int s = c->head; s >= 0; s = c->next[s])
        if (c->used[s] != c->tick)
            return s;
    return -1;
}

/* a prefetched expert was routed to (hit 1) or evicted unused (0): the running share, over
 * about the last 16 outcomes */
static void prefetch_outcome(zse_xcache *c, double hit)
{
    c->prefetch_hit += (hit - c->prefetch_hit) / 16.0;
}

/* slot s now holds expert (layer, e), whatever it held before */
static void assign(zse_xcache *c, int s, int layer, int e)
{
    if (c->prefetched[s])
        prefetch_outcome(c, 0);
    if (c->key[s] >= 0) {
        c->slot_of[c->key[s]] = -1;
        c->stats.evicted++;
    }
    c->key[s] = layer * c->n_experts + e;
    c->slot_of[c->key[s]] = s;
    c->prefetched[s] = 0;
}

int zse_xcache_slot(const zse_xcache *c, int layer, int e) { return c->slot_of[layer * c->n_experts + e]; }

void zse_xcache_fill(zse_xcache *c, int slot, int layer, int e)
{
    assign(c, slot, layer, e);
    c->used[slot] = 0; /* a warm start: not wanted by any routing yet */
}

static double seconds(uint64_t bytes, double bps) { return bps > 0 ? (double)bytes / bps : 0; }

/* the host's cost of one expert's pairs: its weights are read once per tile of pairs */
static uint64_t host_bytes(uint64_t expert_bytes, int pairs)
{
    return expert_bytes * (uint64_t)((pairs + ZSE_HOST_TILE - 1) / ZSE_HOST_TILE);
}

static double fetch_done(const zse_xcache *c, uint64_t expert_bytes, double now)
{
    return (c->copy_free > now ? c->copy_free : now) + seconds(expert_bytes, c->copy_bps);
}

static double host_done(const zse_xcache *c, uint64_t expert_bytes, int pairs, double now)
{
    return (c->host_free > now ? c->host_free : now) + seconds(host_bytes(expert_bytes, pairs), c->host_bps);
}

/* AUTO's rule: the host would finish an expert of `pairs` pairs before the copy engine could
 * bring it (the host measured, the pairs few enough) */
static bool host_sooner(const zse_xcache *c, uint64_t expert_bytes, int pairs, double now)
{
    return c->host_bps > 0 && pairs <= c->host_max_pairs &&
           host_done(c, expert_bytes, pairs, now) < fetch_done(c, expert_bytes, now);
}

/* whether a missing expert of `pairs` pairs runs on the host; books the time it takes there
 * or on the copy engine */
static bool run_on_host(zse_xcache *c, uint64_t expert_bytes, int pairs, double now)
{
    bool host;
    switch (c->host_mode) {
    case ZSE_HOST_EXPERTS_ALWAYS: host = true; break;
    case ZSE_HOST_EXPERTS_NEVER: host = false; break;
    default: host = host_sooner(c, expert_bytes, pairs, now); break;
    }
    if (host)
        c->host_free = host_done(c, expert_bytes, pairs, now);
    else
        c->copy_free = fetch_done(c, expert_bytes, now);
    return host;
}

void zse_xcache_plan(zse_xcache *c, int layer, const int32_t *active, const int32_t *pairs, int n_active,
                     uint64_t expert_bytes, double now, zse_xplan *out)
{
    c->tick++;
    out->n_fetch = 0;
    out->n_host = 0;
    /* the hits first, so no miss of this layer evicts one */
    for (int a = 0; a < n_active; a++) {
        const int s = zse_xcache_slot(c, layer, active[a]);
        out->where[a] = s;
        if (s < 0)
            continue;
        touch(c, s);
        c->stats.hits++;
        if (c->prefetched[s]) {
            c->stats.prefetch_hits++;
            c->prefetched[s] = 0;
            prefetch_outcome(c, 1);
        }
    }
    /* then the misses, those with the most pairs first: the host takes the cheap ones */
    for (;;) {
        int best = -1;
        for (int a = 0; a < n_active; a++)
            if (out->where[a] == -1 && (best < 0 || pairs[a] > pairs[best]))
                best = a;
        if (best < 0)
            break;
        const int s = victim(c);
        if (s < 0 || run_on_host(c, expert_bytes, pairs[best], now)) {
            /* every slot in use (only with a cache smaller than a layer's experts) or cheaper there */
            out->where[best] = ZSE_XPLAN_HOST;
            out->n_host++;
            c->stats.host++;
            continue;
        }
        assign(c, s, layer, active[best]);
        touch(c, s);
        out->where[best] = s;
        out->fetch_expert[out->n_fetch] = active[best];
        out->fetch_slot[out->n_fetch++] = s;
        c->stats.fetched++;
    }
}

int zse_xcache_prefetch(zse_xcache *c, int layer, const int32_t *experts, int n, int pairs, uint64_t expert_bytes,
                        double now, zse_xplan *out)
{
    out->n_fetch = 0;
    out->n_host = 0;
    if (c->prefetch_hit < ZSE_PREFETCH_MIN_HIT && c->prefetch_calls++ % ZSE_PREFETCH_PROBE != 0) {
        c->stats.prefetch_skipped++;
        return 0;
    }
    for (int i = 0; i < n; i++) {
        const int have = zse_xcache_slot(c, layer, experts[i]);
        if (have >= 0) {
            touch(c, have); /* wanted soon: keep it */
            continue;
        }
        /* a copy engine already behind: the host would finish this expert sooner, should it
         * be routed to, so the link stays free for the misses nothing else can take */
        if (c->host_mode == ZSE_HOST_EXPERTS_AUTO && host_sooner(c, expert_bytes, pairs, now)) {
            c->stats.prefetch_to_host++;
            continue;
        }
        const int s = victim(c);
        if (s < 0)
            break;
        assign(c, s, layer, experts[i]);
        touch(c, s);
        c->prefetched[s] = 1;
        c->copy_free = (c->copy_free > now ? c->copy_free : now) + seconds(expert_bytes, c->copy_bps);
        out->fetch_expert[out->n_fetch] = experts[i];
        out->fetch_slot[out->n_fetch++] = s;
        c->stats.prefetched++;
    }
    return out->n_fetch;
}

void zse_xcache_measured(zse_xcache *c, bool host, uint64_t bytes, double secs)
{
    if (secs <= 0 || bytes == 0)
        return;
    double *bps = host ? &c->host_bps : &c->copy_bps;
    const double now = (double)bytes / secs;
    *bps = *bps > 0 ? 0.75 * *bps + 0.25 * now : now;
}

uint64_t zse_xcache_host_bytes(uint64_t expert_bytes, int pairs) { return host_bytes(expert_bytes, pairs); }
