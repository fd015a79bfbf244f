/* The batching engine (zse_engine_*): one scheduler thread runs steps over every active
 * request. Each step packs, up to max_batch_tokens:
 *
 *   1. one decode token for every running request whose prompt is in the cache, so
 *      decoding never stalls behind a long prompt;
 *   2. the next prefill chunk of running requests still reading their prompt;
 *   3. new requests from the queue, best priority class first, FIFO within a class (the
 *      tenant running the fewest first), while fewer than max_seqs run and the KV cache
 *      has room,
 *
 * except what fair sharing holds back: when several tenants (zse_engine_submit_for) have
 * sequences to run, each step's compute is shared between them by deficit round robin over
 * an estimated cost (fair.c), and the sequences of a tenant past its share sit out the step
 * (keeping slot and KV); a waiting tenant far below another's count of slots takes one of
 * them (preempt_for_fairness). With one tenant nothing is held back.
 *
 * runs one forward pass over the flattened batch (logits only for the rows that end a
 * request's pending tokens), samples, and calls each request's callback with its token.
 *
 * When a request needs a KV block and none is free, the lowest-ranked request not yet in
 * this step is preempted: its blocks go back to the pool and it returns to the queue with
 * its tokens, to be recomputed (prefilled again) later. Generation state (RNG, detokenizer,
 * held-back text) stays with the request, and the CPU math of a row does not depend on the
 * rest of the batch, so preemption and batching never change what a request generates.
 *
 * Locks: e->mu guards the queue, the running list and the stats; the model's run_lock
 * guards the block pool and the backend. Callbacks run on the scheduler thread with
 * neither held, so they may call zse_engine_cancel() or get_stats(). */
#include "engine/engine.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Whose requests they are (zse_engine_submit_for): compute and slots are shared fairly
 * between tenants. Counts are under e->mu; the sharing state belongs to the scheduler
 * thread. A tenant lives while it has requests in the engine. */
typedef struct tenant {
    struct tenant *next;
    char *name;
    int requests;               /* queued or running */
    int running;
    /* deficit round robin (the scheduler thread's) */
    double deficit;             /* cost it may spend beyond its next quantum */
    double demand;              /* what its sequences could run this step would cost */
    double left;                /* what it may still spend this step */
    uint64_t active_step;       /* the last step it had sequences to run in (+1; 0: never) */
    bool backlogged;            /* something of it sat out (or was cut short) this step */
} tenant;

typedef struct request {
    zse_sequence q;             /* tokens, KV table, generation state (seq.c) */
    tenant *tenant;
    uint64_t id;
    int priority;               /* lower runs first (vLLM's convention) */
    uint64_t order;             /* arrival: FIFO within a priority class */
    zse_token_cb cb;
    void *user;
    double queued_at;           /* when it last entered the queue: waiting ages it */
    bool cancelled;             /* asked by zse_engine_cancel (under e->mu) */
    bool paused;                /* asked by zse_engine_pause (under e->mu) */
    bool held;                  /* paused, as this step sees it (the scheduler thread's) */
    struct request *next;       /* in the queue */
    zse_logprobs *plp;          /* prompt_logprobs: [n_prompt], filled as the prompt runs */
    bool plp_sent;              /* they went out with the first event */
    /* this step */
    double lora_rank;           /* its effective priority when adapters were last walked */
    char error[512];            /* why it ended with ZSE_FINISH_ERROR (its adapter did not load) */
    int take;                   /* tokens in the batch; 0 = not in it */
    bool sits_out;              /* fair sharing: its tenant has spent its share of this step */
    int fair_take;              /* fair sharing: at most this many prompt tokens this step (0: any) */
    uint64_t last_step;         /* the step it last ran in: a tenant's longest idle go first */
    int out_index;              /* its first logits row, or -1 */
    int n_rows;                 /* its logits rows (prompt scoring and drafts take several) */
} request;

struct zse_engine {
    zse_model *m;
    zse_engine_params p;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    /* under mu */
    request *queue;             /* sorted by (priority, order) */
    int n_queued;
    request **running;          /* sorted by (priority, order); at most max_seqs */
    int n_running;
    bool stopping;
    double deadline;
    uint64_t next_id, next_order;
    uint64_t preemptions;
    int kv_used;
    uint64_t prefix_hits, prefix_queries;   /* the pool's counters after the last step */
    int prefix_blocks;
    /* the scheduler thread's step buffers */
    zse_batcher batcher;
    zse_step_seq *entries;      /* [max_seqs] the step's sequences, in plan order */
    float *logits;              /* [max_seqs][vocab] */
    int32_t *picked_ids;        /* [max_seqs]: the step's tokens when the backend picked them */
    bool picked_step;           /* this step's tokens come from picked_ids, not from logits */
    zse_sample_row *sample_rows;/* [max_seqs]: what the backend draws by (device sampling) */
    zse_sample_work work;
    struct request **plan_seqs; /* [max_seqs] the step's requests */
    int out_rows;               /* logit rows a step may ask for: a row per sequence, plus drafts */
    zse_spec spec;              /* speculative decoding (spec.c) */
    zse_sequence **drafting;    /* [max_seqs] the sequences a step proposes drafts for */
    int *want;
    zse_spec_stats spec_stats;  /* under mu: spec.stats after the last step */
    zse_offload_stats offload_stats; /* under mu: the model's after the last step */
    request **lora_order;       /* prepare_adapters' walk */
    int lora_cap;
    /* fair sharing between tenants */
    tenant *tenants;            /* under mu */
    int n_tenants;              /* under mu */
    uint64_t steps, fair_waits; /* under mu (the stats' copy) */
    double ctx_cost_seen;       /* under mu: ctx_cost as of the last step */
    uint64_t step_no;           /* the scheduler thread's step counter */
    zse_step_fit fit;           /* what a step costs (fair.c) */
    double ctx_cost;            /* the cost of a token of context this step */
    bool fair_on;               /* this step shares compute: several tenants have work */
    double quantum;             /* this step's share of each tenant */
    tenant **fair_tenants;      /* [max_seqs] the tenants with work this step */
    double *demands;            /* [max_seqs] their demands, sorted */
    int n_fair_tenants;
    request **fair_order;       /* [max_seqs] running requests, longest idle first */
    uint64_t step_waits;        /* sequence-steps sat out in this step */
};

/* logits rows a step keeps for prompts being scored (prompt_logprobs) */
#define SCORE_ROWS 64

static bool ranks_before(const request *a, const request *b)
{
    return a->priority < b->priority || (a->priority == b->priority && a->order < b->order);
}

/* ---- tenants (caller holds e->mu) ------------------------------------------------------------ */

static tenant *tenant_get(zse_engine *e, const char *name)
{
    if (!name)
        name = "";
    for (tenant *t = e->tenants; t; t = t->next)
        if (strcmp(t->name, name) == 0)
            return t;
    tenant *t = zse_calloc(1, sizeof *t);
    if (!t || !(t->name = zse_strdup(name))) {
        free(t);
        return NULL;
    }
    t->next = e->tenants;
    e->tenants = t;
    e->n_tenants++;
    return t;
}

