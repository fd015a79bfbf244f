/* include/zse.h, the model half: loading a .zse file onto a backend, sizing the KV cache for
 * the device, and what a loaded model says of itself (info, memory, tokens, chat template).
 * One zse_model owns the file mapping, tokenizer, backend, weights and the KV pool;
 * sequences (api.c, scheduler.c) borrow blocks from the pool and return them. */
#include "engine/engine.h"

#include "model/model.h"
#include "template/template.h"
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* logit rows reserved at load: a vocabulary row is 0.6 MB at 152k, and generating needs
 * one; callers that want every position's logits (perplexity) grow it, the engine to its
 * batch */
#define LOGIT_ROWS 8



const char *zse_last_error(void) { return zse_error_message(); }
const char *zse_version(void) { return ZSE_VERSION; }
void zse_free(void *p) { free(p); }

void zse_load_params_default(zse_load_params *p)
{
    memset(p, 0, sizeof *p);
    p->kv_type = ZSE_KV_F16;
}

static const char *base_name(const char *path, char **owned)
{
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    size_t n = strlen(b);
    if (n > 4 && strcmp(b + n - 4, ".zse") == 0)
        n -= 4;
    *owned = zse_strndup(b, n);
    return *owned;
}

/* eos ids: the config's (config.json, generation_config.json, tokenizer_config's name) */
static void collect_eos(zse_model *m)
{
    const zse_config *c = zse_file_config(m->file);
    for (int i = 0; i < c->n_eos; i++)
        m->eos[m->n_eos++] = c->eos_ids[i];
    int32_t te = zse_tokenizer_eos(m->tok);
    bool seen = false;
    for (int i = 0; i < m->n_eos; i++)
        seen = seen || m->eos[i] == te;
    if (te >= 0 && !seen)
        m->eos[m->n_eos++] = te;
}

/* bytes of one KV block: K and V of 16 tokens for every layer and KV head */
static uint64_t kv_block_bytes(const zse_config *c, zse_kv_type type)
{
    uint64_t per_head = type == ZSE_KV_INT8 ? (uint64_t)c->head_dim + 4 /* f32 scale */ : (uint64_t)c->head_dim * 2;
    return 2ull * (uint64_t)c->n_layers * (uint64_t)c->n_kv_heads * ZSE_KV_BLOCK * per_head;
}

/* Without a budget: room for max_seqs full contexts, but not more than a quarter of the
 * machine's memory (a 32k-context model times 16 sequences would ask for tens of GB);
 * never less than one full context. */
static int default_kv_blocks(const zse_config *c, const zse_load_params *p, int ctx_size)
{
    uint64_t per_seq = (uint64_t)(ctx_size + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK;
    uint64_t want = per_seq * (uint64_t)(p->max_seqs > 0 ? p->max_seqs : 1);
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) {
        uint64_t cap = (uint64_t)pages * (uint64_t)page / 4 / kv_block_bytes(c, p->kv_type);
        if (cap < per_seq)
            cap = per_seq;
        if (want > cap)
            want = cap;
    }
    return want > INT32_MAX / ZSE_KV_BLOCK ? INT32_MAX / ZSE_KV_BLOCK : (int)want;
}

#define MIB (1024.0 * 1024.0)

/* On a GPU the KV cache gets what is left of the device (or of --gpu-memory) after the
 * weights, activations and workspace, less a reserve for what grows later (the engine's
 * larger batches, cuBLAS): never more than the request, and never less than one full
 * context (anything less could not run a single long sequence). */
