/* include/zse.h: models and sequences over the model code, the paged KV cache and the
 * sampler. One zse_model owns the file mapping, tokenizer, backend, weights and the KV
 * pool; sequences borrow blocks from the pool and return them when freed. */
#include "engine/engine.h"

#include "model/model.h"
#include "template/template.h"
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <string.h>

#define PREFILL_CHUNK 256

struct zse_model {
    zse_file *file;
    zse_tokenizer *tok;
    zse_backend *be;
    zse_llm *llm;
    zse_kv *kv;
    zse_block_pool blocks;
    zse_load_params params;
    char *name;
    int ctx_size;
    int32_t eos[ZSE_MAX_EOS + 1];
    int n_eos;
    bool add_bos;
    const char *quant;
};

struct zse_seq {
    zse_model *m;
    zse_sampling s;
    char **stop;            /* owned copies */
    int32_t *tokens;        /* every token in the cache */
    size_t n_tokens, cap_tokens;
    size_t n_prompt;        /* tokens fed before generation started */
    int32_t *blocks;        /* block table */
    int n_blocks, max_blocks;
    float *logits;          /* vocab */
    bool have_logits;
    float *work_p;
    int32_t *work_i;
    zse_rng rng;
    zse_tokenizer_stream *detok;
    zse_buf pending;        /* text held back while a stop string may be completing */
    int generated;
};

const char *zse_last_error(void) { return zse_error_message(); }
const char *zse_version(void) { return ZSE_VERSION; }
void zse_free(void *p) { free(p); }

void zse_load_params_default(zse_load_params *p)
{
    memset(p, 0, sizeof *p);
    p->kv_type = ZSE_KV_F16;
}

int zse_block_pool_init(zse_block_pool *p, int n_blocks)
{
    p->free_list = zse_malloc((size_t)n_blocks * sizeof *p->free_list);
    if (!p->free_list)
        return -1;
    for (int i = 0; i < n_blocks; i++)
        p->free_list[i] = n_blocks - 1 - i; /* pop order 0, 1, 2, ... */
    p->n_free = p->n_blocks = n_blocks;
    return 0;
}

void zse_block_pool_free(zse_block_pool *p)
{
    free(p->free_list);
    memset(p, 0, sizeof *p);
}

int32_t zse_block_alloc(zse_block_pool *p)
{
    return p->n_free > 0 ? p->free_list[--p->n_free] : -1;
}