/* one of its requests is gone; the last one takes the tenant with it */
static void tenant_put(zse_engine *e, tenant *t)
{
    if (--t->requests > 0)
        return;
    for (tenant **at = &e->tenants; *at; at = &(*at)->next)
        if (*at == t) {
            *at = t->next;
            e->n_tenants--;
            free(t->name);
            free(t);
            return;
        }
}

/* ---- requests ------------------------------------------------------------------------------- */

static void request_free(zse_engine *e, request *r)
{
    if (!r)
        return;
    if (r->tenant) {
        pthread_mutex_lock(&e->mu);
        tenant_put(e, r->tenant);
        pthread_mutex_unlock(&e->mu);
    }
    zse_sequence_free(&r->q, e->m);
    free(r->plp);
    free(r);
}

static request *request_new(zse_engine *e, const int32_t *prompt, size_t n, const zse_sampling *s)
{
    request *r = zse_calloc(1, sizeof *r);
    if (!r)
        return NULL;
    if (zse_sequence_init(&r->q, e->m, s) != 0) {
        free(r);
        return NULL;
    }
    if (zse_sequence_append(&r->q, prompt, n) != 0 ||
        (r->q.gen.s.prompt_logprobs && !(r->plp = zse_calloc(n, sizeof *r->plp)))) {
        request_free(e, r);
        return NULL;
    }
    r->q.n_prompt = n;
    r->out_index = -1;
    return r;
}

static int index_of(const zse_engine *e, const request *r);
static void running_remove_at(zse_engine *e, int i);

/* Ends a request: off the running list and its tenant's count, its KV back in the pool (and
 * in the stats) and its adapter's slot unpinned before the caller hears of the end, so a
 * caller that saw every request end sees no block in use, no slot pinned and no tenant;
 * then the last event, then the request is freed. */
static void end_request(zse_engine *e, request *r, const zse_token_event *ev)
{
    pthread_mutex_lock(&e->m->run_lock);
    zse_sequence_forget(&r->q, e->m, 0);
    zse_sequence_unpin_adapter(&r->q, e->m);
    int used = zse_block_pool_used(&e->m->blocks);
    pthread_mutex_unlock(&e->m->run_lock);
    pthread_mutex_lock(&e->mu);
    int i = index_of(e, r);
    if (i >= 0)
        running_remove_at(e, i);
    tenant_put(e, r->tenant);
    r->tenant = NULL;
    e->kv_used = used;
    pthread_mutex_unlock(&e->mu);
    r->cb(r->user, ev);
    request_free(e, r);
}

/* the last event of a request that ends without a new token (cancel, error, shutdown);
 * error: what went wrong, for ZSE_FINISH_ERROR */
static void finish_with(zse_engine *e, request *r, zse_finish why, const char *error)
{
    zse_token_event ev = {.token = -1, .text = "", .finish = why, .prompt_tokens = (int)r->q.n_prompt,
                          .completion_tokens = r->q.sampled, .error = error};
    end_request(e, r, &ev);
}

static void finish_without_token(zse_engine *e, request *r, zse_finish why) { finish_with(e, r, why, NULL); }

/* A request with max_tokens ZSE_MAX_TOKENS_NONE whose prompt has run: it ends without a token,
 * its prompt's logprobs (when asked) with it */
static void finish_prompt_only(zse_engine *e, request *r)
{
    zse_token_event ev = {.token = -1, .text = "", .finish = ZSE_FINISH_LENGTH, .prompt_tokens = (int)r->q.n_prompt,
                          .prompt_logprobs = r->plp};
    end_request(e, r, &ev);
}

/* the prompt's logprobs go with a request's first event, once */
static const zse_logprobs *prompt_logprobs_once(request *r)
{
    if (!r->plp || r->plp_sent)
        return NULL;
    r->plp_sent = true;
    return r->plp;
}

/* ---- the queue and the running list (caller holds e->mu) ------------------------------------ */

static void queue_insert(zse_engine *e, request *r)
{
    r->queued_at = zse_now();
    request **at = &e->queue;
    while (*at && !ranks_before(r, *at))
        at = &(*at)->next;
    r->next = *at;
    *at = r;
    e->n_queued++;
}

static void queue_remove(zse_engine *e, request *r)
{
    for (request **at = &e->queue; *at; at = &(*at)->next)
        if (*at == r) {
            *at = r->next;
            r->next = NULL;
            e->n_queued--;
            return;
        }
}

/* A waiting request's priority improves by one level for every priority_aging_s it has
 * waited, so a stream of better-ranked arrivals never keeps it waiting for ever. */
static double effective_priority(const zse_engine *e, const request *r, double now)
{
    if (e->p.priority_aging_s <= 0)
        return r->priority;
    return r->priority - floor((now - r->queued_at) / e->p.priority_aging_s);
}

/* a request whose adapter is not yet in a slot waits for it, whatever its rank */
static bool adapter_waits(const request *r) { return r->q.adapter && r->q.lora_slot < 0; }

/* The waiting request to admit next. The best effective priority, then arrival, picks the
 * priority class; within that class the tenant running the fewest sequences goes first
 * (then effective priority and arrival, so with one tenant the order is exactly that of
 * effective priority and arrival). */
static request *queue_best(const zse_engine *e, double now)
{
    request *best = NULL;
    double best_p = 0;
    for (request *r = e->queue; r; r = r->next) {
        if (adapter_waits(r) || r->paused)
            continue;
        double p = effective_priority(e, r, now);
        if (!best || p < best_p || (p == best_p && r->order < best->order)) {
            best = r;
            best_p = p;
        }
    }
    if (!best || e->n_tenants < 2)
        return best;
    request *fair = best;
    double fair_p = best_p;
    for (request *r = e->queue; r; r = r->next) {
        if (adapter_waits(r) || r->paused || r->priority != best->priority || r == best)
            continue;
        double p = effective_priority(e, r, now);
        int fewer = r->tenant->running - fair->tenant->running;
        if (fewer < 0 || (fewer == 0 && (p < fair_p || (p == fair_p && r->order < fair->order)))) {
            fair = r;
            fair_p = p;
        }
    }
    return fair;
}

static void running_insert(zse_engine *e, request *r)
{
    r->tenant->running++;
    int i = e->n_running++;
    while (i > 0 && ranks_before(r, e->running[i - 1])) {
        e->running[i] = e->running[i - 1];
        i--;
    }
    e->running[i] = r;
}

static void running_remove_at(zse_engine *e, int i)
{
    e->running[i]->tenant->running--;
    memmove(e->running + i, e->running + i + 1, (size_t)(e->n_running - i - 1) * sizeof *e->running);
    e->n_running--;
}

/* moves cancelled requests (and, past the stop deadline, all of them) to *ended */
static void take_cancelled(zse_engine *e, bool everything, request **ended)
{
    for (request **at = &e->queue; *at;) {
        request *r = *at;
        if (r->cancelled || everything) {
            *at = r->next;
            e->n_queued--;
            r->next = *ended;
            *ended = r;
        } else {
            at = &r->next;
        }
    }
    for (int i = e->n_running - 1; i >= 0; i--) {
        request *r = e->running[i];
        if (r->cancelled || everything) {
            running_remove_at(e, i);
            r->next = *ended;
            *ended = r;
        }
    }
}

