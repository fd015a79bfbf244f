/* zse convert: Hugging Face directory (or GGUF file, gguf_model.c) -> one .zse file.
 *
 * The writer streams tensor by tensor: each tensor is converted to f32 a few rows at a
 * time, quantized by the thread pool into one packed buffer, hashed and written; the
 * model is never held in memory. Offsets are planned before any data is written (sizes
 * follow from shapes), so the header is written last into space reserved for it. Output
 * goes to a temp file beside OUT, fsynced and renamed; on error or SIGINT/SIGTERM the temp
 * file is removed and nothing is left behind. */
#include "format/format.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* where one expert's part comes from: a 2-D tensor of its own, or rows of a fused 3-D one */
typedef struct {
    const zse_st_tensor *src;
    size_t first;               /* the element of src where the part begins */
} part_src;

/* a MoE layer's routed experts, written as one expert bank (docs/FORMAT.md §Expert banks) */
typedef struct {
    zse_expert_bank b;          /* layer, count, parts (shape, scheme, at, size), offsets, checksums */
    part_src *src;              /* [count][ZSE_EXPERT_PARTS] */
    char source[ZSE_EXPERT_PARTS][160]; /* the Hugging Face names, "{e}" for the expert */
} plan_bank;

/* one entry of the file, in forward order: a tensor, or (bank != NULL) an expert bank */
typedef struct {
    char *name;                 /* canonical; "blk.N.ffn_exps" for a bank */
    const zse_st_tensor *src;
    zse_qshape q;
    uint64_t offset, size, checksum;
    plan_bank *bank;
} plan_tensor;

typedef struct {
    plan_tensor *t;
    size_t n;
    plan_bank *banks;           /* [n_layers], used where b.count > 0 */
    int n_banks;
    uint64_t tok_offset, tok_size, tok_checksum;
    uint64_t data_offset, file_size;
    int major;                  /* the oldest format version that has every scheme used */
    bool calibrated;            /* the header carries "calibration" (minor version 1) */
    bool gguf_types;            /* a GGUF source's tensors kept their own types (no --quant) */
} plan;

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

/* forward order: embeddings, each layer's tensors in block order, final norm, lm_head */
static int cmp_plan(const void *a, const void *b)
{
    int64_t ka = zse_canonical_rank(((const plan_tensor *)a)->name);
    int64_t kb = zse_canonical_rank(((const plan_tensor *)b)->name);
    return ka < kb ? -1 : ka > kb;
}

static bool plan_has(const void *ctx, const char *name)
{
    const plan *p = ctx;
    for (size_t i = 0; i < p->n; i++)
        if (strcmp(p->t[i].name, name) == 0)
            return true;
    return false;
}

static bool matches_keep(const zse_convert_opts *o, const char *canon, const char *hf)
{
    for (int i = 0; i < o->n_keep_fp16; i++)
        if (zse_glob_match(o->keep_fp16[i], canon) || zse_glob_match(o->keep_fp16[i], hf))
            return true;
    return false;
}

/* the quantization policy: vectors stay f32; embeddings int8 under integer recipes (an
 * f16 table alone would make a 7B int4 file larger than llama.cpp's Q4_0); the lm_head
 * follows the recipe unless told; --keep-fp16 exempts tensors */
zse_scheme zse_convert_policy(const zse_convert_opts *o, const char *canon, const char *hf, int64_t rows)
{
    if (rows == 1)
        return ZSE_SCHEME_F32;
    /* the router stays f32 whatever the recipe: top-k picks among near-equal logits, and a
     * rounded router would pick other experts than the model does */
    const char *router = strstr(canon, ".ffn_gate_inp.weight");
    if (router && router[20] == '\0')
        return ZSE_SCHEME_F32;
    if (matches_keep(o, canon, hf))
        return ZSE_SCHEME_F16;
    bool integer_recipe = zse_scheme_is_quantized(o->scheme);
    if (strcmp(canon, "token_embd.weight") == 0) {
        if (o->embed_scheme >= 0)
            return (zse_scheme)o->embed_scheme;
        return integer_recipe ? ZSE_SCHEME_Q8 : o->scheme;
    }
    if (strcmp(canon, "output.weight") == 0 && o->lm_head_scheme >= 0)
        return (zse_scheme)o->lm_head_scheme;
    return o->scheme;
}

/* A GGUF tensor keeps its values where a zse scheme holds them exactly; without --quant
 * the others take the nearest scheme with as many bits (Q4_K → int4 g32, the 5- and
 * 6-bit types → int8g g32); with --quant, the recipe applies as for any source (and a
 * tensor whose exact scheme is the recipe's is still copied code for code). */
static void choose_gguf_scheme(const zse_convert_opts *o, const zse_st_tensor *s, const char *canon, zse_qshape *q)
{
    bool canon_override = (strcmp(canon, "token_embd.weight") == 0 && o->embed_scheme >= 0) ||
                          (strcmp(canon, "output.weight") == 0 && o->lm_head_scheme >= 0);
    int g;
    int exact = zse_ggml_exact_scheme(s->ggml_type, &g);
    if (q->rows == 1 || o->quant_given || canon_override || matches_keep(o, canon, s->name)) {
        q->scheme = zse_convert_policy(o, canon, s->name, q->rows);
        q->group_size = zse_scheme_is_grouped(q->scheme) ? o->group_size : 0;
        return;
    }
    if (exact >= 0) {
        q->scheme = (zse_scheme)exact;
        q->group_size = g;
    } else {
        q->scheme = s->ggml_type == 12 /* Q4_K */ ? ZSE_SCHEME_Q4 : ZSE_SCHEME_Q8G;
        q->group_size = 32;
    }
}

static uint64_t align_up(uint64_t x)
{
    return (x + ZSE_TENSOR_ALIGN - 1) / ZSE_TENSOR_ALIGN * ZSE_TENSOR_ALIGN;
}

