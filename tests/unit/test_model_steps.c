/* The model's side of recorded steps (CUDA graphs), run on the CPU backend so that it is
 * checked under the sanitizers: a backend that asks for padded steps (step_rows) and
 * sometimes fails a recording (step_end answers ZSE_STEP_ISSUE, so the ops are issued a
 * second time) must give the same logits, bit for bit, as the plain backend over the same
 * sequence of prefill and decode steps of every size from 1 to 20 tokens; the padding
 * tokens must leave the KV cache alone (later steps read it) and their logit rows must come
 * after the real ones.
 *
 * Also the model's side of a LoRA delta folded into the matmul (lora_with_next_matmul, which
 * the CUDA backend implements): a backend that takes every delta on must see each announced
 * right before the matmul_multi that writes its outputs over the same x, no op between, and
 * never a lora_apply of the model's own; one that declines must get the lora_apply after
 * the matmul. Both give the plain backend's logits bit for bit (the stand-in folds by running
 * the CPU's matmul_multi then its lora_apply: the same arithmetic in the same order). */
#include "test.h"

#include "backend/backend.h"
#include "format/format.h"
#include "quant/quant.h"
#include "model/model.h"
#include "zse.h"

#include <string.h>
#include <unistd.h>

enum { NSEQ = 4, BLOCK = 16, NBLOCKS = 64, MAX_TOKENS = 64, PAD_STEP = 8 };

/* the recording backend's protocol, counted */
static const zse_backend_ops *cpu_ops;
static int begins, ends, reissues, padded_steps;

static int pad_rows(zse_backend *be, int n)
{
    (void)be;
    int rows = (n + PAD_STEP - 1) / PAD_STEP * PAD_STEP;
    if (rows != n)
        padded_steps++;
    return rows;
}

static int step_begin(zse_backend *be, const void *model, const void *kv)
{
    (void)be;
    CHECK(model != NULL && kv != NULL);
    begins++;
    return ZSE_STEP_ISSUE;
}

/* every third step "fails its recording": the model must issue the ops again */
static int step_end(zse_backend *be)
{
    (void)be;
    ends++;
    if (ends % 3 == 0) {
        reissues++;
        return ZSE_STEP_ISSUE;
    }
    return ZSE_STEP_DONE;
}

typedef struct {
    zse_backend *be;
    zse_llm *m;
    zse_kv *kv;
} runner;

static bool open_runner(runner *r, const zse_file *f, zse_backend *be)
{
    r->be = be;
    r->m = zse_llm_load(f, be, MAX_TOKENS, MAX_TOKENS);
    CHECK_MSG(r->m != NULL, "%s", zse_last_error());
    if (!r->m)
        return false;
    const zse_config *c = zse_llm_config(r->m);
    zse_kv_shape shape = {c->n_layers, NBLOCKS, BLOCK, c->n_kv_heads, c->head_dim, ZSE_KV_STORE_F16};
    r->kv = be->ops->kv_new(be, &shape);
    CHECK(r->kv != NULL);
    return r->kv != NULL;
}

static void close_runner(runner *r)
{
    if (r->kv)
        r->be->ops->kv_free(r->be, r->kv);
    zse_llm_free(r->m);
}

/* sequences own blocks s*16 .. s*16+15: 256 positions each */
typedef struct {
    int32_t len[NSEQ];
    int32_t table[NSEQ][NBLOCKS / NSEQ];
} seqs;

/* one step: `take[s]` tokens of each sequence (0 = not in this step); the last token of
 * each sequence in the step gets logits (and the argmax too unless argmax is NULL).
 * adapter_of[s]: sequence s's LoRA slot (NULL: no adapters). Returns the logit rows written. */