/* ---- planning a step (caller holds the model's run_lock) ------------------------------------ */

typedef struct {
    int n_tokens;               /* tokens placed so far */
    int n_seqs;
    int n_rows;                 /* logits rows they take */
    request **seqs;             /* placed requests in batch order */
} plan;

/* the logits rows of r's part of the step: a row where its pending tokens end, one more per
 * draft, and every row of a prompt being scored */
static int rows_of(const request *r, int take)
{
    const bool ends = r->q.n_cached + (size_t)take == r->q.n_tokens;
    if (r->plp && r->q.n_cached < r->q.n_prompt)
        return take;
    return ends ? 1 + r->q.n_draft : 0;
}

static void place(plan *pl, request *r, int take)
{
    r->take = take;
    r->n_rows = rows_of(r, take);
    pl->seqs[pl->n_seqs++] = r;
    pl->n_tokens += take;
    pl->n_rows += r->n_rows;
}

/* tokens of a prompt being scored that the step's rows leave room for: one row each, and a
 * row kept for every other sequence the step may still place */
static int scoring_take(const zse_engine *e, const plan *pl, int take)
{
    int room = e->out_rows - pl->n_rows - (e->p.max_seqs - pl->n_seqs - 1);
    return take < room ? take : room > 0 ? room : 0;
}

/* puts a running request back in the queue, its KV freed, to be recomputed later */
static void preempt(zse_engine *e, int i)
{
    request *r = e->running[i];
    zse_spec_drop(&r->q);
    zse_sequence_forget(&r->q, e->m, 0);
    pthread_mutex_lock(&e->mu);
    running_remove_at(e, i);
    queue_insert(e, r);
    e->preemptions++;
    pthread_mutex_unlock(&e->mu);
}

/* Frees blocks by preempting the lowest-ranked running requests that are not in this
 * step and rank after `r`, until `blocks` are free. True when they are. */
static bool make_room(zse_engine *e, const request *r, int blocks)
{
    while (zse_block_pool_available(&e->m->blocks) < blocks) {
        int victim = -1;
        for (int j = e->n_running - 1; j >= 0 && victim < 0; j--) {
            request *c = e->running[j];
            if (c != r && c->take == 0 && ranks_before(r, c) && c->q.kv.n_blocks > 0)
                victim = j;
        }
        if (victim < 0)
            return false;
        preempt(e, victim);
    }
    return true;
}

static int index_of(const zse_engine *e, const request *r)
{
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i] == r)
            return i;
    return -1;
}

/* tokens from n_cached on that fit the blocks the request has plus the free ones */
static int tokens_that_fit(const zse_engine *e, const request *r, int want)
{
    size_t room = (size_t)(r->q.kv.n_blocks + zse_block_pool_available(&e->m->blocks)) * ZSE_KV_BLOCK;
    size_t fit = room > r->q.n_cached ? room - r->q.n_cached : 0;
    return fit < (size_t)want ? (int)fit : want;
}

/* ---- fair compute sharing between tenants (deficit round robin) ---------------------------- */

#define HEAVY 2.0           /* a tenant is held back when it wants more than this × the median */

/* the tokens r would run this step if nothing held it back: its decode token and drafts,
 * or its next prompt chunk */
static int wanted_take(const zse_engine *e, const request *r)
{
    size_t pending = zse_sequence_pending(&r->q);
    if (pending <= 1 + (size_t)r->q.n_draft)
        return (int)pending;
    return pending < (size_t)e->p.max_batch_tokens ? (int)pending : e->p.max_batch_tokens;
}

/* what `take` tokens after `before` cached ones add to a step (fair.c's units) */
static double cost_at(const zse_engine *e, size_t before, int take)
{
    return take + e->ctx_cost * zse_step_context(before, take);
}

/* the prompt tokens after `before` that `budget` pays for, at most `want`:
 * cost(k) = (c/2) k² + (1 + c·before + c/2) k */
static int affordable(const zse_engine *e, size_t before, double budget, int want)
{
    const double c = e->ctx_cost, lin = 1 + c * (double)before + c / 2;
    double k = c > 0 ? (sqrt(lin * lin + 2 * c * budget) - lin) / c : budget;
    int n = k >= want ? want : k > 0 ? (int)k : 0;
    while (n > 0 && cost_at(e, before, n) > budget) /* rounding */
        n--;
    return n;
}

static void sit_out(zse_engine *e, request *r)
{
    r->sits_out = true;
    if (r->q.n_draft)
        zse_spec_drop(&r->q);
    e->step_waits++;
}

/* a tenant's first sequence this step: it joins the step's tenants with no demand yet; a
 * tenant that had nothing to run last step saved no credit (deficit round robin) */
static void tenant_joins_step(zse_engine *e, tenant *t)
{
    if (t->active_step == e->step_no)
        return;
    if (t->active_step + 1 != e->step_no)
        t->deficit = 0;
    t->active_step = e->step_no;
    t->demand = 0;
    t->backlogged = false;
    t->left = t->deficit + e->quantum;
    e->fair_tenants[e->n_fair_tenants++] = t;
}

/* Before a step is planned: when several tenants have sequences to run and some want more
 * than HEAVY times the median tenant's cost, each gets a quantum of cost this step (the
 * largest demand that is not heavy, so only heavy tenants are held back, each to what the
 * largest other one takes) plus what it saved while held back.
 * Tenants within HEAVY of the median (clients alike but for their contexts' lengths) are
 * never held back. A tenant's sequences take it in the order they last
 * ran, longest idle first; a prompt chunk is cut to what is left; the first that does not
 * fit and the rest of the tenant's sit out this step, keeping their slots and KV. With one
 * tenant with work, nothing is held back. Scheduler thread, run_lock held. */