static int fit_kv_on_device(const zse_backend_memory *bm, const zse_load_params *p, uint64_t per_block,
                            int per_seq, int *n_blocks)
{
    uint64_t held = bm->weights + bm->adapters + bm->activations + bm->workspace + bm->slabs;
    uint64_t free_now = bm->device_total > bm->device_used ? bm->device_total - bm->device_used : 0;
    uint64_t room = free_now;
    if (p->gpu_memory) {
        if (held >= p->gpu_memory)
            return zse_fail("the model needs %.0f MiB of GPU memory before its KV cache, more than --gpu-memory "
                            "%.0f MiB", (double)held / MIB, (double)p->gpu_memory / MIB);
        if (p->gpu_memory - held < room)
            room = p->gpu_memory - held;
    }
    uint64_t reserve = room / 20 > (256u << 20) ? room / 20 : (256u << 20);
    room = room > reserve ? room - reserve : 0;
    uint64_t fit = room / per_block;
    if (p->kv_cache_bytes && (uint64_t)*n_blocks > fit)
        return zse_fail("a KV cache of %.0f MiB does not fit: %.0f MiB are left on the GPU after the weights "
                        "(%.0f MiB) and a reserve of %.0f MiB; use a smaller --kv-cache-size",
                        (double)p->kv_cache_bytes / MIB, (double)room / MIB, (double)bm->weights / MIB,
                        (double)reserve / MIB);
    if (fit < (uint64_t)per_seq)
        return zse_fail("the KV cache for one full context of %d tokens needs %.0f MiB, but only %.0f MiB of GPU "
                        "memory are left after the weights (%.0f MiB); use a shorter --ctx, --kv-cache int8, or "
                        "more --gpu-memory",
                        per_seq * ZSE_KV_BLOCK, (double)per_seq * (double)per_block / MIB, (double)room / MIB,
                        (double)bm->weights / MIB);
    if ((uint64_t)*n_blocks > fit)
        *n_blocks = (int)fit;
    return 0;
}

