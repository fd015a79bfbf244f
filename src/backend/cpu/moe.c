/* The CPU backend's mixture-of-experts ops: routing on the host, the grouped expert matmul
 * (every active expert's contiguous segment of pairs through matmul.c's grouped matmul: the
 * quantized kernels, weights in place from the mapping, one pass for all experts), and the
 * weighted combine.
 *
 * Batch invariance holds as for the dense ops: a pair's row of a segment is computed by
 * the same kernel loop whatever the segment's length (matmul.c), and a token's experts are
 * summed in ascending expert order whatever else is in the step. */
#include "backend/cpu/cpu.h"

#include <math.h>
#include <string.h>

struct zse_experts {
    zse_expert_bank bank;       /* a copy; its checksums and data belong to the file */
    zse_weight *w;              /* [count][ZSE_EXPERT_PARTS] views into the mapping, or (experts_host)
                                 * into the slab slots experts_map placed them in; data NULL: nowhere */
};

struct zse_moe_route {
    zse_moe_params p;
    int64_t max_rows;
    int64_t rows;               /* of the last route */
    int32_t *pair_expert;       /* [rows * k], token-major: pair (t, j) at t * k + j */
    float *pair_weight;         /* [rows * k] */
    int32_t *pair_slot;         /* [rows * k]: where pair (t, j) lies in expert order */
    int32_t *token_of;          /* [rows * k]: the token of the pair at each sorted place */
    int32_t *seg_start;         /* [n_experts + 1]: expert e's pairs are [seg_start[e], seg_start[e + 1]) */
    int32_t *active;            /* the experts with pairs, ascending */
    int n_active;
};

zse_experts *zse_cpu_experts_load(zse_backend *be, const zse_expert_bank *bank)
{
    (void)be;
    zse_experts *ex = zse_calloc(1, sizeof *ex);
    if (!ex)
        return NULL;
    ex->bank = *bank;
    ex->w = zse_calloc((size_t)bank->count * ZSE_EXPERT_PARTS, sizeof *ex->w);
    if (!ex->w) {
        free(ex);
        return NULL;
    }
    for (int e = 0; e < bank->count; e++)
        for (int part = 0; part < ZSE_EXPERT_PARTS; part++) {
            zse_weight *w = &ex->w[e * ZSE_EXPERT_PARTS + part];
            w->q = bank->part[part].q;
            zse_qshape_planes(&w->q, &w->p);
            w->data = bank->data + (uint64_t)e * bank->stride + bank->part[part].at;
        }
    return ex;
}

/* experts kept "in host memory" (the offload path on the CPU, for its tests): views that
 * point nowhere until experts_map places them in slab slots */
zse_experts *zse_cpu_experts_host(zse_backend *be, const zse_expert_bank *bank)
{
    zse_experts *ex = zse_cpu_experts_load(be, bank);
    for (int i = 0; ex && i < bank->count * ZSE_EXPERT_PARTS; i++)
        ex->w[i].data = NULL;
    return ex;
}

void zse_cpu_experts_map(zse_backend *be, zse_experts *ex, const zse_slab *s, const int32_t *slot_of)
{
    (void)be;
    for (int e = 0; e < ex->bank.count; e++)
        for (int part = 0; part < ZSE_EXPERT_PARTS; part++)
            ex->w[e * ZSE_EXPERT_PARTS + part].data =
                slot_of[e] >= 0 ? zse_cpu_slot_data(s, slot_of[e]) + ex->bank.part[part].at : NULL;
}

void zse_cpu_experts_free(zse_backend *be, zse_experts *ex)
{
    (void)be;
    if (ex) {
        free(ex->w);
        free(ex);
    }
}

void zse_cpu_moe_route_free(zse_backend *be, zse_moe_route *r)
{
    (void)be;
    if (!r)
        return;
    free(r->pair_expert);
    free(r->pair_weight);
    free(r->pair_slot);
    free(r->token_of);
    free(r->seg_start);
    free(r->active);
    free(r);
}

zse_moe_route *zse_cpu_moe_route_new(zse_backend *be, int64_t max_rows, const zse_moe_params *p)
{
    if (max_rows < 1 || p->n_experts < 1 || p->n_experts > ZSE_MAX_EXPERTS || p->k < 1 || p->k > p->n_experts ||
        p->k > ZSE_MAX_EXPERTS_USED || max_rows > (int64_t)1 << 24) {
        zse_fail("moe routing of %lld tokens to %d of %d experts is not possible", (long long)max_rows, p->k,
                 p->n_experts);
        return NULL;
    }
    zse_moe_route *r = zse_calloc(1, sizeof *r);
    if (!r)
        return NULL;
    const size_t pairs = (size_t)max_rows * (size_t)p->k;
    r->p = *p;
    r->max_rows = max_rows;
    r->pair_expert = zse_malloc(pairs * sizeof *r->pair_expert);
    r->pair_weight = zse_malloc(pairs * sizeof *r->pair_weight);
    r->pair_slot = zse_malloc(pairs * sizeof *r->pair_slot);
    r->token_of = zse_malloc(pairs * sizeof *r->token_of);
    r->seg_start = zse_calloc((size_t)p->n_experts + 1, sizeof *r->seg_start);
    r->active = zse_malloc((size_t)p->n_experts * sizeof *r->active);
    if (!r->pair_expert || !r->pair_weight || !r->pair_slot || !r->token_of || !r->seg_start || !r->active) {
        zse_cpu_moe_route_free(be, r);
        return NULL;
    }
    return r;
}