static int step(runner *r, const seqs *sq, const int *take, const int32_t *ids, float *logits, int32_t *argmax,
                const int32_t *adapter_of)
{
    int32_t tok[MAX_TOKENS], pos[MAX_TOKENS], seq_of[MAX_TOKENS], slots[MAX_TOKENS], rows[MAX_TOKENS];
    int32_t lens[NSEQ], table[NSEQ][NBLOCKS / NSEQ], seq_adapter[NSEQ];
    int n = 0, n_out = 0, n_seqs = 0;
    for (int s = 0; s < NSEQ; s++) {
        if (!take[s])
            continue;
        seq_adapter[n_seqs] = adapter_of ? adapter_of[s] : -1;
        for (int k = 0; k < take[s]; k++, n++) {
            int p = sq->len[s] + k;
            tok[n] = ids[n];
            pos[n] = p;
            seq_of[n] = n_seqs;
            slots[n] = sq->table[s][p / BLOCK] * BLOCK + p % BLOCK;
        }
        rows[n_out++] = n - 1;
        lens[n_seqs] = sq->len[s] + take[s];
        memcpy(table[n_seqs], sq->table[s], sizeof table[0]);
        n_seqs++;
    }
    zse_batch b = {n,     tok,  pos,  seq_of, slots, n_seqs, lens, &table[0][0], NBLOCKS / NSEQ, n_out, rows,
                   adapter_of ? seq_adapter : NULL, adapter_of ? (1u << ZSE_LORA_MODULES) - 1 : 0};
    CHECK_MSG(zse_llm_forward(r->m, r->kv, &b, logits) == 0, "%s", zse_last_error());
    if (argmax)
        CHECK_MSG(zse_llm_forward_argmax(r->m, r->kv, &b, NULL, argmax) == 0, "%s", zse_last_error());
    return n_out;
}

static void compare_runs(const zse_file *f)
{
    zse_backend *cpu = zse_backend_create("cpu", 2);
    CHECK(cpu != NULL);
    if (!cpu)
        return;
    cpu_ops = cpu->ops;
    zse_backend_ops rec_ops = *cpu->ops;
    rec_ops.step_rows = pad_rows;
    rec_ops.step_begin = step_begin;
    rec_ops.step_end = step_end;
    zse_backend rec = {&rec_ops, cpu->impl}; /* the same CPU state behind the other protocol */

    runner plain = {0}, padded = {0};
    if (open_runner(&plain, f, cpu) && open_runner(&padded, f, &rec)) {
        const zse_config *c = zse_llm_config(plain.m);
        const size_t vocab = (size_t)c->vocab_size;
        float *la = zse_malloc(vocab * MAX_TOKENS * sizeof *la), *lb = zse_malloc(vocab * MAX_TOKENS * sizeof *lb);
        seqs sq = {{0}, {{0}}};
        for (int s = 0; s < NSEQ; s++)
            for (int k = 0; k < NBLOCKS / NSEQ; k++)
                sq.table[s][k] = (s * (NBLOCKS / NSEQ) + k * 5) % NBLOCKS; /* shuffled, disjoint */
        uint32_t x = 12345;
        int32_t ids[MAX_TOKENS];
        /* prefill chunks, then mixed and decode steps of sizes 1..20 over 1..4 sequences */
        int plans[][NSEQ] = {{20, 0, 0, 0}, {0, 13, 9, 0}, {0, 0, 0, 3}, {1, 0, 0, 0},   {1, 1, 0, 0},
                             {1, 1, 1, 0},  {1, 1, 1, 1}, {5, 1, 1, 1}, {1, 9, 1, 1},   {2, 2, 2, 2},
                             {3, 4, 5, 6},  {1, 0, 1, 0}, {7, 1, 0, 1}, {1, 1, 17, 1}, {1, 1, 1, 1}};
        bool same = true;
        for (size_t p = 0; p < sizeof plans / sizeof plans[0] && la && lb; p++) {
            int total = 0;
            for (int s = 0; s < NSEQ; s++)
                total += plans[p][s];
            for (int i = 0; i < total; i++) {
                x = x * 1664525u + 1013904223u;
                ids[i] = (int32_t)(x % (uint32_t)c->vocab_size);
            }
            int32_t am[MAX_TOKENS], bm[MAX_TOKENS];
            int out_a = step(&plain, &sq, plans[p], ids, la, am, NULL);
            int out_b = step(&padded, &sq, plans[p], ids, lb, bm, NULL);
            CHECK_EQ_INT(out_a, out_b);
            if (memcmp(la, lb, (size_t)out_a * vocab * sizeof *la) != 0 ||
                memcmp(am, bm, (size_t)out_a * sizeof *am) != 0) {
                same = false;
                fprintf(stderr, "step %zu: logits differ between the plain and the padded runs\n", p);
            }
            for (int s = 0; s < NSEQ; s++)
                sq.len[s] += plans[p][s];
        }
        CHECK(same);
        CHECK(padded_steps > 0);
        CHECK(reissues > 0);
        CHECK_EQ_INT(begins, ends - reissues);
        free(la);
        free(lb);
    }
    close_runner(&padded);
    close_runner(&plain);
    zse_backend_destroy(cpu);
}

