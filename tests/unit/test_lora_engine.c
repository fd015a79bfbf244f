/* LoRA adapters served (src/engine/lora.c, the CPU backend's lora_apply, the model):
 * - lora_apply against a double reference, rows of two adapters and of none in one call,
 *   runs of one adapter longer than a tile, inputs past a chunk and off the vectors, every
 *   row's result the same alone as batched, bad slot images refused;
 * - PEFT's greedy continuations (tests/fixtures/lora) through the engine, every adapter
 *   and the base model in one batch of 8 with 2 adapter slots (so adapters queue);
 * - 64 concurrent requests over 20 adapters with 4 slots and 6 host slots (registered and
 *   found in an adapter directory) give the outputs of the same requests one at a time,
 *   with every tier used, evictions, and nothing pinned or held afterwards;
 * - the prefix cache is keyed by adapter: a prompt cached under one adapter is not reused
 *   by another or by the base model, and is reused by the same adapter;
 * - speculative decoding (ngram) with adapters gives the same greedy tokens;
 * - bad input: unknown names, duplicates, an adapter deleted from disk while cached (served
 *   while cached, then a clear error for its request and the others unharmed), an adapter
 *   changed on disk, unregistering one in use, a model without slots. */
#include "test.h"

#include "backend/backend.h"
#include "engine/engine.h"
#include "format/format.h"
#include "zse.h"

#include <jansson.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

static char tmp[] = "/tmp/zse-test-lora-XXXXXX";
static char model_path[512];

static const char *tmp_path(const char *name)
{
    static char buf[8][600];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmp, name);
    return buf[k];
}

static zse_model *load(int max_loras, int max_cpu, int max_seqs, bool prefix_cache)
{
    zse_load_params p;
    zse_load_params_default(&p);
    p.device = "cpu";
    p.threads = 2;
    p.max_seqs = max_seqs;
    p.max_loras = max_loras;
    p.max_cpu_loras = max_cpu;
    p.no_prefix_cache = !prefix_cache;
    zse_model *m = zse_model_load(model_path, &p);
    if (!m) {
        fprintf(stderr, "cannot load %s: %s\n", model_path, zse_last_error());
        exit(1);
    }
    return m;
}

/* ---- lora_apply on the CPU backend ----------------------------------------------------------- */

static uint32_t rng_state = 12345;
static float frand(void)
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return ((float)(rng_state >> 8) / 16777216.0f - 0.5f);
}

typedef struct {
    int rank;
    float scale;
    uint16_t *a, *bt;
} test_part;

/* an image with parts at (layer 1, Q) and (layer 1, UP) */
static uint8_t *make_image(const zse_lora_shape *s, test_part *q, test_part *up, size_t *bytes)
{
    uint8_t *img = calloc(1, s->slot_bytes);
    size_t at = ((size_t)s->n_layers * ZSE_LORA_MODULES * sizeof(zse_lora_entry) + 63) & ~(size_t)63;
    test_part *parts[2] = {q, up};
    const int mods[2] = {ZSE_LORA_Q, ZSE_LORA_UP};
    for (int k = 0; k < 2; k++) {
        test_part *p = parts[k];
        int m = mods[k];
        zse_lora_entry e = {p->rank, p->scale, (int64_t)at, 0};
        at += ((size_t)p->rank * (size_t)s->in[m] * 2 + 63) & ~(size_t)63;
        e.bt = (int64_t)at;
        at += ((size_t)p->rank * (size_t)s->out[m] * 2 + 63) & ~(size_t)63;
        p->a = (uint16_t *)(img + e.a);
        p->bt = (uint16_t *)(img + e.bt);
        for (int64_t i = 0; i < p->rank * s->in[m]; i++)
            p->a[i] = zse_f32_to_f16(frand());
        for (int64_t i = 0; i < p->rank * s->out[m]; i++)
            p->bt[i] = zse_f32_to_f16(frand());
        memcpy(img + (size_t)(1 * ZSE_LORA_MODULES + m) * sizeof e, &e, sizeof e);
    }
    *bytes = at;
    return img;
}