void zse_block_release(zse_block_pool *p, int32_t block)
{
    if (block >= 0 && block < p->n_blocks && p->n_free < p->n_blocks)
        p->free_list[p->n_free++] = block;
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

zse_model *zse_model_load(const char *path, const zse_load_params *params)
{
    zse_load_params dflt;
    if (!params) {
        zse_load_params_default(&dflt);
        params = &dflt;
    }
    zse_model *m = zse_calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->params = *params;
    if (!(m->file = zse_file_open(path)) || !(m->tok = zse_tokenizer_from_zse(m->file)) ||
        !(m->be = zse_backend_create(params->device, params->threads)) ||
        !(m->llm = zse_llm_load(m->file, m->be, PREFILL_CHUNK)))
        goto fail;
    const zse_config *c = zse_file_config(m->file);
    m->ctx_size = params->ctx_size > 0 && params->ctx_size < c->max_position ? params->ctx_size : c->max_position;
    int max_seqs = params->max_seqs > 0 ? params->max_seqs : 1;
    int blocks_per_seq = (m->ctx_size + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK;
    zse_kv_shape ks = {c->n_layers, blocks_per_seq * max_seqs, ZSE_KV_BLOCK, c->n_kv_heads, c->head_dim,
                       params->kv_type == ZSE_KV_INT8 ? ZSE_KV_STORE_INT8 : ZSE_KV_STORE_F16};
    if (params->kv_cache_bytes) {
        uint64_t per_block = 2ull * (uint64_t)c->n_layers * (uint64_t)c->n_kv_heads * ZSE_KV_BLOCK *
                             (params->kv_type == ZSE_KV_INT8 ? (uint64_t)c->head_dim + 4 : (uint64_t)c->head_dim * 2);
        ks.n_blocks = (int)(params->kv_cache_bytes / per_block);
        if (ks.n_blocks < 1) {
            zse_fail("KV cache budget of %llu bytes holds no block (one block needs %llu)",
                     (unsigned long long)params->kv_cache_bytes, (unsigned long long)per_block);
            goto fail;
        }
    }
    if (!(m->kv = m->be->ops->kv_new(m->be, &ks)) || zse_block_pool_init(&m->blocks, ks.n_blocks))
        goto fail;
    collect_eos(m);
    const json_t *tc = zse_file_tokenizer_config(m->file);
    json_t *ab = json_object_get(tc, "add_bos_token");
    m->add_bos = json_is_boolean(ab) ? json_is_true(ab) : false;
    const char *q = json_string_value(json_object_get(json_object_get(zse_file_header(m->file), "quant"), "scheme"));
    m->quant = q ? q : "unknown";
    base_name(path, &m->name);
    if (!m->name)
        goto fail;
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
    zse_llm_free(m->llm);
    zse_backend_destroy(m->be);
    zse_tokenizer_free(m->tok);
    zse_file_close(m->file);
    zse_block_pool_free(&m->blocks);
    free(m->name);
    free(m);
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
    out->has_chat_template = zse_file_chat_template(m->file) != NULL;
    out->device = m->be->ops->name;
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

static const char *token_name(const json_t *v)
{
    return json_is_string(v) ? json_string_value(v) : json_string_value(json_object_get(v, "content"));
}

char *zse_chat_render(const zse_model *m, const char *messages_json, const char *extra_json,
                      bool add_generation_prompt)
{
    const char *tpl = zse_file_chat_template(m->file);
    if (!tpl) {
        zse_fail("%s has no chat template; use zse run with a plain prompt", zse_file_path(m->file));
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

void zse_sampling_default(zse_sampling *s)
{
    memset(s, 0, sizeof *s);
    s->temperature = 1.0f;
    s->top_p = 1.0f;
    s->repetition_penalty = 1.0f;
}

/* ---- sequences ------------------------------------------------------------------------- */

zse_seq *zse_seq_new(zse_model *m, const zse_sampling *s)
{
    zse_seq *q = zse_calloc(1, sizeof *q);
    if (!q)
        return NULL;
    q->m = m;
    zse_sampling_default(&q->s);
    if (s)
        q->s = *s;
    int vocab = zse_file_config(m->file)->vocab_size;
    q->max_blocks = (m->ctx_size + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK;
    q->blocks = zse_calloc((size_t)q->max_blocks, sizeof *q->blocks);
    q->logits = zse_malloc((size_t)vocab * sizeof *q->logits);
    q->work_p = zse_malloc((size_t)vocab * sizeof *q->work_p);
    q->work_i = zse_malloc((size_t)vocab * sizeof *q->work_i);
    q->detok = zse_tokenizer_stream_new(m->tok, true);
    q->stop = q->s.n_stop ? zse_calloc((size_t)q->s.n_stop, sizeof *q->stop) : NULL;
    if (!q->blocks || !q->logits || !q->work_p || !q->work_i || !q->detok || (q->s.n_stop && !q->stop)) {
        zse_seq_free(q);
        return NULL;
    }
    for (int i = 0; i < q->s.n_stop; i++)
        if (!(q->stop[i] = zse_strdup(q->s.stop[i]))) {
            zse_seq_free(q);
            return NULL;
        }
    q->s.stop = (const char *const *)q->stop;
    q->s.stop_ids = NULL; /* not kept: copied below when used */
    q->s.n_stop_ids = 0;
    q->s.logit_bias = NULL;
    q->s.n_logit_bias = 0;
    if (s && s->n_logit_bias) {
        zse_logit_bias *lb = zse_malloc((size_t)s->n_logit_bias * sizeof *lb);
        if (!lb) {
            zse_seq_free(q);
            return NULL;
        }
        memcpy(lb, s->logit_bias, (size_t)s->n_logit_bias * sizeof *lb);
        q->s.logit_bias = lb;
        q->s.n_logit_bias = s->n_logit_bias;
    }
    if (s && s->n_stop_ids) {
        int32_t *ids = zse_malloc((size_t)s->n_stop_ids * sizeof *ids);
        if (!ids) {
            zse_seq_free(q);
            return NULL;
        }
        memcpy(ids, s->stop_ids, (size_t)s->n_stop_ids * sizeof *ids);
        q->s.stop_ids = ids;
        q->s.n_stop_ids = s->n_stop_ids;
    }
    zse_rng_seed(&q->rng, q->s.seed);
    return q;
}

void zse_seq_free(zse_seq *q)
{
    if (!q)
        return;
    for (int i = 0; i < q->n_blocks; i++)
        zse_block_release(&q->m->blocks, q->blocks[i]);
    for (int i = 0; q->stop && i < q->s.n_stop; i++)
        free(q->stop[i]);
    free(q->stop);
    free((void *)q->s.logit_bias);
    free((void *)q->s.stop_ids);
    free(q->blocks);
    free(q->tokens);
    free(q->logits);
    free(q->work_p);
    free(q->work_i);
    zse_tokenizer_stream_free(q->detok);
    zse_buf_free(&q->pending);
    free(q);
}

size_t zse_seq_length(const zse_seq *q) { return q->n_tokens; }
const int32_t *zse_seq_tokens(const zse_seq *q) { return q->tokens; }

static int reserve_kv(zse_seq *q, size_t new_len)
{
    if (new_len > (size_t)q->m->ctx_size)
        return zse_fail("sequence of %zu tokens is longer than the context of %d", new_len, q->m->ctx_size);
    int need = (int)((new_len + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK);
    while (q->n_blocks < need) {
        int32_t b = zse_block_alloc(&q->m->blocks);
        if (b < 0)
            return zse_fail("the KV cache is full (%d blocks of %d tokens in use); use a larger "
                            "--kv-cache budget or fewer sequences", q->m->blocks.n_blocks, ZSE_KV_BLOCK);
        q->blocks[q->n_blocks++] = b;
    }
    if (new_len > q->cap_tokens) {
        size_t cap = q->cap_tokens ? q->cap_tokens * 2 : 256;
        while (cap < new_len)
            cap *= 2;
        int32_t *p = zse_realloc(q->tokens, cap * sizeof *p);
        if (!p)
            return -1;
        q->tokens = p;
        q->cap_tokens = cap;
    }
    return 0;
}

/* runs ids through the model in chunks; the last chunk's last row yields q->logits, and
 * every row's logits go to all_logits [n][vocab] when it is given */
static int run_tokens(zse_seq *q, const int32_t *ids, size_t n, float *all_logits)
{
    int32_t pos[PREFILL_CHUNK], seq_of[PREFILL_CHUNK], slots[PREFILL_CHUNK], rows[PREFILL_CHUNK];
    size_t vocab = (size_t)zse_file_config(q->m->file)->vocab_size;
    for (size_t done = 0; done < n;) {
        int chunk = (int)(n - done < PREFILL_CHUNK ? n - done : PREFILL_CHUNK);
        size_t start = q->n_tokens;
        for (int i = 0; i < chunk; i++) {
            size_t p = start + (size_t)i;
            pos[i] = (int32_t)p;
            seq_of[i] = 0;
            slots[i] = q->blocks[p / ZSE_KV_BLOCK] * ZSE_KV_BLOCK + (int32_t)(p % ZSE_KV_BLOCK);
        }
        int32_t seq_len = (int32_t)(start + (size_t)chunk);
        bool last = done + (size_t)chunk == n;
        for (int i = 0; i < chunk; i++)
            rows[i] = i;
        int n_out = all_logits ? chunk : last ? 1 : 0;
        zse_batch b = {chunk, ids + done, pos, seq_of, slots, 1, &seq_len, q->blocks, q->max_blocks,
                       n_out, all_logits ? rows : rows + chunk - 1};
        float *dst = all_logits ? all_logits + done * vocab : q->logits;
        if (zse_llm_forward(q->m->llm, q->m->kv, &b, dst) != 0)
            return -1;
        if (all_logits && last)
            memcpy(q->logits, dst + (size_t)(chunk - 1) * vocab, vocab * sizeof *dst);
        memcpy(q->tokens + start, ids + done, (size_t)chunk * sizeof *ids);
        q->n_tokens += (size_t)chunk;
        done += (size_t)chunk;
    }
    q->have_logits = true;
    return 0;
}

int zse_seq_feed(zse_seq *q, const int32_t *ids, size_t n)
{
    if (n == 0)
        return 0;
    if (reserve_kv(q, q->n_tokens + n) != 0)
        return -1;
    int rc = run_tokens(q, ids, n, NULL);
    if (rc == 0 && q->generated == 0)
        q->n_prompt = q->n_tokens;
    return rc;
}

int zse_seq_feed_logits(zse_seq *q, const int32_t *ids, size_t n, float *logits)
{
    if (n == 0)
        return 0;
    if (reserve_kv(q, q->n_tokens + n) != 0)
        return -1;
    int rc = run_tokens(q, ids, n, logits);
    if (rc == 0 && q->generated == 0)
        q->n_prompt = q->n_tokens;
    return rc;
}

const float *zse_seq_logits(zse_seq *q)
{
    return q->have_logits ? q->logits : NULL;
}

static bool is_stop_id(const zse_seq *q, int32_t t)
{
    if (!q->s.ignore_eos)
        for (int i = 0; i < q->m->n_eos; i++)
            if (q->m->eos[i] == t)
                return true;
    for (int i = 0; i < q->s.n_stop_ids; i++)
        if (q->s.stop_ids[i] == t)
            return true;
    return false;
}

/* moves text that can no longer start a stop string from pending to *out; true when a stop
 * string completed (the text before it is emitted, the rest dropped) */
static bool release_text(zse_seq *q, zse_buf *out, bool final)
{
    const char *p = zse_buf_str(&q->pending);
    for (int i = 0; i < q->s.n_stop; i++) {
        const char *hit = q->s.stop[i][0] ? strstr(p, q->s.stop[i]) : NULL;
        if (hit) {
            zse_buf_append(out, p, (size_t)(hit - p));
            q->pending.len = 0;
            return true;
        }
    }
    size_t hold = final ? 0 : zse_stop_holdback(p, q->pending.len, q->s.stop, q->s.n_stop);
    size_t emit = q->pending.len - hold;
    zse_buf_append(out, p, emit);
    memmove(q->pending.data, q->pending.data + emit, hold);
    q->pending.len = hold;
    if (q->pending.data)
        q->pending.data[hold] = '\0';
    return false;
}

int zse_seq_next(zse_seq *q, int32_t *token, char **text_piece, zse_finish *finish)
{
    *finish = ZSE_FINISH_NONE;
    *text_piece = NULL;
    if (!q->have_logits)
        return zse_fail("feed a prompt before generating");
    int vocab = zse_file_config(q->m->file)->vocab_size;
    zse_history h = {q->tokens, q->n_prompt, q->tokens + q->n_prompt, q->n_tokens - q->n_prompt};
    int32_t t = zse_sample(&q->s, q->logits, vocab, &h, &q->rng, q->work_p, q->work_i);
    *token = t;
    q->have_logits = false;
    zse_buf out = {0};
    bool stopped = is_stop_id(q, t);
    if (!stopped) {
        zse_buf piece = {0};
        if (zse_tokenizer_stream_push(q->detok, t, &piece) != 0 ||
            zse_buf_append(&q->pending, zse_buf_str(&piece), piece.len) != 0) {
            zse_buf_free(&piece);
            return -1;
        }
        zse_buf_free(&piece);
        q->generated++;
        stopped = release_text(q, &out, false);
    }
    if (stopped) {
        *finish = ZSE_FINISH_STOP;
    } else if ((q->s.max_tokens > 0 && q->generated >= q->s.max_tokens) || q->n_tokens + 1 >= (size_t)q->m->ctx_size) {
        *finish = ZSE_FINISH_LENGTH;
    }
    if (*finish == ZSE_FINISH_LENGTH) {
        zse_buf rest = {0};
        zse_tokenizer_stream_flush(q->detok, &rest);
        zse_buf_append(&q->pending, zse_buf_str(&rest), rest.len);
        zse_buf_free(&rest);
        if (release_text(q, &out, true))
            *finish = ZSE_FINISH_STOP;
    }
    /* the token joins the cache (a later feed continues after it) while the context has room */
    if (*finish != ZSE_FINISH_STOP && q->n_tokens < (size_t)q->m->ctx_size && zse_seq_feed(q, &t, 1) != 0) {
        zse_buf_free(&out);
        return -1;
    }
    if (zse_buf_reserve(&out, 0) != 0)
        return -1;
    *text_piece = out.data;
    return 0;
}

int zse_seq_truncate(zse_seq *q, size_t length)
{
    if (length > q->n_tokens)
        return zse_fail("cannot truncate a sequence of %zu tokens to %zu", q->n_tokens, length);
    q->n_tokens = length;
    int keep = (int)((length + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK);
    while (q->n_blocks > keep)
        zse_block_release(&q->m->blocks, q->blocks[--q->n_blocks]);
    q->have_logits = false;
    /* what follows is a new prompt: generation counts, stop-string state and the
     * detokenizer start over */
    q->n_prompt = length;
    q->generated = 0;
    q->pending.len = 0;
    zse_tokenizer_stream *fresh = zse_tokenizer_stream_new(q->m->tok, true);
    if (!fresh)
        return -1;
    zse_tokenizer_stream_free(q->detok);
    q->detok = fresh;
    return 0;
}