static void share_compute(zse_engine *e)
{
    e->step_no++;
    e->fair_on = false;
    e->quantum = 0;
    e->n_fair_tenants = 0;
    e->step_waits = 0;
    e->ctx_cost = e->p.ctx_cost > 0 ? e->p.ctx_cost : e->fit.ctx_cost;
    int n = 0;
    for (int i = 0; i < e->n_running; i++) {
        request *r = e->running[i];
        r->sits_out = r->held; /* paused: no step at all, no share */
        r->fair_take = 0;
        if (r->held) {
            if (r->q.n_draft)
                zse_spec_drop(&r->q);
            continue;
        }
        tenant_joins_step(e, r->tenant);
        int take = wanted_take(e, r);
        if (take > 0) {
            r->tenant->demand += cost_at(e, r->q.n_cached, take);
            e->fair_order[n++] = r;
        }
    }
    /* the demands, ascending (at most max_seqs tenants) */
    double *d = e->demands;
    int active = 0;
    for (int i = 0; i < e->n_fair_tenants; i++) {
        double v = e->fair_tenants[i]->demand;
        if (v <= 0)
            continue;
        int j = active++;
        for (; j > 0 && d[j - 1] > v; j--)
            d[j] = d[j - 1];
        d[j] = v;
    }
    if (active < 2 || e->p.no_compute_share)
        return;
    /* heavy: more than twice the median demand; the quantum is the largest demand that is
     * not heavy, so every other tenant runs whole and each heavy one gets as much as the
     * largest of them */
    double heavy = HEAVY * d[(active - 1) / 2], quantum = 0;
    for (int i = 0; i < active && d[i] <= heavy; i++)
        quantum = d[i];
    if (d[active - 1] <= quantum)
        return; /* nobody is heavy: nothing is held back */
    e->fair_on = true;
    e->quantum = quantum;
    for (int i = 0; i < e->n_fair_tenants; i++)
        e->fair_tenants[i]->left = e->fair_tenants[i]->deficit + e->quantum;
    for (int i = 1; i < n; i++) { /* stable: rank order among equals */
        request *r = e->fair_order[i];
        int j = i;
        for (; j > 0 && e->fair_order[j - 1]->last_step > r->last_step; j--)
            e->fair_order[j] = e->fair_order[j - 1];
        e->fair_order[j] = r;
    }
    for (int i = 0; i < n; i++) {
        request *r = e->fair_order[i];
        tenant *t = r->tenant;
        if (t->backlogged) {
            sit_out(e, r);
            continue;
        }
        int take = wanted_take(e, r);
        double c = cost_at(e, r->q.n_cached, take);
        if (c <= t->left) {
            t->left -= c;
            continue;
        }
        t->backlogged = true;
        bool prompt = zse_sequence_pending(&r->q) > 1 + (size_t)r->q.n_draft;
        int part = prompt ? affordable(e, r->q.n_cached, t->left, take) : 0;
        if (part > 0) {
            r->fair_take = part;
            t->left -= cost_at(e, r->q.n_cached, part);
        } else {
            sit_out(e, r);
        }
    }
}

/* An admitted request's first chunk. A tenant none of whose sequences sat out this step
 * (a tenant new to the step gets a quantum) and that has something left starts it whole,
 * whatever it costs: a client's next prompt is a burst, not a share taken from others,
 * and a tenant that runs all it has saves no debt (settle_shares). A tenant held back
 * gets what it has left (it is then held back); 0: the request takes its slot and runs
 * in a later step. */
static int fair_admission_take(zse_engine *e, request *r, size_t from, int take)
{
    if (!e->fair_on)
        return take;
    tenant *t = r->tenant;
    tenant_joins_step(e, t);
    int part = !t->backlogged && t->left > 0 ? take : t->backlogged ? affordable(e, from, t->left, take) : 0;
    if (part < take)
        t->backlogged = true;
    t->left -= cost_at(e, from, part);
    return part;
}

/* after planning: a tenant held back keeps what it did not spend for its next steps */
static void settle_shares(zse_engine *e)
{
    for (int i = 0; i < e->n_fair_tenants; i++) {
        tenant *t = e->fair_tenants[i];
        t->deficit = e->fair_on && t->backlogged ? t->left : 0;
    }
}

/* Pass 1: one decode token for every running request whose prompt is cached. A request
 * that cannot get a block preempts lower-ranked ones, or is itself preempted. Requests that
 * can never fit (alone with the whole pool) end with LENGTH; they go to *full. */
static void plan_decodes(zse_engine *e, plan *pl, request **full)
{
    for (int i = 0; i < e->n_running && pl->n_tokens < e->p.max_batch_tokens; i++) {
        request *r = e->running[i];
        if (r->sits_out || zse_sequence_pending(&r->q) != 1 + (size_t)r->q.n_draft)
            continue;
        /* drafts ride along while the step's budget and the pool have room for them */
        if (r->q.n_draft && (pl->n_tokens + 1 + r->q.n_draft > e->p.max_batch_tokens ||
                             zse_sequence_blocks_needed(&r->q, r->q.n_tokens) > zse_block_pool_available(&e->m->blocks)))
            zse_spec_drop(&r->q);
        int need = zse_sequence_blocks_needed(&r->q, r->q.n_tokens);
        if (need > zse_block_pool_available(&e->m->blocks) && !make_room(e, r, need)) {
            i = index_of(e, r); /* make_room may have shifted the list */
            /* nobody else holds blocks: the pool cannot hold this sequence, it ends here */
            bool alone = r->q.kv.n_blocks + zse_block_pool_available(&e->m->blocks) == e->m->blocks.n_blocks;
            if (alone) {
                pthread_mutex_lock(&e->mu);
                running_remove_at(e, i);
                pthread_mutex_unlock(&e->mu);
                r->next = *full; /* ended after the step, with LENGTH */
                *full = r;
            } else {
                preempt(e, i);
            }
            i--;
            continue;
        }
        i = index_of(e, r);
        zse_sequence_reserve(&r->q, e->m, r->q.n_tokens);
        place(pl, r, 1 + r->q.n_draft);
    }
}

/* Pass 2: prefill chunks of running requests still reading their prompt (or recomputing
 * after a preemption), as far as the budget and the free blocks go. */
static void plan_prefills(zse_engine *e, plan *pl)
{
    for (int i = 0; i < e->n_running && pl->n_tokens < e->p.max_batch_tokens; i++) {
        request *r = e->running[i];
        if (r->take || r->sits_out || r->q.n_draft || zse_sequence_pending(&r->q) < 2)
            continue;
        int want = (int)zse_sequence_pending(&r->q);
        if (r->fair_take && want > r->fair_take)
            want = r->fair_take;
        int budget = e->p.max_batch_tokens - pl->n_tokens;
        if (want > budget)
            want = budget;
        if (r->plp)
            want = scoring_take(e, pl, want);
        int take = tokens_that_fit(e, r, want);
        if (take == 0 && pl->n_seqs == 0 && want > 0) {
            /* nothing else runs this step: lower-ranked requests give way */
            make_room(e, r, zse_sequence_blocks_needed(&r->q, r->q.n_cached + (size_t)want));
            i = index_of(e, r);
            take = tokens_that_fit(e, r, want);
        }
        if (take == 0)
            continue;
        zse_sequence_reserve(&r->q, e->m, r->q.n_cached + (size_t)take);
        place(pl, r, take);
    }
}

/* Pass 3: new (or preempted) requests from the queue, in rank order, while there is room:
 * a slot below max_seqs, budget, and blocks for the first chunk with one spare block per
 * running request left over (so the next steps' decodes rarely preempt). */