static double ref_delta(const test_part *p, int64_t in, int64_t out, const float *x, int64_t o)
{
    double d = 0;
    for (int j = 0; j < p->rank; j++) {
        double u = 0;
        for (int64_t i = 0; i < in; i++)
            u += (double)zse_f16_to_f32(p->a[j * in + i]) * x[i];
        d += u * zse_f16_to_f32(p->bt[j * out + o]);
    }
    return d * p->scale;
}

#define MAX_ROWS 32

/* lora_apply over rows of x (width xw) on the Q and UP outputs y0q / y0u (left as they
 * were) into yq / yu, row t's sequence on adapters[t] */
static void run_apply(zse_backend *be, zse_lora_pool *pool, const int32_t *adapters, int rows, const float *x,
                      int64_t xw, const float *y0q, const float *y0u, float *yq, float *yu, const zse_lora_shape *s)
{
    int32_t tok[MAX_ROWS] = {0}, pos[MAX_ROWS] = {0}, seq[MAX_ROWS], slots[MAX_ROWS], lens[MAX_ROWS],
            table[MAX_ROWS], out_rows[1] = {0};
    for (int i = 0; i < rows; i++) {
        seq[i] = i;
        slots[i] = -1;
        lens[i] = 1;
        table[i] = -1;
    }
    zse_batch b = {rows, tok, pos, seq, slots, rows, lens, table, 1, 1, out_rows, adapters,
                   1u << ZSE_LORA_Q | 1u << ZSE_LORA_UP};
    CHECK(be->ops->begin_batch(be, &b) == 0);
    zse_act *ax = be->ops->act_new(be, rows, xw), *aq = be->ops->act_new(be, rows, s->out[ZSE_LORA_Q]),
            *au = be->ops->act_new(be, rows, s->out[ZSE_LORA_UP]);
    be->ops->act_write(be, ax, x, rows);
    be->ops->act_write(be, aq, y0q, rows);
    be->ops->act_write(be, au, y0u, rows);
    const zse_lora_out outs[2] = {{ZSE_LORA_Q, aq}, {ZSE_LORA_UP, au}};
    be->ops->lora_apply(be, pool, 1, ax, rows, outs, 2);
    CHECK(be->ops->sync(be) == 0);
    be->ops->act_read(be, aq, yq, rows);
    be->ops->act_read(be, au, yu, rows);
    be->ops->act_free(be, ax);
    be->ops->act_free(be, aq);
    be->ops->act_free(be, au);
}

/* the worst distance of one projection's rows from y0 + the reference delta; rows without
 * an adapter must be left exactly as they were */
static double off_reference(const int32_t *adapters, int rows, const test_part *p0, const test_part *p2,
                            int64_t in, int64_t out, const float *x, int64_t xw, const float *y0, const float *y,
                            bool *untouched)
{
    double worst = 0;
    for (int t = 0; t < rows; t++)
        for (int64_t o = 0; o < out; o++) {
            const float got = y[t * out + o], was = y0[t * out + o];
            if (adapters[t] < 0) {
                *untouched = *untouched && got == was;
                continue;
            }
            const double want = was + ref_delta(adapters[t] == 0 ? p0 : p2, in, out, x + t * xw, o);
            worst = fmax(worst, fabs(want - got));
        }
    return worst;
}

/* Slots 0 and 2 hold adapters on (layer 1, Q) and (layer 1, UP) of ranks 3/5 and 7/1 (not
 * multiples of the shrink's 4), inputs `in0 + module` wide and outputs 300 - module (more
 * than one 256-wide chunk). Checks every row against the double reference, and each
 * adapted row alone against its batched result bit for bit: runs of one adapter longer
 * than a tile (8 rows) are cut into tiles, and a row computes the same in any of them. */