/* One token: p = softmax(logits) (f32, as torch computes it: exp(l - max) / sum), the k
 * largest p in descending order (ties to the lower index, as a stable sort gives them),
 * and the weights transformers' TopKRouter returns: p, or p / (sum of the k). */
static void route_token(const float *logits, int n, int k, bool renormalize, int32_t *experts, float *weights)
{
    float mx = logits[0];
    for (int e = 1; e < n; e++)
        mx = logits[e] > mx ? logits[e] : mx;
    float prob[ZSE_MAX_EXPERTS];
    float sum = 0.f;
    for (int e = 0; e < n; e++) {
        prob[e] = expf(logits[e] - mx);
        sum += prob[e];
    }
    for (int e = 0; e < n; e++)
        prob[e] /= sum;
    bool taken[ZSE_MAX_EXPERTS] = {false};
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++)
            /* NaN never wins over a number (a NaN router row still picks k experts) */
            if (!taken[e] && (best < 0 || prob[e] > prob[best] || (isnan(prob[best]) && !isnan(prob[e]))))
                best = e;
        taken[best] = true;
        experts[j] = best;
        weights[j] = prob[best];
    }
    if (renormalize) {
        float s = 0.f;
        for (int j = 0; j < k; j++)
            s += weights[j];
        for (int j = 0; j < k; j++)
            weights[j] /= s;
    }
}

void zse_cpu_moe_route(zse_backend *be, zse_moe_route *r, const zse_act *logits, int64_t rows)
{
    const int n = r->p.n_experts, k = r->p.k;
    if (rows < 1 || rows > r->max_rows || rows > logits->rows || logits->cols < n) {
        zse_cpu_note_failure(be, "moe_route: more tokens than the routing holds, or logits narrower than the experts");
        r->rows = 0;
        return;
    }
    r->rows = rows;
    for (int64_t t = 0; t < rows; t++)
        route_token(logits->data + t * logits->cols, n, k, r->p.renormalize, r->pair_expert + t * k,
                    r->pair_weight + t * k);
    /* counting sort by expert; pairs of one expert keep token order */
    memset(r->seg_start, 0, ((size_t)n + 1) * sizeof *r->seg_start);
    const int64_t pairs = rows * k;
    for (int64_t i = 0; i < pairs; i++)
        r->seg_start[r->pair_expert[i] + 1]++;
    r->n_active = 0;
    for (int e = 0; e < n; e++) {
        if (r->seg_start[e + 1] > 0)
            r->active[r->n_active++] = e;
        r->seg_start[e + 1] += r->seg_start[e];
    }
    int32_t fill[ZSE_MAX_EXPERTS];
    memcpy(fill, r->seg_start, (size_t)n * sizeof *fill);
    for (int64_t i = 0; i < pairs; i++) {
        const int32_t at = fill[r->pair_expert[i]]++;
        r->pair_slot[i] = at;
        r->token_of[at] = (int32_t)(i / k);
    }
}

int zse_cpu_moe_route_read(zse_backend *be, const zse_moe_route *r, int32_t *seg, int32_t *token_of)
{
    (void)be;
    memcpy(seg, r->seg_start, ((size_t)r->p.n_experts + 1) * sizeof *seg);
    memcpy(token_of, r->token_of, (size_t)(r->rows * r->p.k) * sizeof *token_of);
    return 0;
}

int zse_cpu_moe_route_experts(zse_backend *be, const zse_moe_route *r, int32_t *experts)
{
    (void)be;
    memcpy(experts, r->active, (size_t)r->n_active * sizeof *experts);
    return r->n_active;
}

typedef struct {
    const zse_moe_route *r;
    const zse_act *x;
    zse_act *xs;
    int64_t dim;
} gather_job;

static void gather_rows(void *arg, int64_t i0, int64_t i1)
{
    const gather_job *j = arg;
    for (int64_t i = i0; i < i1; i++)
        memcpy(j->xs->data + i * j->xs->cols, j->x->data + (int64_t)j->r->token_of[i] * j->x->cols,
               (size_t)j->dim * sizeof(float));
}

void zse_cpu_moe_gather(zse_backend *be, const zse_moe_route *r, const zse_act *x, zse_act *xs)
{
    const int64_t pairs = r->rows * r->p.k, dim = x->cols < xs->cols ? x->cols : xs->cols;
    if (pairs > xs->rows) {
        zse_cpu_note_failure(be, "moe_gather: the pairs' buffer is too small");
        return;
    }
    gather_job j = {r, x, xs, dim};
    zse_cpu_parallel_for(be, pairs, gather_rows, &j);
}

