/* The model's side of recorded steps (CUDA graphs), run on the CPU backend so that it is
 * checked under the sanitizers: a backend that asks for padded steps (step_rows) and
 * sometimes fails a recording (step_end answers ZSE_STEP_ISSUE, so the ops are issued a
 * second time) must give the same logits, bit for bit, as the plain backend over the same
 * sequence of prefill and decode steps of every size from 1 to 20 tokens; the padding
 * tokens must leave the KV cache alone (later steps read it) and their logit rows must come
 * after the real ones. */
#include "test.h"

#include "format/format.h"
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
 * each sequence in the step gets logits. Returns the logit rows written. */
static int step(runner *r, const seqs *sq, const int *take, const int32_t *ids, float *logits, int32_t *argmax)
{
    int32_t tok[MAX_TOKENS], pos[MAX_TOKENS], seq_of[MAX_TOKENS], slots[MAX_TOKENS], rows[MAX_TOKENS];
    int32_t lens[NSEQ], table[NSEQ][NBLOCKS / NSEQ];
    int n = 0, n_out = 0, n_seqs = 0;
    for (int s = 0; s < NSEQ; s++) {
        if (!take[s])
            continue;
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
    zse_batch b = {n, tok, pos, seq_of, slots, n_seqs, lens, &table[0][0], NBLOCKS / NSEQ, n_out, rows, NULL, 0};
    CHECK_MSG(zse_llm_forward(r->m, r->kv, &b, logits) == 0, "%s", zse_last_error());
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
            int out_a = step(&plain, &sq, plans[p], ids, la, am);
            int out_b = step(&padded, &sq, plans[p], ids, lb, bm);
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
            zse_file_close(f);
        }
        remove(path);
    }
    return test_main_end();
}