/* bytes an entry takes in the file, from its offset to its last byte */
static uint64_t entry_span(const plan_tensor *t)
{
    if (!t->bank)
        return t->size;
    return (uint64_t)(t->bank->b.count - 1) * t->bank->b.stride + t->bank->b.size;
}

/* One routed expert's weight (per expert, or every expert in one fused tensor): checked
 * against the config and recorded in its layer's bank. */
static int add_expert_source(plan *p, const zse_config *c, const zse_st_tensor *s, const zse_hf_expert_ref *ref)
{
    if (!zse_config_layer_is_moe(c, ref->layer))
        return zse_fail("tensor '%s' is an expert of layer %d, which the config makes a dense layer "
                        "(decoder_sparse_step / mlp_only_layers)", s->name, ref->layer);
    if (s->dtype != ZSE_ST_F32 && s->dtype != ZSE_ST_F16 && s->dtype != ZSE_ST_BF16)
        return zse_fail("tensor '%s' is not F32/F16/BF16; pre-quantized checkpoints are not supported — convert "
                        "from the original weights", s->name);
    plan_bank *pb = &p->banks[ref->layer];
    const int E = c->n_experts;
    if (!pb->src) {
        pb->src = zse_calloc((size_t)E * ZSE_EXPERT_PARTS, sizeof *pb->src);
        if (!pb->src)
            return -1;
        pb->b.layer = ref->layer;
        pb->b.count = E;
    }
    const int64_t H = c->hidden_size, F = c->expert_ffn;
    const bool down = ref->part == ZSE_EXPERT_DOWN;
    const int64_t rows = down ? H : ref->part == ZSE_EXPERT_GATE_UP ? 2 * F : F, cols = down ? F : H;
    const bool shape_ok = ref->expert < 0 ? s->ndim == 3 && s->shape[0] == E && s->shape[1] == rows && s->shape[2] == cols
                                          : s->ndim == 2 && s->shape[0] == rows && s->shape[1] == cols;
    if (!shape_ok)
        return zse_fail("tensor '%s' does not have the shape the config gives it (%s%lld x %lld: hidden %d, experts' "
                        "intermediate size %d)", s->name, ref->expert < 0 ? "experts x " : "", (long long)rows,
                        (long long)cols, c->hidden_size, c->expert_ffn);
    if (ref->expert >= E)
        return zse_fail("tensor '%s' names expert %d but the config has %d", s->name, ref->expert, E);
    const int first_e = ref->expert < 0 ? 0 : ref->expert, last_e = ref->expert < 0 ? E - 1 : ref->expert;
    for (int e = first_e; e <= last_e; e++) {
        const size_t base = ref->expert < 0 ? (size_t)e * (size_t)(rows * cols) : 0;
        const int p0 = ref->part == ZSE_EXPERT_GATE_UP ? ZSE_EXPERT_GATE : ref->part;
        const int p1 = ref->part == ZSE_EXPERT_GATE_UP ? ZSE_EXPERT_UP : ref->part;
        for (int part = p0; part <= p1; part++) {
            part_src *ps = &pb->src[(size_t)e * ZSE_EXPERT_PARTS + (size_t)part];
            if (ps->src)
                return zse_fail("layer %d expert %d's %s comes from both '%s' and '%s'", ref->layer, e,
                                zse_expert_part_name(part), ps->src->name, s->name);
            ps->src = s;
            ps->first = base + (part == ZSE_EXPERT_UP && ref->part == ZSE_EXPERT_GATE_UP ? (size_t)(F * H) : 0);
        }
    }
    for (int part = ref->part == ZSE_EXPERT_GATE_UP ? 0 : ref->part;
         part <= (ref->part == ZSE_EXPERT_GATE_UP ? 1 : ref->part); part++) {
        char *src_name = pb->source[part];
        if (ref->expert < 0)
            snprintf(src_name, sizeof pb->source[part], "%s", s->name);
        else if (!src_name[0]) {
            /* the name with the expert's index replaced by {e} */
            char idx[24];
            snprintf(idx, sizeof idx, ".%d.", ref->expert);
            const char *at = strstr(s->name, ".experts.");
            at = at ? strstr(at + 8, idx) : NULL;
            if (at)
                snprintf(src_name, sizeof pb->source[part], "%.*s.{e}.%s", (int)(at - s->name), s->name,
                         at + strlen(idx));
            else
                snprintf(src_name, sizeof pb->source[part], "%s", s->name);
        }
    }
    return 0;
}

/* Every expert of a layer has its three parts; the bank's layout follows: parts at
 * multiples of 256 inside an expert, experts 4096 bytes apart (each its own page-aligned,
 * checksummed range); the bank becomes an entry of the plan. */