static void plan_admissions(zse_engine *e, plan *pl)
{
    for (bool made_room = false;;) {
        int budget = e->p.max_batch_tokens - pl->n_tokens;
        pthread_mutex_lock(&e->mu);
        request *r = queue_best(e, zse_now());
        bool ok = r && !r->cancelled && budget > 0 && e->n_running < e->p.max_seqs;
        int take = 0, short_of = 0;
        size_t from = 0;
        if (ok) {
            /* blocks of its prompt in the prefix cache need no computing; those no one holds
             * come out of the available ones */
            int idle = 0, hits = r->plp ? 0 : zse_sequence_cached_prefix(&r->q, e->m, &idle);
            from = r->q.n_cached + (size_t)hits * ZSE_KV_BLOCK;
            size_t left = r->q.n_tokens - from;
            take = (int)(left < (size_t)budget ? left : (size_t)budget);
            if (r->plp)
                take = scoring_take(e, pl, take);
            ok = take > 0;
            int need = zse_sequence_blocks_needed(&r->q, from + (size_t)take) - hits;
            int avail = zse_block_pool_available(&e->m->blocks) - idle;
            int spare = e->n_running;
            ok = ok && (need + spare <= avail || (e->n_running == 0 && need <= avail));
            short_of = need + spare - avail;
        }
        if (ok) {
            queue_remove(e, r);
            running_insert(e, r);
        }
        pthread_mutex_unlock(&e->mu);
        if (!ok && short_of > 0 && !made_room) {
            /* KV for a request that outranks running ones not in this step: they give way */
            made_room = true;
            if (make_room(e, r, zse_block_pool_available(&e->m->blocks) + short_of))
                continue;
        }
        if (!ok)
            return;
        made_room = false;
        if (!r->plp) /* a scored prompt is computed whole: every position's logits are wanted */
            zse_sequence_attach_prefix(&r->q, e->m);
        take = fair_admission_take(e, r, from, take);
        if (take == 0)
            continue; /* its tenant's share of this step is spent: it runs in a later one */
        zse_sequence_reserve(&r->q, e->m, r->q.n_cached + (size_t)take);
        place(pl, r, take);
    }
}

/* ---- adapters: a waiting request's adapter is brought to a slot while others run ----------- */

static int cmp_rank(const void *pa, const void *pb)
{
    const request *a = *(request *const *)pa, *b = *(request *const *)pb;
    return a->lora_rank < b->lora_rank ? -1 : a->lora_rank > b->lora_rank ? 1 : a->order < b->order ? -1 : 1;
}

/* Walks the waiting requests whose adapter is not in a slot yet, best effective rank first:
 * each pins its adapter's slot when the adapter is there, else its fetch is started (a disk
 * read on the loader thread, a copy into a free slot) and it keeps waiting while others run.
 * Once a request finds every slot in use, those ranked after it take no slot (they may
 * still be read into host memory): slots then drain to it as requests end, so a stream of
 * requests for resident adapters cannot keep it out for ever. Requests whose adapter
 * failed to load go to *failed. run_lock held. */
static void prepare_adapters(zse_engine *e, request **failed)
{
    if (!e->m->lora)
        return;
    pthread_mutex_lock(&e->mu);
    double now = zse_now();
    int n = 0;
    for (request *r = e->queue; r; r = r->next)
        n += adapter_waits(r) && !r->cancelled;
    if (n == 0) {
        pthread_mutex_unlock(&e->mu);
        return;
    }
    if (n > e->lora_cap) {
        request **p = zse_realloc(e->lora_order, (size_t)n * sizeof *p);
        if (!p) {
            pthread_mutex_unlock(&e->mu);
            return; /* they wait for a later step */
        }
        e->lora_order = p;
        e->lora_cap = n;
    }
    n = 0;
    for (request *r = e->queue; r; r = r->next)
        if (adapter_waits(r) && !r->cancelled) {
            r->lora_rank = effective_priority(e, r, now);
            e->lora_order[n++] = r;
        }
    qsort(e->lora_order, (size_t)n, sizeof *e->lora_order, cmp_rank);
    bool starved = false;
    for (int i = 0; i < n; i++) {
        request *r = e->lora_order[i];
        zse_lora_pin_state st = zse_sequence_pin_adapter(&r->q, e->m, !starved);
        if (st == ZSE_LORA_STARVED)
            starved = true;
        if (st == ZSE_LORA_FAILED) {
            snprintf(r->error, sizeof r->error, "%s", zse_error_message());
            queue_remove(e, r);
            r->next = *failed;
            *failed = r;
        }
    }
    pthread_mutex_unlock(&e->mu);
}

/* Every slot taken and a waiting request of a strictly better priority: the worst-ranked
 * running requests go back to the queue for it (their full blocks stay in the prefix cache,
 * so resuming recomputes little). Aging never preempts: it orders admissions only, so two
 * requests of one priority never take turns evicting each other. */
static void preempt_for_priority(zse_engine *e)
{
    for (;;) {
        pthread_mutex_lock(&e->mu);
        request *r = e->n_running == e->p.max_seqs ? queue_best(e, zse_now()) : NULL;
        int worst = e->n_running - 1;
        bool go = r && !r->cancelled && worst >= 0 && r->priority < e->running[worst]->priority;
        pthread_mutex_unlock(&e->mu);
        if (!go)
            return;
        preempt(e, worst);
    }
}

/* Every slot taken and the next waiting request's tenant runs at least two sequences fewer
 * than another tenant of its priority: that tenant's newest running sequence of the
 * priority goes back to the queue for it (its full blocks stay in the prefix cache). Two
 * fewer, so that two tenants never take turns evicting each other; one a step, so that a
 * tenant arriving with many requests does not empty another's slots at once. */
static void preempt_for_fairness(zse_engine *e)
{
    pthread_mutex_lock(&e->mu);
    request *r = e->n_running == e->p.max_seqs && e->n_tenants > 1 ? queue_best(e, zse_now()) : NULL;
    int victim = -1;
    for (int i = 0; r && !r->cancelled && i < e->n_running; i++) {
        const request *c = e->running[i];
        if (c->tenant == r->tenant || c->priority != r->priority || c->tenant->running < r->tenant->running + 2)
            continue;
        const request *v = victim >= 0 ? e->running[victim] : NULL;
        if (!v || c->tenant->running > v->tenant->running ||
            (c->tenant->running == v->tenant->running && c->order > v->order))
            victim = i;
    }
    pthread_mutex_unlock(&e->mu);
    if (victim >= 0)
        preempt(e, victim);
}

/* ---- running a step --------------------------------------------------------------------------- */

/* flattens the plan into a zse_batch and runs the model; logits land in e->logits (or,
 * when the backend picked every sampled row's token, the ids in e->picked_ids) */
static int run_plan(zse_engine *e, const plan *pl)
{
    for (int s = 0; s < pl->n_seqs; s++) {
        request *r = pl->seqs[s];
        e->entries[s] = (zse_step_seq){.q = &r->q, .take = r->take, .n_out = r->n_rows, .out = -1, .logits = r->plp != NULL};
    }
    zse_batch b;
    if (zse_batcher_pack(&e->batcher, e->entries, pl->n_seqs, &b) != 0)
        return -1;
    for (int s = 0; s < pl->n_seqs; s++)
        pl->seqs[s]->out_index = e->entries[s].out;
    /* when every row that samples is plain greedy, only the argmax ids leave the backend
     * (on a GPU the logits stay there); the host sampler's argmax picks the same id */
    zse_out_mode mode = zse_step_out_mode(e->m, e->entries, pl->n_seqs, true);
    e->picked_step = b.n_out > 0 && mode != ZSE_OUT_LOGITS;
    /* constrained rows: their masks go where the logits are */
    zse_row_masks masks;
    if (e->picked_step && zse_batcher_masks(e->m, &e->batcher, e->entries, pl->n_seqs, &masks) != 0)
        return -1;
    if (e->picked_step && mode == ZSE_OUT_ARGMAX)
        return zse_llm_forward_argmax(e->m->llm, e->m->kv, &b, &masks, e->picked_ids);
    if (e->picked_step) {
        /* temperature, top-k, top-p and min-p where the logits are: each row draws with its
         * request's RNG, one uniform per sampled token as on the host */
        for (int s = 0; s < pl->n_seqs; s++) {
            request *r = pl->seqs[s];
            if (r->out_index < 0)
                continue;
            const zse_sampling *sp = &r->q.gen.s;
            const bool g = sp->temperature <= 0 || sp->top_k == 1;
            e->sample_rows[r->out_index] = (zse_sample_row){sp->temperature, sp->top_p, sp->min_p,
                                                            g ? 0.f : (float)zse_rng_uniform(&r->q.gen.rng), sp->top_k};
        }
        return zse_llm_forward_sample(e->m->llm, e->m->kv, &b, &masks, e->sample_rows, e->picked_ids);
    }
    return zse_llm_forward(e->m->llm, e->m->kv, &b, e->logits);
}