/* ---- LoRA folded into the matmul: the model's protocol ------------------------------------ */

static struct {
    bool take;              /* lora_with_next_matmul answers 1 */
    bool armed;             /* announced, not yet taken by a matmul_multi */
    zse_lora_pool *pool;
    int layer;
    const zse_act *x;
    int64_t rows;
    zse_lora_out outs[3];
    int n_outs;
    int announced, folded, applied_by_model, op_between;
} fold;

static int fold_announce(zse_backend *be, const zse_lora_pool *p, int layer, const zse_act *x, int64_t rows,
                         const zse_lora_out *outs, int n_outs)
{
    (void)be;
    CHECK(!fold.armed); /* the one before went to its matmul */
    CHECK(n_outs >= 1 && n_outs <= 3);
    if (!fold.take)
        return 0;
    fold.armed = true;
    fold.pool = (zse_lora_pool *)p;
    fold.layer = layer;
    fold.x = x;
    fold.rows = rows;
    fold.n_outs = n_outs;
    memcpy(fold.outs, outs, (size_t)n_outs * sizeof *outs);
    fold.announced++;
    return 1;
}

/* matmul_multi for a backend without one (the CPU): what the model issues in its place —
 * each matmul then its bias, and a residual's through a scratch and add */
static zse_act *fold_tmp;
static int64_t fold_hidden; /* a residual's width: the model's only accumulating matmuls (o, down) write x */

static void fold_matmul_multi(zse_backend *be, const zse_act *x, int64_t rows, const zse_matmul_out *outs, int n_outs,
                              bool accumulate)
{
    for (int k = 0; k < n_outs; k++) {
        zse_act *y = accumulate ? fold_tmp : outs[k].y;
        cpu_ops->matmul(be, outs[k].w, x, rows, y);
        if (outs[k].bias)
            cpu_ops->add_bias(be, y, outs[k].bias, rows);
        if (accumulate)
            cpu_ops->add(be, outs[k].y, y, rows, fold_hidden);
    }
    if (!fold.armed)
        return;
    fold.armed = false;
    CHECK(x == fold.x && rows == fold.rows);
    for (int i = 0; i < fold.n_outs; i++) { /* each announced projection is one of this matmul's outputs */
        bool found = false;
        for (int k = 0; k < n_outs; k++)
            found = found || outs[k].y == fold.outs[i].y;
        CHECK_MSG(found, "LoRA projection %d announced for a matmul that does not write it", fold.outs[i].module);
    }
    cpu_ops->lora_apply(be, fold.pool, fold.layer, x, rows, fold.outs, fold.n_outs);
    fold.folded++;
}

static void fold_lora_apply(zse_backend *be, const zse_lora_pool *p, int layer, const zse_act *x, int64_t rows,
                            const zse_lora_out *outs, int n_outs)
{
    CHECK(!fold.armed);
    fold.applied_by_model++;
    cpu_ops->lora_apply(be, p, layer, x, rows, outs, n_outs);
}

/* the ops a model issues between a matmul's announcement and the matmul, if it were wrong */
static void fold_rmsnorm(zse_backend *be, const zse_act *x, const zse_weight *w, float eps, int64_t rows, int64_t dim,
                         zse_act *out)
{
    fold.op_between += fold.armed;
    cpu_ops->rmsnorm(be, x, w, eps, rows, dim, out);
}

static void fold_silu_mul(zse_backend *be, const zse_act *gate, const zse_act *up, int64_t rows, int64_t dim,
                          zse_act *out)
{
    fold.op_between += fold.armed;
    cpu_ops->silu_mul(be, gate, up, rows, dim, out);
}

static void fold_attention(zse_backend *be, const zse_kv *kv, int layer, const zse_act *q, const zse_attn_params *p,
                           zse_act *out)
{
    fold.op_between += fold.armed;
    cpu_ops->attention(be, kv, layer, q, p, out);
}

/* an adapter of rank 4 on all seven projections of every layer (slot 0) and one of rank 2 on
 * q and down (slot 1), random A and B */