static int finish_bank(plan *p, const zse_config *c, const zse_convert_opts *o, plan_bank *pb)
{
    zse_expert_bank *b = &pb->b;
    for (int e = 0; e < b->count; e++)
        for (int part = 0; part < ZSE_EXPERT_PARTS; part++)
            if (!pb->src[(size_t)e * ZSE_EXPERT_PARTS + (size_t)part].src)
                return zse_fail("layer %d: expert %d has no %s weight (a %s checkpoint lists gate, up and down "
                                "for every expert)", b->layer, e, part == ZSE_EXPERT_GATE ? "gate" :
                                part == ZSE_EXPERT_UP ? "up" : "down", c->arch);
    uint64_t at = 0;
    for (int part = 0; part < ZSE_EXPERT_PARTS; part++) {
        zse_expert_part *ep = &b->part[part];
        const bool down = part == ZSE_EXPERT_DOWN;
        char canon[64];
        snprintf(canon, sizeof canon, "blk.%d.%s", b->layer, zse_expert_part_name(part));
        ep->q.rows = down ? c->hidden_size : c->expert_ffn;
        ep->q.cols = down ? c->expert_ffn : c->hidden_size;
        ep->q.scheme = zse_convert_policy(o, canon, pb->source[part], ep->q.rows);
        ep->q.group_size = zse_scheme_layout(ep->q.scheme) == ZSE_LAYOUT_Q4_G ? o->group_size : 0;
        ep->layout = zse_scheme_layout(ep->q.scheme);
        if (!(ep->size = zse_qshape_bytes(&ep->q))) {
            zse_error_prefix("layer %d %s", b->layer, zse_expert_part_name(part));
            return -1;
        }
        ep->at = at;
        at = (at + ep->size + ZSE_EXPERT_PART_ALIGN - 1) / ZSE_EXPERT_PART_ALIGN * ZSE_EXPERT_PART_ALIGN;
    }
    b->size = b->part[ZSE_EXPERT_DOWN].at + b->part[ZSE_EXPERT_DOWN].size;
    b->stride = align_up(b->size);
    b->checksums = zse_calloc((size_t)b->count, sizeof *b->checksums);
    if (!b->checksums)
        return -1;
    plan_tensor *t = &p->t[p->n++];
    char name[32];
    snprintf(name, sizeof name, "blk.%d.ffn_exps", b->layer);
    if (!(t->name = zse_strdup(name)))
        return -1;
    t->bank = pb;
    t->src = pb->src[0].src;
    p->n_banks++;
    return 0;
}

static int build_plan(plan *p, const zse_safetensors *st, const zse_config *c,
                      const zse_convert_opts *o)
{
    p->t = zse_calloc(st->n_tensors + (size_t)c->n_layers + 1, sizeof *p->t);
    p->banks = zse_calloc((size_t)c->n_layers, sizeof *p->banks);
    if (!p->t || !p->banks)
        return -1;
    p->major = 1;
    p->calibrated = o->hook && o->hook->header;
    p->gguf_types = st->canonical_names && !o->quant_given;
    for (size_t i = 0; i < st->n_tensors; i++) {
        const zse_st_tensor *s = &st->tensors[i];
        if (strstr(s->name, "rotary_emb.inv_freq"))
            continue; /* recomputed from the config; old checkpoints store it */
        if (c->tie_embeddings && strcmp(s->name, "lm_head.weight") == 0)
            continue;
        zse_hf_expert_ref ref;
        if (!st->canonical_names && zse_hf_expert_ref_of(c, s->name, &ref)) {
            if (add_expert_source(p, c, s, &ref) != 0) {
                zse_error_prefix("%s", st->shards[s->file_index].path);
                return -1;
            }
            continue;
        }
        int64_t cr, cc;
        char *canon = !st->canonical_names                          ? zse_hf_canonical_name(c, s->name)
                      : zse_canonical_shape(c, s->name, &cr, &cc) ? zse_strdup(s->name)
                                                                    : NULL;
        if (!canon) {
            if (st->canonical_names)
                zse_fail("tensor '%s' is not one the %s forward pass reads", s->name, c->arch);
            return -1;
        }
        plan_tensor *t = &p->t[p->n++];
        t->name = canon;
        t->src = s;
        if (s->ndim < 1 || s->ndim > 2)
            return zse_fail("tensor '%s' has %d dimensions; weights must be 1-D or 2-D", s->name, s->ndim);
        if (s->dtype != ZSE_ST_F32 && s->dtype != ZSE_ST_F16 && s->dtype != ZSE_ST_BF16 && s->dtype != ZSE_ST_GGML)
            return zse_fail("tensor '%s' is not F32/F16/BF16; pre-quantized checkpoints are not "
                            "supported — convert from the original weights", s->name);
        t->q.rows = s->ndim == 2 ? s->shape[0] : 1;
        t->q.cols = s->ndim == 2 ? s->shape[1] : s->shape[0];
        int64_t want_rows, want_cols;
        if (!zse_canonical_shape(c, canon, &want_rows, &want_cols))
            return zse_fail("tensor '%s' (%s) is not used by this %s model (its config does not read it in "
                            "that layer)", s->name, canon, c->arch);
        if (zse_check_tensor_shape(c, canon, t->q.rows, t->q.cols) != 0) {
            zse_error_prefix("%s ('%s')", st->shards[s->file_index].path, s->name);
            return -1;
        }
        if (s->dtype == ZSE_ST_GGML) {
            choose_gguf_scheme(o, s, canon, &t->q);
        } else {
            t->q.scheme = zse_convert_policy(o, canon, s->name, t->q.rows);
            t->q.group_size = zse_scheme_is_grouped(t->q.scheme) ? o->group_size : 0;
        }
        if (o->hook && o->hook->choose && o->hook->choose(o->hook->ctx, canon, &t->q) != 0) {
            zse_error_prefix("tensor '%s'", s->name);
            return -1;
        }
        if (t->q.scheme == ZSE_SCHEME_Q8G)
            p->major = 2;
        if (!(t->size = zse_qshape_bytes(&t->q))) {
            /* the reason is in the error buffer: prefix it (passing it back into zse_fail
             * would format the buffer into itself) */
            zse_error_prefix("tensor '%s'", s->name);
            return -1;
        }
    }
    for (int l = 0; l < c->n_layers; l++) {
        if (!zse_config_layer_is_moe(c, l))
            continue;
        if (!p->banks[l].src)
            return zse_fail("layer %d runs experts but the checkpoint has none for it", l);
        if (finish_bank(p, c, o, &p->banks[l]) != 0)
            return -1;
    }
    qsort(p->t, p->n, sizeof *p->t, cmp_plan);
    /* every tensor the forward pass reads must be there */
    return zse_check_required_tensors(c, plan_has, p);
}

static void plan_free(plan *p, int n_layers)
{
    for (size_t i = 0; i < p->n; i++)
        free(p->t[i].name);
    free(p->t);
    for (int l = 0; p->banks && l < n_layers; l++) {
        free(p->banks[l].src);
        free(p->banks[l].b.checksums);
    }
    free(p->banks);
}