/* Samples a request's next token from its logits row and tells the caller; a request
 * that is over is ended (and freed) here. */
static void sample_and_emit(zse_engine *e, request *r)
{
    zse_logprobs lp = {0};
    const int row = r->out_index + r->n_rows - 1; /* the last of its rows samples */
    int32_t t = e->picked_step ? e->picked_ids[row]
                               : zse_sequence_sample(&r->q, e->m, e->logits + (size_t)row * (size_t)e->m->vocab,
                                                     &e->work, &lp);
    zse_buf text = {0};
    zse_finish fin;
    if (zse_sequence_accept(&r->q, e->m, t, &text, &fin) != 0) {
        zse_buf_free(&text);
        finish_without_token(e, r, ZSE_FINISH_ERROR);
        return;
    }
    zse_token_event ev = {.token = t, .text = zse_buf_str(&text), .logprob = lp.logprob, .n_top = lp.n_top,
                          .top_ids = lp.top_ids, .top_logprobs = lp.top_logprobs, .finish = fin,
                          .prompt_tokens = (int)r->q.n_prompt, .completion_tokens = r->q.sampled,
                          .prompt_logprobs = prompt_logprobs_once(r)};
    if (fin != ZSE_FINISH_NONE) {
        end_request(e, r, &ev);
    } else if (!r->cb(r->user, &ev)) { /* the caller is gone */
        finish_without_token(e, r, ZSE_FINISH_CANCELLED);
    }
    zse_buf_free(&text);
}

/* A request that ran drafts: verification decides what is kept, and each kept token goes
 * to the caller as sampling one would (the first ones' K/V are stored already). */
static void spec_emit(zse_engine *e, request *r)
{
    int32_t out[1 + ZSE_SPEC_MAX_TOKENS];
    zse_logprobs lps[1 + ZSE_SPEC_MAX_TOKENS] = {{0}};
    float *rows = e->picked_step ? NULL : e->logits + (size_t)r->out_index * (size_t)e->m->vocab;
    int n = zse_spec_verify(&e->spec, &r->q, e->m, rows, e->picked_step ? e->picked_ids + r->out_index : NULL,
                            &e->work, out, lps);
    for (int k = 0; k < n; k++) {
        zse_buf text = {0};
        zse_finish fin;
        if (zse_sequence_accept(&r->q, e->m, out[k], &text, &fin) != 0) {
            zse_buf_free(&text);
            finish_without_token(e, r, ZSE_FINISH_ERROR);
            return;
        }
        if (k < n - 1 && fin == ZSE_FINISH_NONE)
            r->q.n_cached++; /* an accepted draft: its K/V came with the pass */
        const zse_logprobs *lp = &lps[k];
        zse_token_event ev = {.token = out[k], .text = zse_buf_str(&text), .logprob = lp->logprob, .n_top = lp->n_top,
                              .top_ids = lp->top_ids, .top_logprobs = lp->top_logprobs, .finish = fin,
                              .prompt_tokens = (int)r->q.n_prompt, .completion_tokens = r->q.sampled,
                              .prompt_logprobs = prompt_logprobs_once(r)};
        bool gone = false;
        if (fin != ZSE_FINISH_NONE)
            end_request(e, r, &ev);
        else if ((gone = !r->cb(r->user, &ev)))
            finish_without_token(e, r, ZSE_FINISH_CANCELLED);
        zse_buf_free(&text);
        if (fin != ZSE_FINISH_NONE || gone)
            return;
    }
}

/* Drafts for the running requests in their decode phase, as many as the step's logit rows
 * leave room for beyond the row every sequence of the step may need. Failing to draft is
 * not an error of the requests: they decode without drafts. */
static void propose_drafts(zse_engine *e)
{
    if (!zse_spec_on(&e->spec))
        return;
    int rows_left = e->out_rows - e->p.max_seqs, n = 0;
    for (int i = 0; i < e->n_running && rows_left > 0; i++) {
        request *r = e->running[i];
        int room = r->held ? 0 : zse_spec_room(&e->spec, &r->q, e->m);
        if (room <= 0)
            continue;
        e->want[n] = room < rows_left ? room : rows_left;
        rows_left -= e->want[n];
        e->drafting[n++] = &r->q;
    }
    if (n && zse_spec_propose(&e->spec, e->m, e->drafting, e->want, n) != 0) {
        zse_log(ZSE_LOG_WARN, "speculative decoding: drafting failed (%s); decoding without drafts this step",
                zse_error_message());
        for (int i = 0; i < n; i++)
            zse_spec_drop(e->drafting[i]);
    }
}

/* the logprob of each prompt token this step's rows predict: row k of a scored chunk is the
 * model's distribution after position n_cached + k, which the prompt's next token takes */
static void score_prompt_rows(zse_engine *e, request *r)
{
    const size_t vocab = (size_t)e->m->vocab;
    for (int k = 0; k < r->n_rows; k++) {
        size_t next = r->q.n_cached + (size_t)k + 1;
        if (next >= r->q.n_prompt)
            break;
        zse_compute_logprobs(e->logits + (size_t)(r->out_index + k) * vocab, e->m->vocab, r->q.tokens[next],
                             r->q.gen.s.prompt_top_logprobs, &r->plp[next]);
    }
}