static zse_lora_pool *fold_pool(zse_backend *be, const zse_config *c)
{
    zse_lora_shape sh = {c->n_layers, 2, 0, {0}, {0}};
    const int64_t q = (int64_t)c->n_heads * c->head_dim, kv = (int64_t)c->n_kv_heads * c->head_dim;
    const int64_t in[7] = {c->hidden_size, c->hidden_size, c->hidden_size, q, c->hidden_size, c->hidden_size,
                           c->intermediate_size};
    const int64_t out[7] = {q, kv, kv, c->hidden_size, c->intermediate_size, c->intermediate_size, c->hidden_size};
    memcpy(sh.in, in, sizeof in);
    memcpy(sh.out, out, sizeof out);
    const size_t table = ((size_t)c->n_layers * ZSE_LORA_MODULES * sizeof(zse_lora_entry) + 63) & ~(size_t)63;
    size_t bytes = table;
    for (int m = 0; m < 7; m++)
        bytes += (size_t)c->n_layers * ((4 * (size_t)in[m] * 2 + 63) / 64 * 64 + (4 * (size_t)out[m] * 2 + 63) / 64 * 64);
    sh.slot_bytes = (bytes + 63) & ~(uint64_t)63;
    zse_lora_pool *pool = be->ops->lora_pool_new(be, &sh);
    CHECK_MSG(pool != NULL, "%s", zse_last_error());
    uint8_t *img = calloc(1, sh.slot_bytes);
    uint32_t x = 777;
    for (int slot = 0; pool && img && slot < 2; slot++) {
        memset(img, 0, sh.slot_bytes);
        size_t at = table;
        for (int l = 0; l < c->n_layers; l++)
            for (int m = 0; m < 7; m++) {
                const int rank = slot == 0 ? 4 : (m == ZSE_LORA_Q || m == ZSE_LORA_DOWN) ? 2 : 0;
                if (!rank)
                    continue;
                zse_lora_entry e = {rank, 0.5f, (int64_t)at, 0};
                at += ((size_t)rank * (size_t)in[m] * 2 + 63) & ~(size_t)63;
                e.bt = (int64_t)at;
                at += ((size_t)rank * (size_t)out[m] * 2 + 63) & ~(size_t)63;
                uint16_t *a = (uint16_t *)(img + e.a), *bt = (uint16_t *)(img + e.bt);
                for (int64_t i = 0; i < rank * in[m]; i++, x = x * 1664525u + 1013904223u)
                    a[i] = zse_f32_to_f16((float)(x >> 8) / 16777216.0f - 0.5f);
                for (int64_t i = 0; i < rank * out[m]; i++, x = x * 1664525u + 1013904223u)
                    bt[i] = zse_f32_to_f16((float)(x >> 8) / 16777216.0f - 0.5f);
                memcpy(img + ((size_t)l * ZSE_LORA_MODULES + (size_t)m) * sizeof e, &e, sizeof e);
            }
        CHECK_MSG(be->ops->lora_slot_load(be, pool, slot, img, at) == 0, "%s", zse_last_error());
        CHECK(be->ops->lora_slot_ready(be, pool, slot) == 1);
    }
    free(img);
    return pool;
}