static void hex64(uint64_t v, char out[17])
{
    snprintf(out, 17, "%016" PRIx64, v);
}

/* ---- provenance: SHA-256 of every input file, hashed in parallel ------------------ */

typedef struct {
    char **paths;
    int n;
    char (*sha)[65];
    atomic_int next;
    atomic_int failed;
    char error[ZSE_ERROR_MAX];  /* the first failure's message (errors are thread-local) */
    atomic_flag error_taken;
} hash_job;

static void hash_files(void *arg, int ith, int nth)
{
    (void)ith, (void)nth;
    hash_job *j = arg;
    while (!interrupted) {
        int i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n)
            break;
        if (zse_sha256_file(j->paths[i], j->sha[i]) != 0) {
            if (!atomic_flag_test_and_set(&j->error_taken))
                snprintf(j->error, sizeof j->error, "%s", zse_error_message());
            atomic_store(&j->failed, 1);
        }
    }
}

static int add_source_path(char ***paths, int *n, char *path)
{
    if (!path)
        return -1;
    if (!zse_file_exists(path)) {
        free(path);
        return 0;
    }
    char **p = zse_realloc(*paths, (size_t)(*n + 1) * sizeof *p);
    if (!p) {
        free(path);
        return -1;
    }
    *paths = p;
    (*paths)[(*n)++] = path;
    return 0;
}

/* every file the .zse was made from: shards (and their index), tokenizer, configs,
 * template — [{name, sha256, size}] */
static json_t *source_files(const char *dir, const zse_safetensors *st, const char *tok_path,
                            zse_pool *pool)
{
    static const char *const extra[] = {"model.safetensors.index.json", "config.json",
                                        "generation_config.json", "tokenizer_config.json",
                                        "chat_template.jinja"};
    char **paths = NULL;
    int n = 0, rc = 0;
    for (int i = 0; rc == 0 && i < st->n_shards; i++)
        rc = add_source_path(&paths, &n, zse_strdup(st->shards[i].path));
    /* a GGUF file (no tokenizer file, no directory) is its own only source */
    if (rc == 0 && tok_path)
        rc = add_source_path(&paths, &n, zse_strdup(tok_path));
    for (size_t i = 0; rc == 0 && dir && i < sizeof extra / sizeof extra[0]; i++)
        rc = add_source_path(&paths, &n, zse_path_join(dir, extra[i]));
    json_t *arr = NULL;
    hash_job job = {.paths = paths, .n = n, .error_taken = ATOMIC_FLAG_INIT};
    atomic_init(&job.next, 0);
    atomic_init(&job.failed, 0);
    if (rc == 0 && (job.sha = zse_calloc((size_t)(n ? n : 1), sizeof *job.sha))) {
        zse_pool_run(pool, hash_files, &job);
        if (interrupted)
            zse_fail("interrupted by a signal; nothing was written");
        else if (atomic_load(&job.failed))
            zse_fail("%s", job.error);
        else
            arr = json_array();
    }
    for (int i = 0; arr && i < n; i++) {
        struct stat sb;
        if (stat(paths[i], &sb) != 0) {
            zse_fail("cannot stat %s: %s", paths[i], strerror(errno));
            json_decref(arr);
            arr = NULL;
            break;
        }
        const char *base = strrchr(paths[i], '/');
        json_array_append_new(arr, json_pack("{s:s, s:s, s:I}", "name", base ? base + 1 : paths[i],
                                             "sha256", job.sha[i], "size", (json_int_t)sb.st_size));
    }
    for (int i = 0; i < n; i++)
        free(paths[i]);
    free(paths);
    free(job.sha);
    return arr;
}

/* the oldest version that has everything the file holds: major 2 for routed experts (a
 * 1.x reader would skip their banks) or an int8g tensor, else 1; minor 1 when the header
 * carries "calibration" (an optional key every reader skips), else 0 */
static int file_major(const plan *p)
{
    return p->n_banks > 0 || p->major >= 2 ? ZSE_FORMAT_MAJOR : ZSE_FORMAT_DENSE_MAJOR;
}

static int file_minor(const plan *p) { return p->calibrated ? ZSE_FORMAT_CALIB_MINOR : 0; }

static json_t *bank_json(const plan_tensor *t)
{
    const zse_expert_bank *b = &t->bank->b;
    char hx[17];
    json_t *parts = json_array(), *sums = json_array();
    for (int i = 0; i < ZSE_EXPERT_PARTS; i++) {
        const zse_expert_part *ep = &b->part[i];
        json_array_append_new(parts, json_pack("{s:s, s:s, s:s, s:i, s:[I,I], s:i, s:I, s:I}",
            "name", zse_expert_part_name(i), "source", t->bank->source[i], "scheme", zse_scheme_name(ep->q.scheme),
            "layout", (int)ep->layout, "shape", (json_int_t)ep->q.rows, (json_int_t)ep->q.cols, "group_size",
            ep->q.group_size, "at", (json_int_t)ep->at, "size", (json_int_t)ep->size));
    }
    for (int e = 0; e < b->count; e++) {
        hex64(b->checksums[e], hx);
        json_array_append_new(sums, json_string(hx));
    }
    return json_pack("{s:i, s:i, s:I, s:I, s:I, s:o, s:o}", "layer", b->layer, "count", b->count, "offset",
                     (json_int_t)t->offset, "stride", (json_int_t)b->stride, "size", (json_int_t)b->size, "parts",
                     parts, "checksums", sums);
}