/* One step. Returns the number of tokens it ran (0: nothing could run). */
static int step(zse_engine *e)
{
    plan pl = {.seqs = e->plan_seqs};
    request *full = NULL, *failed = NULL;
    pthread_mutex_lock(&e->m->run_lock);
    prepare_adapters(e, &failed);
    preempt_for_priority(e);
    preempt_for_fairness(e);
    pthread_mutex_unlock(&e->m->run_lock);
    while (failed) {
        request *r = failed;
        failed = r->next;
        finish_with(e, r, ZSE_FINISH_ERROR, r->error);
    }
    pthread_mutex_lock(&e->mu); /* what zse_engine_pause asked, as this step sees it */
    for (int i = 0; i < e->n_running; i++)
        e->running[i]->held = e->running[i]->paused;
    pthread_mutex_unlock(&e->mu);
    propose_drafts(e);
    pthread_mutex_lock(&e->m->run_lock);
    for (int i = 0; i < e->n_running; i++)
        e->running[i]->take = 0;
    share_compute(e);
    plan_decodes(e, &pl, &full);
    plan_prefills(e, &pl);
    plan_admissions(e, &pl);
    settle_shares(e);
    double context = 0;
    for (int s = 0; s < pl.n_seqs; s++) {
        context += zse_step_context(pl.seqs[s]->q.n_cached, pl.seqs[s]->take);
        pl.seqs[s]->last_step = e->step_no;
    }
    double t0 = zse_now();
    int rc = pl.n_seqs ? run_plan(e, &pl) : 0;
    if (rc == 0 && pl.n_seqs)
        zse_step_fit_add(&e->fit, pl.n_tokens, context, zse_now() - t0);
    for (int s = 0; rc == 0 && s < pl.n_seqs; s++) { /* K/V now stored: full blocks join the cache */
        request *r = pl.seqs[s];
        if (r->plp && !e->picked_step)
            score_prompt_rows(e, r);
        if (!r->q.n_draft) /* with drafts, verification says how far the K/V hold */
            r->q.n_cached += (size_t)r->take;
        zse_sequence_publish(&r->q, e->m);
    }
    int used = zse_block_pool_used(&e->m->blocks);
    zse_block_pool pool = e->m->blocks; /* its counters, read under the lock */
    zse_offload_stats offload;
    zse_offload_stats_of(e->m->llm, &offload);
    zse_model_note_memory(e->m);
    pthread_mutex_unlock(&e->m->run_lock);
    pthread_mutex_lock(&e->mu);
    e->offload_stats = offload;
    e->kv_used = used;
    e->prefix_hits = pool.hit_tokens;
    e->prefix_queries = pool.query_tokens;
    e->prefix_blocks = pool.n_published;
    e->spec_stats = e->spec.stats;
    e->steps += pl.n_seqs > 0;
    e->fair_waits += e->step_waits;
    e->ctx_cost_seen = e->ctx_cost;
    pthread_mutex_unlock(&e->mu);

    while (full) {
        request *r = full;
        full = r->next;
        finish_without_token(e, r, ZSE_FINISH_LENGTH);
    }
    if (rc != 0) {
        zse_log(ZSE_LOG_ERROR, "engine step of %d tokens failed: %s", pl.n_tokens, zse_error_message());
        char why[ZSE_ERROR_MAX];
        snprintf(why, sizeof why, "%s", zse_error_message());
        for (int s = 0; s < pl.n_seqs; s++)
            finish_with(e, pl.seqs[s], ZSE_FINISH_ERROR, why);
        return pl.n_tokens;
    }
    for (int s = 0; s < pl.n_seqs; s++) {
        request *r = pl.seqs[s];
        r->take = 0;
        bool prompt_done = r->q.n_cached == r->q.n_tokens;
        if (prompt_done && r->q.gen.s.max_tokens == ZSE_MAX_TOKENS_NONE && r->q.sampled == 0)
            finish_prompt_only(e, r);
        else if (r->out_index >= 0 && r->q.n_draft)
            spec_emit(e, r);
        else if (r->out_index >= 0 && prompt_done)
            sample_and_emit(e, r);
    }
    return pl.n_tokens;
}

/* ---- the scheduler thread --------------------------------------------------------------------- */

static bool any_cancelled(const zse_engine *e)
{
    for (const request *r = e->queue; r; r = r->next)
        if (r->cancelled)
            return true;
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i]->cancelled)
            return true;
    return false;
}

static void timed_wait(zse_engine *e, double seconds)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double whole = floor(seconds);
    ts.tv_sec += (time_t)whole;
    ts.tv_nsec += (long)((seconds - whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&e->wake, &e->mu, &ts);
}

static void *engine_main(void *arg)
{
    zse_engine *e = arg;
    bool idle_step = false;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->stopping && !e->n_queued && !e->n_running)
            pthread_cond_wait(&e->wake, &e->mu);
        /* nothing could run (no KV room, adapters on their way): do not spin; an adapter
         * being copied lands within a millisecond or so, a disk read wakes us itself */
        if (idle_step && !any_cancelled(e) && !e->stopping)
            timed_wait(e, e->m->lora && zse_lora_copying(e->m->lora) ? 0.0005 : 0.005);
        bool expired = e->stopping && zse_now() >= e->deadline;
        request *ended = NULL;
        take_cancelled(e, expired, &ended);
        bool done = e->stopping && !e->n_queued && !e->n_running;
        pthread_mutex_unlock(&e->mu);
        while (ended) {
            request *r = ended;
            ended = r->next;
            finish_without_token(e, r, ZSE_FINISH_CANCELLED);
        }
        if (done)
            break;
        idle_step = step(e) == 0;
    }
    return NULL;
}

/* ---- the API ------------------------------------------------------------------------------------ */

/* the adapter loader finished a read: a request may be able to run */
static void engine_wake(void *arg)
{
    zse_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    pthread_cond_signal(&e->wake);
    pthread_mutex_unlock(&e->mu);
}

static void engine_free(zse_engine *e)
{
    while (e->tenants) { /* none is left once every request has ended */
        tenant *t = e->tenants;
        e->tenants = t->next;
        free(t->name);
        free(t);
    }
    free(e->fair_tenants);
    free(e->demands);
    free(e->fair_order);
    free(e->lora_order);
    free(e->running);
    free(e->plan_seqs);
    free(e->entries);
    free(e->drafting);
    free(e->want);
    zse_spec_free(&e->spec);
    zse_batcher_free(&e->batcher);
    free(e->logits);
    free(e->picked_ids);
    free(e->sample_rows);
    zse_sample_work_free(&e->work);
    free(e);
}