/* sequences 0 and 3 on slot 0, 1 on slot 1, 2 on none, through the plans of compare_runs */
static void compare_lora_fold(const zse_file *f, bool take)
{
    zse_backend *cpu = zse_backend_create("cpu", 2);
    CHECK(cpu != NULL);
    if (!cpu)
        return;
    cpu_ops = cpu->ops;
    zse_backend_ops fold_ops = *cpu->ops;
    fold_ops.lora_with_next_matmul = fold_announce;
    fold_ops.matmul_multi = fold_matmul_multi;
    fold_ops.lora_apply = fold_lora_apply;
    fold_ops.rmsnorm = fold_rmsnorm;
    fold_ops.silu_mul = fold_silu_mul;
    fold_ops.attention = fold_attention;
    zse_backend folding = {&fold_ops, cpu->impl};
    memset(&fold, 0, sizeof fold);
    fold.take = take;
    runner plain = {0}, other = {0};
    zse_lora_pool *pool = NULL;
    if (open_runner(&plain, f, cpu) && open_runner(&other, f, &folding) &&
        (pool = fold_pool(cpu, zse_llm_config(plain.m))) != NULL &&
        (fold_tmp = cpu->ops->act_new(cpu, MAX_TOKENS, zse_llm_config(plain.m)->hidden_size)) != NULL) {
        fold_hidden = zse_llm_config(plain.m)->hidden_size;
        zse_llm_set_lora(plain.m, pool);
        zse_llm_set_lora(other.m, pool);
        const zse_config *c = zse_llm_config(plain.m);
        const size_t vocab = (size_t)c->vocab_size;
        float *la = zse_malloc(vocab * MAX_TOKENS * sizeof *la), *lb = zse_malloc(vocab * MAX_TOKENS * sizeof *lb);
        seqs sq = {{0}, {{0}}};
        for (int s = 0; s < NSEQ; s++)
            for (int k = 0; k < NBLOCKS / NSEQ; k++)
                sq.table[s][k] = s * (NBLOCKS / NSEQ) + k;
        const int32_t adapter_of[NSEQ] = {0, 1, -1, 0};
        int plans[][NSEQ] = {{9, 0, 0, 0}, {0, 6, 4, 3}, {1, 0, 0, 0}, {1, 1, 1, 1}, {0, 1, 0, 0}, {2, 0, 1, 0}};
        uint32_t x = 99;
        bool same = true;
        for (size_t p = 0; p < sizeof plans / sizeof plans[0] && la && lb; p++) {
            int32_t ids[MAX_TOKENS];
            int total = 0;
            for (int s = 0; s < NSEQ; s++)
                total += plans[p][s];
            for (int i = 0; i < total; i++, x = x * 1664525u + 1013904223u)
                ids[i] = (int32_t)(x % (uint32_t)c->vocab_size);
            const int n_out[2] = {step(&plain, &sq, plans[p], ids, la, NULL, adapter_of),
                                  step(&other, &sq, plans[p], ids, lb, NULL, adapter_of)};
            CHECK_EQ_INT(n_out[0], n_out[1]);
            if (memcmp(la, lb, (size_t)n_out[0] * vocab * sizeof *la) != 0) {
                same = false;
                fprintf(stderr, "lora fold (%s) step %zu: logits differ from the plain backend's\n",
                        take ? "taken" : "declined", p);
            }
            for (int s = 0; s < NSEQ; s++)
                sq.len[s] += plans[p][s];
        }
        CHECK(same);
        CHECK(!fold.armed);
        CHECK_EQ_INT(fold.op_between, 0);
        if (take) { /* four groups a layer a step (q/k/v, o, gate/up, down), none applied by the model */
            CHECK_EQ_INT(fold.announced, 4 * c->n_layers * (int)(sizeof plans / sizeof plans[0]));
            CHECK_EQ_INT(fold.folded, fold.announced);
            CHECK_EQ_INT(fold.applied_by_model, 0);
        } else {
            CHECK_EQ_INT(fold.folded, 0);
            CHECK_EQ_INT(fold.applied_by_model, 4 * c->n_layers * (int)(sizeof plans / sizeof plans[0]));
        }
        free(la);
        free(lb);
    }
    close_runner(&other);
    close_runner(&plain);
    if (fold_tmp)
        cpu->ops->act_free(cpu, fold_tmp);
    fold_tmp = NULL;
    if (pool)
        cpu->ops->lora_pool_free(cpu, pool);
    zse_backend_destroy(cpu);
}

int main(void)
{
    const char *data = test_env("ZSE_TEST_DATA");
    if (!data)
        data = "tests/fixtures";
    /* a dense model, and one with experts (padding tokens are routed like any other) */
    static const char *const fixtures[] = {"tiny-qwen2", "random/qwen2-moe"};
    for (size_t i = 0; i < sizeof fixtures / sizeof fixtures[0]; i++) {
        char dir[512], path[512];
        snprintf(dir, sizeof dir, "%s/%s", data, fixtures[i]);
        snprintf(path, sizeof path, "/tmp/zse-test-steps-%d-%zu.zse", (int)getpid(), i);
        zse_convert_opts o = {.scheme = ZSE_SCHEME_F32, .embed_scheme = -1, .lm_head_scheme = -1, .force = true};
        if (zse_convert(dir, path, &o) != 0) {
            fprintf(stderr, "cannot convert %s: %s\n", dir, zse_last_error());
            return 1;
        }
        zse_file *f = zse_file_open(path);
        CHECK_MSG(f != NULL, "%s", zse_last_error());
        if (f) {
            compare_runs(f);
            if (i == 0) { /* LoRA targets a dense model's projections */
                compare_lora_fold(f, true);
                compare_lora_fold(f, false);
            }
            zse_file_close(f);
        }
        remove(path);
    }
    return test_main_end();
}