static json_t *build_header(const zse_hf_dir *hf, const plan *p, const zse_convert_opts *o,
                            json_t *sources, const char *tok_type)
{
    json_t *h = json_object();
    json_object_set_new(h, "format", json_string("zse"));
    json_object_set_new(h, "version", json_pack("[i,i]", file_major(p), file_minor(p)));
    json_object_set_new(h, "config", zse_config_to_json(&hf->config));
    json_object_set(h, "tokenizer_config", hf->tokenizer_config ? hf->tokenizer_config : json_null());
    json_object_set_new(h, "tokenizer_type", json_string(tok_type));
    const char *tpl = o->chat_template ? o->chat_template : hf->chat_template;
    json_object_set_new(h, "chat_template", tpl ? json_string(tpl) : json_null());
    json_object_set(h, "generation", hf->generation_config ? hf->generation_config : json_null());
    json_t *keep = json_array();
    for (int i = 0; i < o->n_keep_fp16; i++)
        json_array_append_new(keep, json_string(o->keep_fp16[i]));
    /* the schemes the policy chose for the embedding table and the lm_head (null when
     * tied), so a reader sees the whole recipe without walking the tensors */
    json_t *embed = json_null(), *lm_head = json_null();
    for (size_t i = 0; i < p->n; i++) {
        if (strcmp(p->t[i].name, "token_embd.weight") == 0)
            embed = json_string(zse_scheme_name(p->t[i].q.scheme));
        else if (strcmp(p->t[i].name, "output.weight") == 0)
            lm_head = json_string(zse_scheme_name(p->t[i].q.scheme));
    }
    /* "gguf": each tensor kept its GGUF type, or the nearest scheme (the directory says) */
    json_object_set_new(h, "quant", json_pack("{s:s, s:i, s:o, s:o, s:o}", "scheme",
                                              p->gguf_types ? "gguf" : zse_scheme_name(o->scheme), "group_size",
                                              p->gguf_types ? 32 : o->group_size, "embed", embed, "lm_head",
                                              lm_head, "keep_fp16", keep));
    if (o->hook && o->hook->header) {
        json_t *calib = o->hook->header(o->hook->ctx);
        if (!calib) {
            json_decref(h);
            return NULL;
        }
        json_object_set_new(h, "calibration", calib);
    }
    char when[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
    json_object_set_new(h, "provenance", json_pack("{s:o, s:s, s:s}", "source_files", json_incref(sources),
                                                   "zse_version", ZSE_VERSION, "created", when));
    char hx[17];
    hex64(p->tok_checksum, hx);
    json_object_set_new(h, "blobs", json_pack("{s:{s:I, s:I, s:s}}", "tokenizer.json", "offset",
                                              (json_int_t)p->tok_offset, "size",
                                              (json_int_t)p->tok_size, "checksum", hx));
    json_t *arr = json_array(), *banks = json_array();
    for (size_t i = 0; i < p->n; i++) {
        const plan_tensor *t = &p->t[i];
        if (t->bank) {
            json_array_append_new(banks, bank_json(t));
            continue;
        }
        hex64(t->checksum, hx);
        json_array_append_new(arr, json_pack("{s:s, s:s, s:s, s:i, s:[I,I], s:i, s:I, s:I, s:s}",
            "name", t->name, "source", t->src->name, "scheme", zse_scheme_name(t->q.scheme),
            "layout", (int)zse_scheme_layout(t->q.scheme), "shape", (json_int_t)t->q.rows,
            (json_int_t)t->q.cols, "group_size", t->q.group_size, "offset", (json_int_t)t->offset,
            "size", (json_int_t)t->size, "checksum", hx));
    }
    json_object_set_new(h, "tensors", arr);
    if (p->n_banks > 0)
        json_object_set_new(h, "experts", banks);
    else
        json_decref(banks);
    return h;
}

static char *dump_header(const json_t *h, size_t *len)
{
    char *s = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!s)
        zse_fail("cannot serialize the header");
    else
        *len = strlen(s);
    return s;
}

/* Offsets depend on the header's length and the header holds the offsets; checksums are
 * fixed-width hex, so iterating until the data start stops moving converges. */
static int layout_offsets(plan *p, const zse_hf_dir *hf, const zse_convert_opts *o, json_t *sources,
                          const char *tok_type)
{
    p->data_offset = ZSE_TENSOR_ALIGN;
    for (int iter = 0; iter < 8; iter++) {
        uint64_t off = p->data_offset;
        p->tok_offset = off;
        off = align_up(off + p->tok_size);
        for (size_t i = 0; i < p->n; i++) {
            p->t[i].offset = off;
            if (p->t[i].bank)
                p->t[i].bank->b.offset = off;
            off = align_up(off + entry_span(&p->t[i]));
        }
        p->file_size = p->n ? p->t[p->n - 1].offset + entry_span(&p->t[p->n - 1]) : off;
        json_t *h = build_header(hf, p, o, sources, tok_type);
        size_t len;
        char *s = h ? dump_header(h, &len) : NULL;
        json_decref(h);
        if (!s)
            return -1;
        free(s);
        uint64_t want = align_up(64 + len);
        if (want == p->data_offset)
            return 0;
        p->data_offset = want;
    }
    return zse_fail("header layout did not converge");
}