static void check_apply(zse_backend *be, int64_t in0, int rows, const int32_t *adapters, bool refusals)
{
    zse_lora_shape s = {.n_layers = 2, .n_slots = 3, .slot_bytes = 8192};
    for (int m = 0; m < ZSE_LORA_MODULES; m++) {
        s.in[m] = in0 + m;
        s.out[m] = 300 - m;
    }
    while (s.slot_bytes < (uint64_t)(16 * (s.in[ZSE_LORA_UP] + 300) * 2 + 4096))
        s.slot_bytes *= 2;
    zse_lora_pool *pool = be->ops->lora_pool_new(be, &s);
    CHECK(pool != NULL);
    if (!pool)
        return;
    test_part q0 = {3, 0.5f, NULL, NULL}, u0 = {5, 2.0f, NULL, NULL}, q1 = {7, -1.0f, NULL, NULL}, u1 = {1, 1.0f, NULL, NULL};
    size_t b0, b1;
    uint8_t *img0 = make_image(&s, &q0, &u0, &b0), *img1 = make_image(&s, &q1, &u1, &b1);
    CHECK(be->ops->lora_slot_load(be, pool, 0, img0, b0) == 0 && be->ops->lora_slot_ready(be, pool, 0) == 1);
    CHECK(be->ops->lora_slot_load(be, pool, 2, img1, b1) == 0);
    if (refusals) {
        /* an entry pointing past the image is refused */
        zse_lora_entry e;
        memcpy(&e, img1 + (1 * ZSE_LORA_MODULES + ZSE_LORA_Q) * sizeof e, sizeof e);
        zse_lora_entry bad = e;
        bad.bt = (int64_t)b1;
        memcpy(img1 + (1 * ZSE_LORA_MODULES + ZSE_LORA_Q) * sizeof e, &bad, sizeof e);
        CHECK(be->ops->lora_slot_load(be, pool, 1, img1, b1) == -1 && strstr(zse_last_error(), "out of bounds"));
        memcpy(img1 + (1 * ZSE_LORA_MODULES + ZSE_LORA_Q) * sizeof e, &e, sizeof e);
        CHECK(be->ops->lora_slot_load(be, pool, 1, img1, s.slot_bytes + 64) == -1);
        zse_backend_memory mem;
        be->ops->memory(be, &mem);
        CHECK(mem.adapters == 3 * s.slot_bytes);
    }
    const int64_t xw = s.in[ZSE_LORA_UP], oq = s.out[ZSE_LORA_Q], ou = s.out[ZSE_LORA_UP];
    float *x = malloc(sizeof *x * (size_t)(rows * xw)), *y0q = malloc(sizeof *x * (size_t)(rows * oq)),
          *y0u = malloc(sizeof *x * (size_t)(rows * ou)), *yq = malloc(sizeof *x * (size_t)(rows * oq)),
          *yu = malloc(sizeof *x * (size_t)(rows * ou)), aq[300], au[300];
    CHECK(x && y0q && y0u && yq && yu);
    if (x && y0q && y0u && yq && yu) {
        for (int64_t i = 0; i < rows * xw; i++)
            x[i] = frand();
        for (int64_t i = 0; i < rows * oq; i++)
            y0q[i] = frand();
        for (int64_t i = 0; i < rows * ou; i++)
            y0u[i] = frand();
        run_apply(be, pool, adapters, rows, x, xw, y0q, y0u, yq, yu, &s);
        bool untouched = true;
        const double worst =
            fmax(off_reference(adapters, rows, &q0, &q1, s.in[ZSE_LORA_Q], oq, x, xw, y0q, yq, &untouched),
                 off_reference(adapters, rows, &u0, &u1, s.in[ZSE_LORA_UP], ou, x, xw, y0u, yu, &untouched));
        CHECK_MSG(worst < 1e-5 * sqrt((double)in0), "lora_apply off the reference by %g (inputs %lld wide)", worst,
                  (long long)in0);
        CHECK(untouched);
        for (int t = 0; t < rows; t++) {
            if (adapters[t] < 0)
                continue;
            run_apply(be, pool, &adapters[t], 1, x + t * xw, xw, y0q + t * oq, y0u + t * ou, aq, au, &s);
            CHECK_MSG(memcmp(aq, yq + t * oq, (size_t)oq * 4) == 0 && memcmp(au, yu + t * ou, (size_t)ou * 4) == 0,
                      "row %d of %d (inputs %lld wide) alone differs from its batched result", t, rows,
                      (long long)in0);
        }
    }
    free(x);
    free(y0q);
    free(y0u);
    free(yq);
    free(yu);
    free(img0);
    free(img1);
    be->ops->lora_pool_free(be, pool);
}