static int create_kv(zse_model *m, const zse_config *c, const zse_load_params *params)
{
    int n_blocks;
    uint64_t per_block = kv_block_bytes(c, params->kv_type);
    int per_seq = (m->ctx_size + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK;
    if (params->kv_cache_bytes) {
        uint64_t n = params->kv_cache_bytes / per_block;
        if (n < 1)
            return zse_fail("a KV cache budget of %llu bytes holds no block (one block of %d tokens needs %llu)",
                            (unsigned long long)params->kv_cache_bytes, ZSE_KV_BLOCK, (unsigned long long)per_block);
        n_blocks = n > INT32_MAX / ZSE_KV_BLOCK ? INT32_MAX / ZSE_KV_BLOCK : (int)n;
    } else {
        n_blocks = default_kv_blocks(c, params, m->ctx_size);
    }
    zse_backend_memory bm;
    m->be->ops->memory(m->be, &bm);
    if (bm.on_device && fit_kv_on_device(&bm, params, per_block, per_seq, &n_blocks) != 0)
        return -1;
    zse_kv_shape ks = {c->n_layers, n_blocks, ZSE_KV_BLOCK, c->n_kv_heads, c->head_dim,
                       params->kv_type == ZSE_KV_INT8 ? ZSE_KV_STORE_INT8 : ZSE_KV_STORE_F16};
    if (!(m->kv = m->be->ops->kv_new(m->be, &ks)))
        return -1;
    return zse_block_pool_init(&m->blocks, n_blocks, !params->no_prefix_cache);
}

/* the bytes of every expert of every bank (a mixture-of-experts model's routed weights,
 * which are not in the tensor list) */
static uint64_t expert_bytes(const zse_file *f)
{
    uint64_t bytes = 0;
    for (size_t i = 0; i < zse_file_n_expert_banks(f); i++) {
        const zse_expert_bank *b = zse_file_expert_bank_at(f, i);
        bytes += (uint64_t)b->count * b->size;
    }
    return bytes;
}

int zse_model_ctx_size(const zse_config *c, const zse_load_params *p)
{
    return p->ctx_size > 0 && p->ctx_size < c->max_position ? p->ctx_size : c->max_position;
}

/* ---- placement: what stays on the device ------------------------------------------------
 * Knobs for tests and comparisons (docs/CUDA.md): ZSE_EXPERT_CACHE=N offloads a MoE model's
 * experts with at most N cached, ZSE_STREAM_LAYERS=N streams at least N layers of a dense
 * model, whatever the budget; ZSE_STREAM_BUFFERS=N layer buffers (default 2);
 * ZSE_HOST_EXPERTS=auto|never|always says which missing experts run on the host. */

/* a count from the environment in [lo, hi] (0 when unset); -1 with an error when malformed */
static int env_count(const char *name, int lo, int hi, int *out)
{
    const char *v = getenv(name);
    *out = 0;
    if (!v || !*v)
        return 0;
    char *end;
    long n = strtol(v, &end, 10);
    if (*end || n < lo || n > hi)
        return zse_fail("%s=%s: a count from %d to %d is expected", name, v, lo, hi);
    *out = (int)n;
    return 0;
}

static int host_experts_mode(zse_host_experts *out)
{
    const char *v = getenv("ZSE_HOST_EXPERTS");
    *out = ZSE_HOST_EXPERTS_AUTO;
    if (!v || !*v || strcmp(v, "auto") == 0)
        return 0;
    if (strcmp(v, "never") == 0)
        *out = ZSE_HOST_EXPERTS_NEVER;
    else if (strcmp(v, "always") == 0)
        *out = ZSE_HOST_EXPERTS_ALWAYS;
    else
        return zse_fail("ZSE_HOST_EXPERTS=%s: auto, never or always is expected", v);
    return 0;
}

int zse_model_fit(const zse_file *f, const zse_load_params *p, uint64_t budget, const char *budget_what,
                  bool embed_on_host, zse_fit *out)
{
    const zse_config *c = zse_file_config(f);
    const int ctx = zse_model_ctx_size(c, p);
    const uint64_t per_block = kv_block_bytes(c, p->kv_type);
    const uint64_t per_seq = (uint64_t)(ctx + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK;
    zse_fit_in in = {.budget = budget, .budget_what = budget_what, .max_tokens = ZSE_PREFILL_CHUNK,
                     .max_out = LOGIT_ROWS, .embed_on_host = embed_on_host};
    memset(out, 0, sizeof *out);
    if (ctx < 1)
        return zse_fail("the model's context length is %d", ctx);
    if (p->kv_cache_bytes) { /* an explicit size must fit as it is */
        if (p->kv_cache_bytes < per_block)
            return zse_fail("a KV cache budget of %llu bytes holds no block (one block of %d tokens needs %llu)",
                            (unsigned long long)p->kv_cache_bytes, ZSE_KV_BLOCK, (unsigned long long)per_block);
        in.kv_want = in.kv_min = p->kv_cache_bytes / per_block * per_block;
    } else {
        in.kv_want = (uint64_t)default_kv_blocks(c, p, ctx) * per_block;
        in.kv_min = per_seq * per_block;
    }
    if (env_count("ZSE_EXPERT_CACHE", 1, 1 << 30, &in.force_expert_slots) != 0 ||
        env_count("ZSE_STREAM_LAYERS", 1, 1 << 30, &in.force_streamed) != 0 ||
        env_count("ZSE_STREAM_BUFFERS", 1, 64, &in.stream_buffers) != 0)
        return -1;
    return zse_llm_fit(f, &in, out);
}

/* The device budget, then the placement that fits it. On the CPU there is nothing to budget
 * (its weights are used in place from the mapping): every weight stays put unless a test
 * knob asks for the offload path. */
static int place_weights(zse_model *m, const zse_load_params *p, zse_fit *fit)
{
    const zse_config *c = zse_file_config(m->file);
    zse_backend_memory bm;
    m->be->ops->memory(m->be, &bm);
    uint64_t budget;
    const char *what;
    memset(fit, 0, sizeof *fit);
    if (!bm.on_device) {
        if (p->gpu_memory)
            zse_log(ZSE_LOG_WARN, "--gpu-memory has nothing to budget on the %s backend: its weights are used in "
                    "place from the file's mapping", m->be->ops->name);
        const char *se = getenv("ZSE_EXPERT_CACHE"), *sl = getenv("ZSE_STREAM_LAYERS");
        if (!(se && *se) && !(sl && *sl))
            return 0; /* resident */
        budget = UINT64_MAX / 4;
        what = "the budget is";
    } else if (p->gpu_memory) {
        budget = p->gpu_memory;
        what = "--gpu-memory allows";
    } else {
        budget = bm.device_total > bm.device_used ? bm.device_total - bm.device_used : 0;
        what = "the GPU's free memory is";
    }
    /* an untied embedding table stays in host memory where the backend can leave it there */
    const bool embed_on_host = m->be->ops->weight_load_lookup && !c->tie_embeddings;
    return zse_model_fit(m->file, p, budget, what, embed_on_host, fit);
}

/* loads the weights where the fit puts them */
static int load_weights(zse_model *m, const zse_load_params *p)
{
    zse_fit fit;
    int knob;
    zse_host_experts host;
    /* every knob is checked, whether or not this model and backend use it */
    if (env_count("ZSE_EXPERT_CACHE", 1, 1 << 30, &knob) != 0 || env_count("ZSE_STREAM_LAYERS", 1, 1 << 30, &knob) != 0 ||
        env_count("ZSE_STREAM_BUFFERS", 1, 64, &knob) != 0 || host_experts_mode(&host) != 0 ||
        place_weights(m, p, &fit) != 0)
        return -1;
    zse_placement pl;
    zse_fit_placement(&fit, &pl);
    pl.host_threads = p->threads;
    int rc = host_experts_mode(&pl.host_experts);
    if (rc == 0)
        m->llm = zse_llm_load_placed(m->file, m->be, ZSE_PREFILL_CHUNK, LOGIT_ROWS,
                                     fit.mode == ZSE_FIT_RESIDENT ? NULL : &pl);
    m->placement = fit.mode;
    m->layers_streamed = fit.layers_streamed;
    m->expert_slots = fit.expert_slots;
    m->experts_total = fit.experts_total;
    if (fit.mode == ZSE_FIT_STREAM && m->llm)
        zse_log(ZSE_LOG_INFO, "%s: %d of %d layers streamed from host memory through %d buffers",
                zse_file_path(m->file), fit.layers_streamed, fit.n_layers, fit.stream_buffers);
    else if (fit.mode == ZSE_FIT_EXPERTS && m->llm)
        zse_log(ZSE_LOG_INFO, "%s: experts in host memory, %d of %d cached on the device", zse_file_path(m->file),
                fit.expert_slots, fit.experts_total);
    zse_fit_free(&fit);
    return rc == 0 && m->llm ? 0 : -1;
}

/* (run_lock held, or no step can run yet) the backend's memory counters into m->mem_seen */
static void read_memory(zse_model *m)
{
    zse_backend_memory bm;
    m->be->ops->memory(m->be, &bm);
    pthread_mutex_lock(&m->mem_lock);
    m->mem_seen = bm;
    m->mem_seen_at = zse_now();
    pthread_mutex_unlock(&m->mem_lock);
}

zse_model *zse_model_load(const char *path, const zse_load_params *params)
{
    zse_load_params dflt;
    if (!params) {
        zse_load_params_default(&dflt);
        params = &dflt;
    }
    if (params->kv_type != ZSE_KV_F16 && params->kv_type != ZSE_KV_INT8) {
        zse_fail("unknown KV cache type %d (f16 or int8)", (int)params->kv_type);
        return NULL;
    }
    zse_model *m = zse_calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->params = *params;
    m->params.device = NULL; /* the caller's string; the backend's name says what runs */
    if (pthread_mutex_init(&m->run_lock, NULL) != 0) {
        free(m);
        zse_fail("cannot create a mutex");
        return NULL;
    }
    pthread_mutex_init(&m->grammar_lock, NULL);
    pthread_mutex_init(&m->mem_lock, NULL);
    if (!(m->mask_timing = zse_calloc(1, sizeof *m->mask_timing)) || !(m->file = zse_file_open(path)) ||
        !(m->tok = zse_tokenizer_from_zse(m->file)) ||
        !(m->be = zse_backend_create(params->device, params->threads)))
        goto fail;
    const zse_config *c = zse_file_config(m->file);
    m->vocab = c->vocab_size;
    m->ctx_size = zse_model_ctx_size(c, params);
    if (m->ctx_size < 1) {
        zse_fail("the model's context length is %d", m->ctx_size);
        goto fail;
    }
    if (load_weights(m, params) != 0)
        goto fail;
    /* adapter slots before the KV cache, which takes what is left of the device */
    if (zse_lora_cache_new(m, params) != 0 || create_kv(m, c, params) != 0)
        goto fail;
    collect_eos(m);
    zse_model_find_tool_markers(m);
    const json_t *tc = zse_file_tokenizer_config(m->file);
    json_t *ab = json_object_get(tc, "add_bos_token");
    m->add_bos = json_is_boolean(ab) ? json_is_true(ab) : false;
    const char *q = json_string_value(json_object_get(json_object_get(zse_file_header(m->file), "quant"), "scheme"));
    m->quant = q ? q : "unknown";
    base_name(path, &m->name);
    if (!m->name)
        goto fail;
    read_memory(m);
    return m;
fail:
    zse_error_prefix("cannot load %s", path);
    zse_model_free(m);
    return NULL;
}

void zse_model_free(zse_model *m)
{
    if (!m)
        return;
    if (m->kv)
        m->be->ops->kv_free(m->be, m->kv);
    zse_lora_cache_free(m->lora);
    zse_llm_free(m->llm);
    zse_backend_destroy(m->be);
    zse_tokenizer_free(m->tok);
    zse_file_close(m->file);
    zse_block_pool_free(&m->blocks);
    zse_grammar_vocab_free(m->gvocab);
    zse_grammar_vocab_free(m->gvocab_tools);
    free(m->mask_timing);
    pthread_mutex_destroy(&m->run_lock);
    pthread_mutex_destroy(&m->grammar_lock);
    pthread_mutex_destroy(&m->mem_lock);
    free(m->chat_template);
    free(m->name);
    free(m);
}

bool zse_model_is_eos(const zse_model *m, int32_t t)
{
    for (int i = 0; i < m->n_eos; i++)
        if (m->eos[i] == t)
            return true;
    return false;
}

void zse_model_get_info(const zse_model *m, zse_model_info *out)
{
    const zse_config *c = zse_file_config(m->file);
    memset(out, 0, sizeof *out);
    out->arch = c->arch;
    out->name = m->name;
    out->n_layers = c->n_layers;
    out->n_heads = c->n_heads;
    out->n_kv_heads = c->n_kv_heads;
    out->head_dim = c->head_dim;
    out->hidden_size = c->hidden_size;
    out->vocab_size = c->vocab_size;
    out->ctx_size = m->ctx_size;
    out->bos_id = zse_tokenizer_bos(m->tok) >= 0 ? zse_tokenizer_bos(m->tok) : c->bos_id;
    out->add_bos = m->add_bos;
    out->eos_ids = m->eos;
    out->n_eos = m->n_eos;
    out->quant = m->quant;
    out->has_chat_template = zse_model_chat_template(m) != NULL;
    out->device = m->be->ops->name;
}

void zse_model_note_memory(zse_model *m)
{
    if (zse_now() - m->mem_seen_at >= 1.0)
        read_memory(m);
}

void zse_model_get_memory(zse_model *m, zse_memory_info *out)
{
    /* between steps the backend's counters are still: read them now; while a step runs,
     * the engine's last reading (at most a second older than the step's start) */
    if (pthread_mutex_trylock(&m->run_lock) == 0) {
        read_memory(m);
        pthread_mutex_unlock(&m->run_lock);
    }
    zse_backend_memory bm;
    pthread_mutex_lock(&m->mem_lock);
    bm = m->mem_seen;
    pthread_mutex_unlock(&m->mem_lock);
    memset(out, 0, sizeof *out);
    out->weights = bm.weights;
    if (!bm.on_device && m->placement == ZSE_FIT_RESIDENT) { /* used in place: the mapped tensors and experts */
        out->weights += expert_bytes(m->file);
        for (size_t i = 0; i < zse_file_n_tensors(m->file); i++)
            out->weights += zse_file_tensor_at(m->file, i)->size;
    }
    out->kv_cache = bm.kv_cache;
    out->adapters = bm.adapters;
    out->activations = bm.activations;
    out->workspace = bm.workspace;
    out->stream_buffers = m->placement == ZSE_FIT_STREAM ? bm.slabs : 0;
    out->expert_cache = m->placement == ZSE_FIT_EXPERTS ? bm.slabs : 0;
    out->host_pinned = bm.host_pinned;
    out->placement = zse_fit_mode_name(m->placement);
    const int n_layers = zse_file_config(m->file)->n_layers;
    out->layers_streamed = m->layers_streamed;
    out->layers_resident = n_layers - m->layers_streamed;
    out->experts_cached = m->placement == ZSE_FIT_EXPERTS ? m->expert_slots : 0;
    for (size_t i = 0; i < zse_file_n_expert_banks(m->file); i++)
        out->experts_total += zse_file_expert_bank_at(m->file, i)->count;
    if (m->placement != ZSE_FIT_EXPERTS)
        out->experts_cached = out->experts_total;
    out->on_device = bm.on_device;
    out->device_used = bm.device_used;
    out->device_total = bm.device_total;
    uint64_t ours = bm.weights + bm.adapters + bm.kv_cache + bm.activations + bm.workspace + bm.slabs;
    out->device_other = bm.device_used > ours ? bm.device_used - ours : 0;
}

void zse_offload_stats_of(const zse_llm *llm, zse_offload_stats *out)
{
    zse_llm_offload_stats s;
    zse_llm_offload_stats_get(llm, &s);
    out->steps = s.steps;
    out->expert_hits = s.expert_hits;
    out->expert_fetches = s.expert_fetches;
    out->expert_prefetches = s.expert_prefetches;
    out->expert_prefetch_hits = s.expert_prefetch_hits;
    out->expert_host = s.expert_host;
    out->layers_streamed = s.layers_streamed;
    out->bytes_to_device = s.bytes_to_device;
}

void zse_model_get_offload_stats(zse_model *m, zse_offload_stats *out)
{
    pthread_mutex_lock(&m->run_lock);
    zse_offload_stats_of(m->llm, out);
    pthread_mutex_unlock(&m->run_lock);
}

int zse_tokenize(const zse_model *m, const char *text, size_t len, int flags, int32_t **ids, size_t *n)
{
    return zse_tokenizer_encode(m->tok, text, len, flags & ZSE_TOK_ADD_SPECIAL, flags & ZSE_TOK_PARSE_SPECIAL,
                                ids, n);
}

char *zse_detokenize(const zse_model *m, const int32_t *ids, size_t n, bool skip_special)
{
    return zse_tokenizer_decode(m->tok, ids, n, skip_special);
}

uint8_t *zse_token_bytes(const zse_model *m, int32_t id, size_t *len)
{
    zse_buf b = {0};
    if (zse_tokenizer_token_bytes(m->tok, id, &b) != 0 || zse_buf_reserve(&b, 1) != 0) {
        zse_buf_free(&b);
        return NULL;
    }
    *len = b.len;
    return (uint8_t *)b.data;
}

static const char *token_name(const json_t *v)
{
    return json_is_string(v) ? json_string_value(v) : json_string_value(json_object_get(v, "content"));
}

char *zse_chat_render(const zse_model *m, const char *messages_json, const char *extra_json,
                      bool add_generation_prompt)
{
    const char *tpl = zse_model_chat_template(m);
    if (!tpl) {
        zse_fail("%s has no chat template (its source folder had none); send a plain prompt instead "
                 "(zse run -p, or /v1/completions)", zse_file_path(m->file));
        return NULL;
    }
    json_error_t err;
    json_t *messages = json_loads(messages_json, 0, &err);
    json_t *extra = extra_json ? json_loads(extra_json, 0, &err) : NULL;
    char *out = NULL;
    if (!json_is_array(messages) || (extra_json && !json_is_object(extra))) {
        zse_fail("chat messages must be a JSON array (and extra variables a JSON object)");
    } else {
        const json_t *tc = zse_file_tokenizer_config(m->file);
        zse_buf b = {0};
        if (zse_chat_template_apply(tpl, messages, json_object_get(extra, "tools"), add_generation_prompt,
                                    token_name(json_object_get(tc, "bos_token")),
                                    token_name(json_object_get(tc, "eos_token")), extra, &b) == 0)
            out = b.data ? b.data : zse_strdup("");
        else
            zse_buf_free(&b);
    }
    json_decref(messages);
    json_decref(extra);
    return out;
}

/* ---- the chat template and the tokenizer's configuration --------------------------------- */

const char *zse_model_chat_template(const zse_model *m)
{
    return m->chat_template ? m->chat_template : zse_file_chat_template(m->file);
}

int zse_model_set_chat_template(zse_model *m, const char *src)
{
    char *copy = NULL;
    if (src && !(copy = zse_strdup(src)))
        return zse_fail("out of memory copying the chat template");
    free(m->chat_template);
    m->chat_template = copy;
    return 0;
}

char *zse_model_tokenizer_config(const zse_model *m)
{
    const json_t *tc = zse_file_tokenizer_config(m->file);
    if (!tc)
        return NULL;
    char *s = json_dumps(tc, JSON_COMPACT | JSON_SORT_KEYS);
    if (!s)
        zse_fail("out of memory writing the tokenizer configuration");
    return s;
}