static int write_at(int fd, const void *buf, size_t n, uint64_t off, const char *path)
{
    const uint8_t *b = buf;
    while (n) {
        ssize_t w = pwrite(fd, b, n, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return zse_fail("cannot write %s: %s", path, strerror(errno));
        }
        b += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

typedef struct {
    const zse_st_tensor *src;
    size_t first;               /* the source element of row 0 */
    const zse_qshape *q;
    uint8_t *packed;
    atomic_int failed;
} quant_job;

/* each thread converts and quantizes its share of rows, 64 rows at a time */
static void quantize_share(void *arg, int ith, int nth)
{
    quant_job *j = arg;
    const zse_qshape *q = j->q;
    int64_t per = (q->rows + nth - 1) / nth, r0 = per * ith, r1 = r0 + per;
    if (r1 > q->rows)
        r1 = q->rows;
    const int64_t chunk = 64;
    float *buf = malloc((size_t)(chunk * q->cols) * sizeof *buf);
    if (!buf) {
        atomic_store(&j->failed, 1);
        return;
    }
    const zse_st_tensor *src = j->src;
    int exact_group;
    /* a GGUF source is dense: its tensors are whole (first 0) */
    bool exact = src->dtype == ZSE_ST_GGML && j->first == 0 &&
                 zse_ggml_exact_scheme(src->ggml_type, &exact_group) == (int)q->scheme && exact_group == q->group_size;
    size_t src_row = exact ? zse_ggml_row_bytes(src->ggml_type, q->cols) : 0;
    for (int64_t r = r0; r < r1 && !interrupted; r += chunk) {
        int64_t n = r + chunk < r1 ? chunk : r1 - r;
        if (exact) { /* the GGUF's codes and scales as they are (rows back in HF order) */
            for (int64_t i = r; i < r + n; i++)
                zse_ggml_repack_row(src->ggml_type, src->data + (size_t)zse_gguf_source_row(src, i) * src_row, q,
                                    j->packed, i);
            continue;
        }
        if (zse_st_read_f32(j->src, j->first + (size_t)(r * q->cols), (size_t)(n * q->cols), buf) != 0) {
            atomic_store(&j->failed, 1);
            break;
        }
        zse_quantize_rows(q, buf, j->packed, r, r + n);
    }
    free(buf);
}

/* ---- the writer thread ----------------------------------------------------------------
 * One tensor is hashed and written while the pool quantizes the next, so the copy into
 * the page cache (a third of a conversion's time where quantizing is cheap) overlaps
 * work. At most two packed tensors exist at once: the one being written and the one being
 * filled. */
typedef struct {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int fd;
    const char *path;
    /* the pending job */
    bool has_job, quit;
    const void *data;
    size_t size;
    uint64_t offset;
    uint64_t *checksum;     /* where the data's checksum goes */
    void *to_free;          /* the packed buffer, freed once written; NULL for the mapping */
    /* the first failure */
    int rc;
    char error[ZSE_ERROR_MAX];
} writer;

static void *writer_main(void *arg)
{
    writer *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->has_job && !w->quit)
            pthread_cond_wait(&w->cv, &w->mu);
        if (!w->has_job)
            break;
        const void *data = w->data;
        size_t size = w->size;
        uint64_t offset = w->offset, *checksum = w->checksum;
        void *to_free = w->to_free;
        bool ok = w->rc == 0;
        pthread_mutex_unlock(&w->mu);
        int rc = 0;
        if (ok) {
            *checksum = zse_hash64(data, size);
            rc = write_at(w->fd, data, size, offset, w->path);
        }
        free(to_free);
        pthread_mutex_lock(&w->mu);
        if (rc != 0 && w->rc == 0) {
            w->rc = rc;
            snprintf(w->error, sizeof w->error, "%s", zse_error_message());
        }
        w->has_job = false;
        pthread_cond_broadcast(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

static int writer_start(writer *w, int fd, const char *path)
{
    memset(w, 0, sizeof *w);
    w->fd = fd;
    w->path = path;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    if (pthread_create(&w->thread, NULL, writer_main, w) != 0) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
        return zse_fail("cannot start the writer thread");
    }
    return 0;
}

/* waits for the writer to be idle; its error, if any, becomes this thread's */
static int writer_wait_idle(writer *w)
{
    pthread_mutex_lock(&w->mu);
    while (w->has_job)
        pthread_cond_wait(&w->cv, &w->mu);
    int rc = w->rc;
    pthread_mutex_unlock(&w->mu);
    return rc == 0 ? 0 : zse_fail("%s", w->error);
}

/* hands data over (the writer frees to_free); on an earlier write error frees it here */
static int writer_submit(writer *w, const void *data, size_t size, uint64_t offset,
                         uint64_t *checksum, void *to_free)
{
    if (writer_wait_idle(w) != 0) {
        free(to_free);
        return -1;
    }
    pthread_mutex_lock(&w->mu);
    w->data = data;
    w->size = size;
    w->offset = offset;
    w->checksum = checksum;
    w->to_free = to_free;
    w->has_job = true;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return 0;
}

/* waits for the last write and stops the thread */
static int writer_finish(writer *w)
{
    int rc = writer_wait_idle(w);
    pthread_mutex_lock(&w->mu);
    w->quit = true;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    return rc;
}

/* the stored bytes equal the source's: bf16 from BF16, f16 from F16, f32 from F32 (PLAIN
 * is row-major little-endian, like safetensors) */
static bool is_pass_through(const plan_tensor *t)
{
    zse_st_dtype d = t->src->dtype;
    if (d == ZSE_ST_GGML) {
        int g;
        return t->src->size == t->size && t->src->permuted_heads == 0 &&
               zse_ggml_exact_scheme(t->src->ggml_type, &g) == (int)t->q.scheme &&
               zse_scheme_layout(t->q.scheme) == ZSE_LAYOUT_PLAIN;
    }
    return t->src->size == t->size &&
           ((t->q.scheme == ZSE_SCHEME_BF16 && d == ZSE_ST_BF16) ||
            (t->q.scheme == ZSE_SCHEME_F16 && d == ZSE_ST_F16) ||
            (t->q.scheme == ZSE_SCHEME_F32 && d == ZSE_ST_F32));
}

/* quantizes one tensor on the pool and hands it to the writer */
static int write_tensor(writer *w, plan_tensor *t, zse_pool *pool, const zse_convert_hook *hook)
{
    if (hook && hook->produce) { /* a calibrated tensor, or one its scales changed */
        uint8_t *packed = zse_aligned_alloc(64, (size_t)t->size);
        if (!packed)
            return zse_fail("out of memory for tensor '%s' (%" PRIu64 " bytes)", t->name, t->size);
        memset(packed, 0, (size_t)t->size);
        int r = hook->produce(hook->ctx, t->name, &t->q, packed);
        if (r > 0)
            return writer_submit(w, packed, (size_t)t->size, t->offset, &t->checksum, packed);
        free(packed);
        if (r < 0)
            return -1;
    }
    if (is_pass_through(t)) /* straight from the mapping: no buffer, no conversion */
        return writer_submit(w, t->src->data, t->src->size, t->offset, &t->checksum, NULL);
    uint8_t *packed = zse_aligned_alloc(64, (size_t)t->size);
    if (!packed)
        return zse_fail("out of memory for tensor '%s' (%" PRIu64 " bytes)", t->name, t->size);
    memset(packed, 0, (size_t)t->size); /* the gaps between planes are part of the checksum */
    quant_job job = {.src = t->src, .first = 0, .q = &t->q, .packed = packed};
    atomic_init(&job.failed, 0);
    zse_pool_run(pool, quantize_share, &job);
    int rc = 0;
    if (atomic_load(&job.failed))
        rc = zse_fail("cannot convert tensor '%s' (out of memory or bad data)", t->src->name);
    else if (interrupted)
        rc = zse_fail("interrupted by a signal; nothing was written");
    if (rc != 0) {
        free(packed);
        return rc;
    }
    return writer_submit(w, packed, (size_t)t->size, t->offset, &t->checksum, packed);
}

/* the source bytes one expert's part is read from (the progress bar counts them) */
static uint64_t part_source_bytes(const part_src *ps, const zse_qshape *q)
{
    return (uint64_t)q->rows * (uint64_t)q->cols * (ps->src->dtype == ZSE_ST_F32 ? 4u : 2u);
}

static uint64_t bank_source_bytes(const plan_bank *pb)
{
    uint64_t n = 0;
    for (int e = 0; e < pb->b.count; e++)
        for (int part = 0; part < ZSE_EXPERT_PARTS; part++)
            n += part_source_bytes(&pb->src[(size_t)e * ZSE_EXPERT_PARTS + (size_t)part], &pb->b.part[part].q);
    return n;
}

/* Each expert of a bank: its three parts quantized into one buffer (zeros between them,
 * part of the checksum), handed to the writer, which checksums the expert's range as it
 * writes it. */
static int write_bank(writer *w, plan_tensor *t, zse_pool *pool, zse_progress *bar, uint64_t *done)
{
    plan_bank *pb = t->bank;
    zse_expert_bank *b = &pb->b;
    for (int e = 0; e < b->count; e++) {
        if (interrupted)
            return zse_fail("interrupted by a signal; nothing was written");
        uint8_t *buf = zse_aligned_alloc(64, (size_t)b->size);
        if (!buf)
            return zse_fail("out of memory for expert %d of layer %d (%" PRIu64 " bytes)", e, b->layer, b->size);
        memset(buf, 0, (size_t)b->size);
        for (int part = 0; part < ZSE_EXPERT_PARTS; part++) {
            const part_src *ps = &pb->src[(size_t)e * ZSE_EXPERT_PARTS + (size_t)part];
            quant_job job = {.src = ps->src, .first = ps->first, .q = &b->part[part].q,
                             .packed = buf + b->part[part].at};
            atomic_init(&job.failed, 0);
            zse_pool_run(pool, quantize_share, &job);
            if (atomic_load(&job.failed)) {
                free(buf);
                return zse_fail("cannot convert expert %d of layer %d from '%s' (out of memory or bad data)", e,
                                b->layer, ps->src->name);
            }
            *done += part_source_bytes(ps, &b->part[part].q);
        }
        zse_progress_update(bar, t->name, *done);
        if (writer_submit(w, buf, (size_t)b->size, t->offset + (uint64_t)e * b->stride, &b->checksums[e], buf) != 0)
            return -1;
    }
    return 0;
}

static void write_preamble(uint8_t pre[64], uint64_t hsize, uint64_t hhash, const plan *p)
{
    memset(pre, 0, 64);
    memcpy(pre, "ZSEMODEL", 8);
    uint64_t fields[6] = {0, 64, hsize, hhash, p->data_offset, p->file_size};
    pre[8] = (uint8_t)file_major(p);
    pre[10] = (uint8_t)file_minor(p);
    for (int f = 1; f < 6; f++)
        for (int i = 0; i < 8; i++)
            pre[8 + 8 * f + i] = (uint8_t)(fields[f] >> (8 * i));
    uint64_t ph = zse_hash64(pre, 56);
    for (int i = 0; i < 8; i++)
        pre[56 + i] = (uint8_t)(ph >> (8 * i));
}

static const char *tokenizer_type_of(const char *tok_json, size_t len)
{
    json_error_t err;
    json_t *j = json_loadb(tok_json, len, 0, &err);
    const char *model = json_string_value(json_object_get(json_object_get(j, "model"), "type"));
    const char *dec = json_string_value(json_object_get(json_object_get(j, "decoder"), "type"));
    json_t *decs = json_object_get(json_object_get(j, "decoder"), "decoders");
    bool bytelevel = dec && strcmp(dec, "ByteLevel") == 0;
    size_t i;
    json_t *d;
    json_array_foreach(decs, i, d) {
        const char *t = json_string_value(json_object_get(d, "type"));
        bytelevel = bytelevel || (t && strcmp(t, "ByteLevel") == 0);
    }
    const char *r = !model ? "unknown"
                    : strcmp(model, "BPE") == 0 ? (bytelevel ? "bpe-bytelevel" : "bpe-sentencepiece")
                    : strcmp(model, "Unigram") == 0 ? "unigram"
                    : strcmp(model, "WordPiece") == 0 ? "wordpiece" : "other";
    json_decref(j);
    return r;
}

/* ---- conversion ------------------------------------------------------------------- */

static int write_header_and_preamble(int fd, const char *out_path, const zse_hf_dir *hf, plan *p,
                                     const zse_convert_opts *o, json_t *sources,
                                     const char *tok_type)
{
    json_t *h = build_header(hf, p, o, sources, tok_type);
    size_t len = 0;
    char *s = h ? dump_header(h, &len) : NULL;
    json_decref(h);
    if (!s)
        return -1;
    int rc = 0;
    if (align_up(64 + len) != p->data_offset)
        rc = zse_fail("header size changed while writing");
    uint8_t pre[64];
    if (rc == 0) {
        write_preamble(pre, len, zse_hash64(s, len), p);
        rc = write_at(fd, s, len, 64, out_path);
    }
    if (rc == 0)
        rc = write_at(fd, pre, 64, 0, out_path);
    free(s);
    if (rc == 0 && ftruncate(fd, (off_t)p->file_size) != 0)
        rc = zse_fail("cannot size %s: %s", out_path, strerror(errno));
    if (rc == 0 && fsync(fd) != 0)
        rc = zse_fail("cannot flush %s to disk: %s", out_path, strerror(errno));
    return rc;
}

static int write_tensors(int fd, const char *out_path, plan *p, zse_pool *pool, const zse_convert_hook *hook)
{
    uint64_t total = 0, done = 0;
    for (size_t i = 0; i < p->n; i++)
        if (!p->t[i].bank)
            total += p->t[i].src->size;
    for (size_t i = 0; i < p->n; i++)
        if (p->t[i].bank)
            total += bank_source_bytes(p->t[i].bank);
    writer w;
    if (writer_start(&w, fd, out_path) != 0)
        return -1;
    zse_progress bar;
    zse_progress_begin(&bar, total);
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < p->n; i++) {
        zse_progress_update(&bar, p->t[i].name, done);
        if (p->t[i].bank) {
            rc = write_bank(&w, &p->t[i], pool, &bar, &done);
            continue;
        }
        rc = write_tensor(&w, &p->t[i], pool, hook);
        done += p->t[i].src->size;
    }
    /* always join the writer; when both failed, its message stands (it failed first) */
    int wrc = writer_finish(&w);
    if (rc == 0)
        rc = wrc;
    if (rc == 0)
        zse_progress_update(&bar, "done", done);
    zse_progress_end(&bar);
    return rc;
}

/* src_dir NULL: a GGUF source, whose file is the only input */
static int convert_into(int fd, const char *out_path, const char *src_dir, const zse_convert_opts *o,
                        zse_hf_dir *hf, zse_safetensors *st, plan *p, zse_pool *pool, const char *tok,
                        size_t tok_len)
{
    const char *tok_type = tokenizer_type_of(tok, tok_len);
    p->tok_size = tok_len;
    p->tok_checksum = zse_hash64(tok, tok_len);
    json_t *sources = source_files(src_dir, st, hf->tokenizer_json_path, pool);
    int rc = sources ? layout_offsets(p, hf, o, sources, tok_type) : -1;
    if (rc == 0)
        rc = write_at(fd, tok, tok_len, p->tok_offset, out_path);
    if (rc == 0)
        rc = write_tensors(fd, out_path, p, pool, o->hook);
    if (rc == 0)
        rc = write_header_and_preamble(fd, out_path, hf, p, o, sources, tok_type);
    json_decref(sources);
    return rc;
}

/* the model's metadata, tensors and tokenizer.json, from an HF directory or a GGUF file */
static int open_source(const char *src, const zse_convert_opts *o, zse_hf_dir *hf, zse_safetensors *st,
                       char **tok, size_t *tok_len)
{
    if (zse_is_gguf_file(src)) {
        if (!o->gguf_tokenizer)
            return zse_fail("%s: converting a GGUF file needs its vocabulary builder (zse_convert_opts.gguf_tokenizer)",
                            src);
        if (zse_gguf_open_source(src, hf, st) != 0)
            return -1;
        if (!(*tok = o->gguf_tokenizer(src, tok_len, &hf->tokenizer_config))) {
            zse_st_close(st);
            zse_hf_close(hf);
            return -1;
        }
        return 0;
    }
    if (zse_hf_open(hf, src) != 0)
        return -1;
    if (zse_st_open(st, src) != 0 || !(*tok = zse_read_file(hf->tokenizer_json_path, tok_len))) {
        zse_st_close(st);
        zse_hf_close(hf);
        return -1;
    }
    return 0;
}

int zse_convert(const char *src_dir, const char *out_path, const zse_convert_opts *o)
{
    /* fail before the work; zse_out_commit checks again without a race */
    if (!o->force && access(out_path, F_OK) == 0)
        return zse_fail("%s already exists; pass --force to overwrite it", out_path);
    zse_hf_dir hf;
    zse_safetensors st;
    char *tok = NULL;
    size_t tok_len = 0;
    if (open_source(src_dir, o, &hf, &st, &tok, &tok_len) != 0)
        return -1;
    plan p = {0};
    int rc = build_plan(&p, &st, &hf.config, o);
    if (rc != 0)
        zse_error_prefix("%s", src_dir);
    zse_pool *pool = NULL;
    if (rc == 0 && !(pool = zse_pool_create(o->threads > 0 ? o->threads : zse_physical_cores())))
        rc = -1;
    /* handlers first: a signal between creating the temp file and installing them would
     * kill the process with the named fallback file on disk */
    struct sigaction sa = {.sa_handler = on_signal}, old_int, old_term;
    sigemptyset(&sa.sa_mask);
    interrupted = 0;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    zse_out_file out = {.fd = -1};
    if (rc == 0)
        rc = zse_out_create(&out, out_path);
    if (rc == 0)
        rc = convert_into(out.fd, out_path, st.canonical_names ? NULL : src_dir, o, &hf, &st, &p, pool, tok,
                          tok_len);
    if (rc == 0 && interrupted)
        rc = zse_fail("interrupted by a signal; nothing was written");
    if (rc == 0)
        rc = zse_out_commit(&out, out_path, o->force);
    zse_out_close(&out, rc != 0);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    zse_pool_free(pool);
    plan_free(&p, hf.config.n_layers);
    free(tok);
    zse_st_close(&st);
    zse_hf_close(&hf);
    return rc;
}