static void test_apply(void)
{
    zse_backend *be = zse_cpu_backend_create(2);
    const int32_t mixed[4] = {0, -1, 2, 0};
    check_apply(be, 8, 4, mixed, true);
    /* a run of 11 rows of one adapter (a tile of 8 and one of 3), a row without, 3 of the
     * other, 4 of the first again; inputs past a 256-column chunk and off the 8-lane vectors */
    int32_t runs[19];
    for (int t = 0; t < 19; t++)
        runs[t] = t < 11 ? 0 : t == 11 ? -1 : t < 15 ? 2 : 0;
    check_apply(be, 8, 19, runs, false);
    check_apply(be, 517, 19, runs, false);
    check_apply(be, 256, 9, runs, false);
    zse_backend_destroy(be);
}

/* ---- requests through the engine --------------------------------------------------------------- */

#define MAX_OUT 32
typedef struct {
    int32_t ids[MAX_OUT];
    int n;
    zse_finish finish;
    char error[512];
    bool done;
} result;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int finals;

static bool on_token(void *user, const zse_token_event *ev)
{
    result *r = user;
    pthread_mutex_lock(&mu);
    if (ev->token >= 0 && r->n < MAX_OUT && ev->finish != ZSE_FINISH_ERROR)
        r->ids[r->n++] = ev->token;
    if (ev->finish != ZSE_FINISH_NONE) {
        r->finish = ev->finish;
        snprintf(r->error, sizeof r->error, "%s", ev->error ? ev->error : "");
        r->done = true;
        finals++;
        pthread_cond_broadcast(&cv);
    }
    pthread_mutex_unlock(&mu);
    return true;
}

static bool wait_all(int n)
{
    return test_wait_count(&mu, &cv, &finals, n, true);
}

typedef struct {
    const int32_t *ids;
    size_t n;
    zse_adapter *adapter;
    int max_tokens;
} job;

/* submits the jobs together (or, one_by_one, each after the last ended) */
static void run_jobs(zse_engine *e, const job *jobs, int n, result *out, bool one_by_one)
{
    memset(out, 0, (size_t)n * sizeof *out);
    for (int i = 0; i < n; i++) {
        zse_sampling s;
        zse_sampling_default(&s);
        s.temperature = 0;
        s.max_tokens = jobs[i].max_tokens;
        s.ignore_eos = true;
        s.adapter = jobs[i].adapter;
        uint64_t id;
        CHECK(zse_engine_submit(e, jobs[i].ids, jobs[i].n, &s, 0, on_token, &out[i], &id) == 0);
        if (one_by_one)
            CHECK(wait_all(1));
    }
    if (!one_by_one)
        CHECK(wait_all(n));
}

static int32_t *json_ids(const json_t *a, size_t *n)
{
    *n = json_array_size(a);
    int32_t *v = malloc(*n * sizeof *v);
    for (size_t i = 0; i < *n; i++)
        v[i] = (int32_t)json_integer_value(json_array_get(a, i));
    return v;
}

/* every adapter of tiny-llama and the base model, both prompts, in one batch */
static void test_goldens_batched(void)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/lora/goldens.json", test_env("ZSE_TEST_DATA"));
    json_error_t err;
    json_t *g = json_load_file(path, 0, &err), *gb = json_object_get(g, "tiny-llama");
    CHECK(gb != NULL);
    zse_model *m = load(2, 2, 8, true);
    const json_t *adapters = json_object_get(gb, "adapters");
    const char *name;
    json_t *cases;
    json_object_foreach((json_t *)adapters, name, cases) {
        snprintf(path, sizeof path, "%s/lora/tiny-llama/%s", test_env("ZSE_TEST_DATA"), name);
        CHECK(zse_adapter_register(m, name, path, 1.0f) == 0);
    }
    const json_t *prompts = json_object_get(gb, "prompts");
    job jobs[16];
    const json_t *want[16];
    int32_t *ids[2];
    size_t n_ids[2];
    int n = 0;
    for (int p = 0; p < 2; p++)
        ids[p] = json_ids(json_object_get(json_array_get(prompts, (size_t)p), "ids"), &n_ids[p]);
    for (int p = 0; p < 2; p++) {
        json_object_foreach((json_t *)adapters, name, cases) {
            jobs[n] = (job){ids[p], n_ids[p], zse_adapter_get(m, name), 24};
            want[n++] = json_object_get(json_array_get(cases, (size_t)p), "greedy");
        }
        jobs[n] = (job){ids[p], n_ids[p], NULL, 24};
        want[n++] = json_object_get(json_array_get(json_object_get(gb, "base"), (size_t)p), "greedy");
    }
    zse_engine_params ep = {.max_seqs = 8, .max_batch_tokens = 256};
    zse_engine *e = zse_engine_start(m, &ep);
    result res[16];
    run_jobs(e, jobs, n, res, false);
    for (int i = 0; i < n; i++) {
        bool same = res[i].n == 24 && res[i].finish == ZSE_FINISH_LENGTH;
        for (int k = 0; same && k < 24; k++)
            same = res[i].ids[k] == json_integer_value(json_array_get(want[i], (size_t)k));
        CHECK_MSG(same, "request %d (%s) differs from PEFT's greedy tokens", i,
                  jobs[i].adapter ? zse_adapter_name(jobs[i].adapter) : "base");
    }
    zse_adapter_stats st;
    zse_adapter_get_stats(m, &st);
    CHECK(st.registered == 3 && st.slots == 2 && st.pinned == 0);
    CHECK(st.loads_host >= 3 && st.loads_slot >= 3 && st.evictions_slot >= 1);
    zse_engine_stop(e, 5);
    for (int i = 0; i < n; i++)
        zse_adapter_release(jobs[i].adapter);
    free(ids[0]);
    free(ids[1]);
    json_decref(g);
    zse_model_free(m);
}