zse_engine *zse_engine_start(zse_model *m, const zse_engine_params *p)
{
    zse_engine *e = zse_calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->m = m;
    e->p.max_seqs = p && p->max_seqs > 0 ? p->max_seqs : 16;
    e->p.max_batch_tokens = p && p->max_batch_tokens > 0 ? p->max_batch_tokens : 512;
    e->p.max_queue = p && p->max_queue > 0 ? p->max_queue : 256;
    e->p.priority_aging_s = p && p->priority_aging_s != 0 ? p->priority_aging_s : 1.0;
    e->p.ctx_cost = p && p->ctx_cost > 0 ? p->ctx_cost : 0;
    e->p.no_compute_share = p && p->no_compute_share;
    if (e->p.max_seqs > 4096 || e->p.max_batch_tokens > (1 << 20)) {
        zse_fail("engine limits too large: %d sequences, %d tokens per step", e->p.max_seqs, e->p.max_batch_tokens);
        free(e);
        return NULL;
    }
    int T = e->p.max_batch_tokens, S = e->p.max_seqs, V = m->vocab;
    if (p && zse_spec_check(m, &p->spec) != 0) {
        zse_error_prefix("cannot start the engine");
        free(e);
        return NULL;
    }
    zse_spec_init(&e->spec, p ? &p->spec : NULL);
    e->p.spec = e->spec.p;
    /* drafts need a logit row each (up to 256 beyond a row per sequence), and a prompt being
     * scored a row per token (SCORE_ROWS a step) */
    int extra = zse_spec_on(&e->spec) ? (S * e->spec.p.tokens < 256 ? S * e->spec.p.tokens : 256) : 0;
    extra += SCORE_ROWS;
    int out_rows = S + extra < T ? S + extra : T;
    e->out_rows = out_rows;
    e->running = zse_calloc((size_t)S, sizeof *e->running);
    e->plan_seqs = zse_calloc((size_t)S, sizeof *e->plan_seqs);
    e->entries = zse_calloc((size_t)S, sizeof *e->entries);
    e->drafting = zse_calloc((size_t)S, sizeof *e->drafting);
    e->want = zse_calloc((size_t)S, sizeof *e->want);
    e->fair_tenants = zse_calloc((size_t)S, sizeof *e->fair_tenants);
    e->demands = zse_calloc((size_t)S, sizeof *e->demands);
    e->fair_order = zse_calloc((size_t)S, sizeof *e->fair_order);
    e->logits = zse_malloc((size_t)out_rows * (size_t)V * sizeof(float));
    e->picked_ids = zse_malloc((size_t)out_rows * sizeof(int32_t));
    e->sample_rows = zse_malloc((size_t)out_rows * sizeof *e->sample_rows);
    bool ok = e->running && e->plan_seqs && e->entries && e->drafting && e->want && e->fair_tenants && e->demands &&
              e->fair_order && e->logits && e->picked_ids &&
              e->sample_rows &&
              zse_sample_work_init(&e->work, V) == 0;
    if (ok) {
        pthread_mutex_lock(&m->run_lock);
        ok = zse_llm_reserve(m->llm, T, out_rows) == 0;
        pthread_mutex_unlock(&m->run_lock);
    }
    if (!ok) {
        zse_error_prefix("cannot start the engine");
        engine_free(e);
        return NULL;
    }
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->wake, NULL);
    e->next_id = 1;
    zse_step_fit_init(&e->fit, m);
    e->ctx_cost = e->ctx_cost_seen = e->p.ctx_cost > 0 ? e->p.ctx_cost : e->fit.ctx_cost;
    if (m->lora)
        zse_lora_set_waker(m->lora, engine_wake, e);
    if (pthread_create(&e->thread, NULL, engine_main, e) != 0) {
        if (m->lora)
            zse_lora_set_waker(m->lora, NULL, NULL);
        zse_fail("cannot start the engine thread");
        pthread_mutex_destroy(&e->mu);
        pthread_cond_destroy(&e->wake);
        engine_free(e);
        return NULL;
    }
    return e;
}

static int check_prompt(const zse_engine *e, const int32_t *prompt, size_t n)
{
    const zse_model *m = e->m;
    if (n == 0)
        return zse_fail("the prompt is empty; give at least one token");
    if (n > (size_t)m->ctx_size)
        return zse_fail("the prompt has %zu tokens, more than the context of %d", n, m->ctx_size);
    if (n > (size_t)m->blocks.n_blocks * ZSE_KV_BLOCK)
        return zse_fail("the prompt has %zu tokens, more than the whole KV cache holds (%d)", n,
                        m->blocks.n_blocks * ZSE_KV_BLOCK);
    for (size_t i = 0; i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= m->vocab)
            return zse_fail("prompt token %zu is %d, outside the vocabulary (0..%d)", i, prompt[i], m->vocab - 1);
    return 0;
}

int zse_engine_submit(zse_engine *e, const int32_t *prompt, size_t n, const zse_sampling *s, int priority,
                      zse_token_cb cb, void *user, uint64_t *request_id)
{
    return zse_engine_submit_for(e, NULL, prompt, n, s, priority, cb, user, request_id);
}

int zse_engine_submit_for(zse_engine *e, const char *tenant_name, const int32_t *prompt, size_t n,
                          const zse_sampling *s, int priority, zse_token_cb cb, void *user, uint64_t *request_id)
{
    if (!cb)
        return zse_fail("zse_engine_submit needs a callback");
    if (check_prompt(e, prompt, n) != 0)
        return -1;
    request *r = request_new(e, prompt, n, s);
    if (!r)
        return -1;
    r->priority = priority;
    r->cb = cb;
    r->user = user;
    pthread_mutex_lock(&e->mu);
    int rc = 0;
    if (e->stopping)
        rc = zse_fail("the engine is shutting down");
    else if (e->n_queued >= e->p.max_queue)
        rc = zse_fail("the queue is full (%d requests waiting)", e->n_queued);
    else if (!(r->tenant = tenant_get(e, tenant_name)))
        rc = -1;
    if (rc == 0) {
        r->tenant->requests++;
        r->id = e->next_id++;
        r->order = e->next_order++;
        if (request_id)
            *request_id = r->id;
        queue_insert(e, r);
        pthread_cond_signal(&e->wake);
    }
    pthread_mutex_unlock(&e->mu);
    if (rc != 0)
        request_free(e, r);
    return rc;
}

void zse_engine_cancel(zse_engine *e, uint64_t request_id)
{
    pthread_mutex_lock(&e->mu);
    for (request *r = e->queue; r; r = r->next)
        if (r->id == request_id)
            r->cancelled = true;
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i]->id == request_id)
            e->running[i]->cancelled = true;
    pthread_cond_signal(&e->wake);
    pthread_mutex_unlock(&e->mu);
}

void zse_engine_pause(zse_engine *e, uint64_t request_id, bool paused)
{
    pthread_mutex_lock(&e->mu);
    for (request *r = e->queue; r; r = r->next)
        if (r->id == request_id)
            r->paused = paused;
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i]->id == request_id)
            e->running[i]->paused = paused;
    pthread_cond_signal(&e->wake);
    pthread_mutex_unlock(&e->mu);
}

void zse_engine_get_stats(zse_engine *e, zse_engine_stats *out)
{
    pthread_mutex_lock(&e->mu);
    out->queued = e->n_queued;
    out->running = e->n_running;
    out->kv_blocks_used = e->kv_used;
    out->kv_blocks_total = e->m->blocks.n_blocks;
    out->preemptions = e->preemptions;
    out->prefix_hit_tokens = e->prefix_hits;
    out->prefix_query_tokens = e->prefix_queries;
    out->prefix_cached_blocks = e->prefix_blocks;
    out->spec = e->spec_stats;
    out->offload = e->offload_stats;
    out->steps = e->steps;
    out->fair_waits = e->fair_waits;
    out->tenants = e->n_tenants;
    out->paused = 0;
    for (request *r = e->queue; r; r = r->next)
        out->paused += r->paused;
    for (int i = 0; i < e->n_running; i++)
        out->paused += e->running[i]->paused;
    out->ctx_cost = e->ctx_cost_seen;
    pthread_mutex_unlock(&e->mu);
}

void zse_engine_stop(zse_engine *e, double timeout_s)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->mu);
    e->stopping = true;
    e->deadline = zse_now() + (timeout_s > 0 ? timeout_s : 0);
    pthread_cond_signal(&e->wake);
    pthread_mutex_unlock(&e->mu);
    int err = pthread_join(e->thread, NULL);
    if (err != 0)
        zse_log(ZSE_LOG_ERROR, "joining the engine thread: %s", strerror(err));
    if (e->m->lora)
        zse_lora_set_waker(e->m->lora, NULL, NULL);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->wake);
    engine_free(e);
}