/* every active expert's segment of pairs times its weights of each part, as one group:
 * a segment's rows quantized once for the parts that share them (gate and up), then every
 * expert's row blocks in one pass over the threads — not a matmul (two passes) per expert
 * and part, whose waits would outweigh a decode step's small experts */
void zse_cpu_moe_matmul(zse_backend *be, const zse_moe_route *r, const zse_experts *ex, const zse_act *xs,
                        const zse_moe_out *outs, int n_outs)
{
    if (n_outs < 1 || n_outs > ZSE_MOE_OUTS_MAX) {
        zse_cpu_note_failure(be, "moe_matmul: 1 to 2 parts a call");
        return;
    }
    for (int o = 0; o < n_outs; o++) {
        const int part = outs[o].part;
        const zse_act *ys = outs[o].ys;
        if (part < 0 || part >= ZSE_EXPERT_PARTS || ex->bank.count != r->p.n_experts ||
            r->rows * r->p.k > xs->rows || r->rows * r->p.k > ys->rows ||
            ex->bank.part[part].q.cols > xs->cols || ex->bank.part[part].q.rows > ys->cols) {
            zse_cpu_note_failure(be, "moe_matmul: the experts, the routing and the buffers do not match");
            return;
        }
    }
    /* a decode step's experts (top 8, two parts) on the stack; a prefill's on the heap */
    zse_cpu_mm on_stack[16] = {{0}};
    const size_t most = (size_t)r->n_active * (size_t)n_outs;
    zse_cpu_mm *mm = most <= 16 ? on_stack : zse_calloc(most, sizeof *mm);
    if (!mm) {
        zse_cpu_note_failure(be, "moe_matmul: out of memory");
        return;
    }
    int n = 0;
    for (int a = 0; a < r->n_active; a++) {
        const int e = r->active[a];
        const int64_t s0 = r->seg_start[e], len = r->seg_start[e + 1] - s0;
        for (int o = 0; o < n_outs; o++) {
            const zse_weight *w = &ex->w[e * ZSE_EXPERT_PARTS + outs[o].part];
            if (!w->data || len <= 0)
                continue; /* an expert kept in host memory that experts_map placed nowhere */
            const zse_act *ys = outs[o].ys;
            /* views of the segment's rows: the kernels read rows x cols from data */
            mm[n++] = (zse_cpu_mm){w, NULL, {xs->data + s0 * xs->cols, len, xs->cols},
                                   {ys->data + s0 * ys->cols, len, ys->cols}, false};
        }
    }
    zse_cpu_matmul_group(be, mm, n);
    if (mm != on_stack)
        free(mm);
}

typedef struct {
    const zse_moe_route *r;
    const zse_act *ys, *shared, *gate;
    zse_act *x;
    int64_t dim;
} combine_job;

static void combine_rows(void *arg, int64_t t0, int64_t t1)
{
    const combine_job *j = arg;
    const zse_moe_route *r = j->r;
    const int k = r->p.k;
    for (int64_t t = t0; t < t1; t++) {
        /* the token's pairs in ascending expert order: transformers adds each expert's
         * output to the token with index_add_, experts in ascending order */
        int order[ZSE_MAX_EXPERTS_USED];
        for (int i = 0; i < k; i++) {
            int at = i;
            while (at > 0 && r->pair_expert[t * k + order[at - 1]] > r->pair_expert[t * k + i]) {
                order[at] = order[at - 1];
                at--;
            }
            order[at] = i;
        }
        float sig = 1.f;
        if (j->shared && j->gate)
            sig = 1.f / (1.f + expf(-j->gate->data[t * j->gate->cols]));
        float *x = j->x->data + t * j->x->cols;
        for (int64_t d = 0; d < j->dim; d++) {
            float acc = 0.f;
            for (int i = 0; i < k; i++) {
                const int64_t pair = t * k + order[i];
                acc += j->ys->data[(int64_t)r->pair_slot[pair] * j->ys->cols + d] * r->pair_weight[pair];
            }
            if (j->shared)
                acc += sig * j->shared->data[t * j->shared->cols + d];
            x[d] += acc;
        }
    }
}

void zse_cpu_moe_combine(zse_backend *be, const zse_moe_route *r, const zse_act *ys, const zse_act *shared,
                         const zse_act *shared_gate, zse_act *x)
{
    const int64_t dim = x->cols;
    if (r->rows > x->rows || r->rows * r->p.k > ys->rows || ys->cols < dim ||
        (shared && (shared->cols < dim || shared->rows < r->rows)) || (shared_gate && shared_gate->rows < r->rows)) {
        zse_cpu_note_failure(be, "moe_combine: the routing and the buffers do not match");
        return;
    }
    combine_job j = {r, ys, shared, shared_gate, x, dim};
    zse_cpu_parallel_for(be, r->rows, combine_rows, &j);
}