/* a random adapter of tiny-llama's shapes on some projections, as a .zsa file */
static void write_random_adapter(const char *path, int seed)
{
    zse_hf_dir hf;
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/tiny-llama", test_env("ZSE_TEST_DATA"));
    CHECK(zse_hf_open(&hf, dir) == 0);
    zse_lora_file f = {0};
    f.n_layers = hf.config.n_layers;
    f.parts = calloc((size_t)f.n_layers * ZSE_LORA_MODULES, sizeof *f.parts);
    f.path = strdup(path);
    f.peft_config = json_pack("{ss}", "peft_type", "LORA");
    size_t total = 0;
    rng_state = (uint32_t)seed * 7919u + 1;
    const int rank = 2 + seed % 7;
    for (int l = 0; l < f.n_layers; l++)
        for (int mo = 0; mo < ZSE_LORA_MODULES; mo++)
            if ((seed + mo) % 3 != 0) {
                zse_lora_part *p = &f.parts[l * ZSE_LORA_MODULES + mo];
                CHECK(zse_lora_base_dims(&hf.config, l, mo, &p->in, &p->out));
                p->rank = rank;
                p->scale = 0.5f + (float)(seed % 3);
                total += (size_t)rank * (size_t)(p->in + p->out);
            }
    f.owned = malloc(total * 2);
    uint16_t *at = f.owned;
    for (int i = 0; i < f.n_layers * ZSE_LORA_MODULES; i++) {
        zse_lora_part *p = &f.parts[i];
        if (!p->rank)
            continue;
        for (int64_t k = 0; k < (int64_t)p->rank * (p->in + p->out); k++)
            at[k] = zse_f32_to_f16(frand() * 0.5f);
        p->a = at;
        p->bt = at + p->rank * p->in;
        at += p->rank * (p->in + p->out);
        f.modules |= 1u << (i % ZSE_LORA_MODULES);
    }
    CHECK(zse_lora_write_zsa(&f, path, true) == 0);
    zse_lora_close(&f);
    zse_hf_close(&hf);
}

static void test_many_adapters(void)
{
    enum { N_ADAPTERS = 20, N_REQ = 64 };
    mkdir(tmp_path("dir"), 0755);
    zse_model *m = load(4, 6, 16, true);
    for (int i = 0; i < N_ADAPTERS; i++) {
        char name[32], file[64];
        snprintf(name, sizeof name, "a%02d", i);
        /* the first half registered, the rest found in the adapter directory on first use */
        snprintf(file, sizeof file, i < N_ADAPTERS / 2 ? "a%02d.zsa" : "dir/a%02d.zsa", i);
        write_random_adapter(tmp_path(file), i);
        if (i < N_ADAPTERS / 2)
            CHECK(zse_adapter_register(m, name, tmp_path(file), 1.0f) == 0);
    }
    CHECK(zse_adapter_set_dir(m, tmp_path("dir")) == 0);
    size_t n_names;
    char **names = zse_adapter_list(m, &n_names);
    CHECK(names && n_names == N_ADAPTERS && !strcmp(names[0], "a00") && !strcmp(names[19], "a19"));
    for (size_t i = 0; names && i < n_names; i++)
        zse_free(names[i]);
    zse_free(names);

    static const char *texts[] = {"def main():\n    return", "import json\nimport os\n\ndef load(path):",
                                  "class Node:\n    def __init__(self, value):\n        self.value = value\n"};
    int32_t *ids[3];
    size_t n_ids[3];
    for (int t = 0; t < 3; t++)
        CHECK(zse_tokenize(m, texts[t], strlen(texts[t]), 0, &ids[t], &n_ids[t]) == 0);
    job jobs[N_REQ];
    for (int i = 0; i < N_REQ; i++) {
        char name[32];
        snprintf(name, sizeof name, "a%02d", (i * 7) % N_ADAPTERS);
        jobs[i] = (job){ids[i % 3], n_ids[i % 3], i % 9 == 8 ? NULL : zse_adapter_get(m, name), 4 + i % 4};
        CHECK(i % 9 == 8 || jobs[i].adapter);
    }
    zse_engine_params ep = {.max_seqs = 16, .max_batch_tokens = 256};
    zse_engine *e = zse_engine_start(m, &ep);
    static result alone[N_REQ], together[N_REQ];
    run_jobs(e, jobs, N_REQ, alone, true);
    run_jobs(e, jobs, N_REQ, together, false);
    int differ = 0;
    for (int i = 0; i < N_REQ; i++)
        differ += alone[i].n != together[i].n || together[i].finish != ZSE_FINISH_LENGTH ||
                  memcmp(alone[i].ids, together[i].ids, (size_t)alone[i].n * sizeof(int32_t)) != 0;
    CHECK_MSG(differ == 0, "%d of %d requests differ batched from alone", differ, N_REQ);
    /* adapters change the output: two adapters on one prompt give different tokens */
    CHECK(memcmp(together[0].ids, together[3].ids, 4 * sizeof(int32_t)) != 0);
    zse_adapter_stats st;
    zse_adapter_get_stats(m, &st);
    CHECK_MSG(st.hits_disk > 0 && st.hits_host > 0 && st.hits_slot > 0, "hits %llu/%llu/%llu",
              (unsigned long long)st.hits_slot, (unsigned long long)st.hits_host, (unsigned long long)st.hits_disk);
    CHECK(st.evictions_slot > 0 && st.evictions_host > 0 && st.failures == 0);
    CHECK_MSG(st.pinned == 0 && st.in_slots <= 4 && st.in_host <= 6 && st.registered == N_ADAPTERS,
              "pinned %d, in slots %d, in host %d, registered %d", st.pinned, st.in_slots, st.in_host, st.registered);
    zse_engine_stats es;
    zse_engine_get_stats(e, &es);
    CHECK(es.kv_blocks_used == 0 && es.running == 0 && es.queued == 0);
    zse_engine_stop(e, 5);
    for (int i = 0; i < N_REQ; i++)
        zse_adapter_release(jobs[i].adapter);
    for (int t = 0; t < 3; t++)
        zse_free(ids[t]);
    zse_model_free(m);
}

/* blocks cached under one adapter are not reused by another or by the base model */
static void test_prefix_keyed(void)
{
    zse_model *m = load(2, 2, 2, true);
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/lora/tiny-llama/all-r8", test_env("ZSE_TEST_DATA"));
    CHECK(zse_adapter_register(m, "all", dir, 1.0f) == 0);
    write_random_adapter(tmp_path("other.zsa"), 5);
    CHECK(zse_adapter_register(m, "other", tmp_path("other.zsa"), 1.0f) == 0);
    const char *text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
                       "\n\ndef main():\n    print(fibonacci(10))\n";
    int32_t *ids;
    size_t n;
    CHECK(zse_tokenize(m, text, strlen(text), 0, &ids, &n) == 0 && n > 48);
    zse_adapter *all = zse_adapter_get(m, "all"), *other = zse_adapter_get(m, "other");
    zse_adapter *order[5] = {all, other, NULL, all, NULL};
    const uint64_t want_hits[5] = {0, 0, 0, 1, 1}; /* only the second use of each finds blocks */
    float *logits[5];
    for (int k = 0; k < 5; k++) {
        zse_sampling s;
        zse_sampling_default(&s);
        s.adapter = order[k];
        zse_seq *q = zse_seq_new(m, &s);
        uint64_t hits = m->blocks.hit_tokens;
        CHECK(q && zse_seq_feed(q, ids, n) == 0);
        CHECK_MSG((m->blocks.hit_tokens > hits) == (want_hits[k] != 0), "run %d: %llu tokens from the cache", k,
                  (unsigned long long)(m->blocks.hit_tokens - hits));
        logits[k] = malloc((size_t)m->vocab * sizeof(float));
        memcpy(logits[k], zse_seq_logits(q), (size_t)m->vocab * sizeof(float));
        zse_seq_free(q);
    }
    /* reused blocks give the same logits as computed ones (CPU rows are batch-independent) */
    CHECK(memcmp(logits[0], logits[3], (size_t)m->vocab * 4) == 0);
    CHECK(memcmp(logits[2], logits[4], (size_t)m->vocab * 4) == 0);
    CHECK(memcmp(logits[0], logits[2], (size_t)m->vocab * 4) != 0 && memcmp(logits[0], logits[1], (size_t)m->vocab * 4) != 0);
    for (int k = 0; k < 5; k++)
        free(logits[k]);
    zse_adapter_release(all);
    zse_adapter_release(other);
    zse_free(ids);
    zse_model_free(m);
}

/* ngram drafts verified by the adapted model: the same greedy tokens */
static void test_spec(void)
{
    zse_model *m = load(2, 2, 4, true);
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/lora/tiny-llama/qv-rslora", test_env("ZSE_TEST_DATA"));
    CHECK(zse_adapter_register(m, "qv", dir, 1.0f) == 0);
    const char *text = "x = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3";
    int32_t *ids;
    size_t n;
    CHECK(zse_tokenize(m, text, strlen(text), 0, &ids, &n) == 0);
    zse_adapter *a = zse_adapter_get(m, "qv");
    job jobs[2] = {{ids, n, a, 20}, {ids, n, NULL, 20}};
    result plain[2], spec[2];
    zse_engine_params ep = {.max_seqs = 4, .max_batch_tokens = 128};
    zse_engine *e = zse_engine_start(m, &ep);
    run_jobs(e, jobs, 2, plain, false);
    zse_engine_stop(e, 5);
    ep.spec = (zse_spec_params){ZSE_SPEC_NGRAM, 4, NULL};
    e = zse_engine_start(m, &ep);
    run_jobs(e, jobs, 2, spec, false);
    zse_engine_stats es;
    zse_engine_get_stats(e, &es);
    zse_engine_stop(e, 5);
    for (int i = 0; i < 2; i++)
        CHECK(plain[i].n == 20 && spec[i].n == 20 && !memcmp(plain[i].ids, spec[i].ids, 20 * sizeof(int32_t)));
    CHECK(es.spec.drafted > 0);
    zse_adapter_release(a);
    zse_free(ids);
    zse_model_free(m);
}

static void copy_file(const char *from, const char *to)
{
    size_t n;
    char *b = zse_read_file(from, &n);
    FILE *f = fopen(to, "wb");
    CHECK(b && f && fwrite(b, 1, n, f) == n);
    if (f)
        fclose(f);
    free(b);
}

static void test_bad_input(void)
{
    zse_model *plain = load(0, 0, 1, true);
    CHECK(zse_adapter_register(plain, "x", tmp_path("a00.zsa"), 1.0f) == -1 &&
          strstr(zse_last_error(), "without adapter slots"));
    CHECK(!zse_adapter_get(plain, "x"));
    zse_model *m = load(1, 1, 4, true);
    zse_sampling s;
    zse_sampling_default(&s);
    CHECK(!zse_adapter_get(m, "nope") && strstr(zse_last_error(), "no adapter named 'nope'"));
    CHECK(zse_adapter_register(m, "a", tmp_path("a00.zsa"), 1.0f) == 0);
    CHECK(zse_adapter_register(m, "a", tmp_path("a01.zsa"), 1.0f) == -1 && strstr(zse_last_error(), "already"));
    CHECK(zse_adapter_register(m, "b", tmp_path("missing.zsa"), 1.0f) == -1 && strstr(zse_last_error(), "missing.zsa"));
    CHECK(!zse_adapter_get(m, "b"));
    CHECK(zse_adapter_register(m, "c", tmp_path("a01.zsa"), NAN) == -1);
    /* an adapter of another model */
    zse_model *m2 = load(1, 1, 1, true);
    CHECK(zse_adapter_register(m2, "a", tmp_path("a00.zsa"), 1.0f) == 0);
    s.adapter = zse_adapter_get(m2, "a");
    CHECK(!zse_seq_new(m, &s) && strstr(zse_last_error(), "another model"));
    zse_adapter_release(s.adapter);
    zse_model_free(m2);

    /* deleted from disk while cached: served from memory; once evicted, its request fails
     * with the reason and the others are unharmed */
    copy_file(tmp_path("a02.zsa"), tmp_path("gone.zsa"));
    CHECK(zse_adapter_register(m, "gone", tmp_path("gone.zsa"), 1.0f) == 0);
    unlink(tmp_path("gone.zsa"));
    int32_t ids[4] = {10, 20, 30, 40};
    zse_adapter *gone = zse_adapter_get(m, "gone"), *a = zse_adapter_get(m, "a");
    zse_engine_params ep = {.max_seqs = 4, .max_batch_tokens = 128};
    zse_engine *e = zse_engine_start(m, &ep);
    job j1[1] = {{ids, 4, gone, 4}};
    result r[3];
    run_jobs(e, j1, 1, r, false);
    CHECK(r[0].finish == ZSE_FINISH_LENGTH && r[0].n == 4);
    job j2[1] = {{ids, 4, a, 4}}; /* one slot, one host slot: "gone" is evicted from both */
    run_jobs(e, j2, 1, r, false);
    CHECK(r[0].finish == ZSE_FINISH_LENGTH);
    job j3[3] = {{ids, 4, gone, 4}, {ids, 4, a, 4}, {ids, 4, NULL, 4}};
    run_jobs(e, j3, 3, r, false);
    CHECK_MSG(r[0].finish == ZSE_FINISH_ERROR && strstr(r[0].error, "adapter 'gone'") && strstr(r[0].error, "gone.zsa"),
              "finish %d, error \"%s\"", (int)r[0].finish, r[0].error);
    CHECK(r[1].finish == ZSE_FINISH_LENGTH && r[1].n == 4 && r[2].finish == ZSE_FINISH_LENGTH && r[2].n == 4);
    /* back on disk with other weights: refused rather than mixed in */
    copy_file(tmp_path("a03.zsa"), tmp_path("gone.zsa"));
    run_jobs(e, j1, 1, r, false);
    CHECK(r[0].finish == ZSE_FINISH_ERROR && strstr(r[0].error, "changed on disk"));
    /* unregistered while a request holds it: the request finishes, the name is gone */
    CHECK(zse_adapter_unregister(m, "a") == 0);
    CHECK(!zse_adapter_get(m, "a") && zse_adapter_unregister(m, "a") == -1);
    run_jobs(e, j2, 1, r, false);
    CHECK(r[0].finish == ZSE_FINISH_LENGTH && r[0].n == 4);
    zse_adapter_stats st;
    zse_adapter_get_stats(m, &st);
    CHECK_MSG(st.failures >= 2 && st.pinned == 0, "failures %llu, pinned %d", (unsigned long long)st.failures, st.pinned);
    zse_engine_stop(e, 5);
    zse_adapter_release(gone);
    zse_adapter_release(a);
    zse_model_free(m);
    zse_model_free(plain);
}

int main(void)
{
    const char *bin = test_env("ZSE_BIN"), *data = test_env("ZSE_TEST_DATA");
    if (!bin || !data) {
        fprintf(stderr, "skip: ZSE_BIN and ZSE_TEST_DATA must be set\n");
        return 77;
    }
    if (!mkdtemp(tmp)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(model_path, sizeof model_path, "%s/tiny-llama-f32.zse", tmp);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' convert '%s/tiny-llama' -o '%s' --quant f32 >/dev/null 2>&1", bin, data, model_path);
    if (system(cmd) != 0) {
        fprintf(stderr, "cannot convert: %s\n", cmd);
        return 1;
    }
    test_apply();
    test_goldens_batched();
    test_many_adapters();
    test_prefix_keyed();
    test_spec();
    test_bad_input();
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmp);
    return test_main_end();
}
