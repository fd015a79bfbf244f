/* The calibrated conversion, start to end (docs/QUANT.md):
 *
 *   1. the source converted to a float .zse (its own dtype where every weight shares one,
 *      else f32), loaded on the CPU and unlinked at once (the mapping keeps it alive, and
 *      nothing is left behind if the process dies);
 *   2. the calibration text tokenized into windows of ctx tokens;
 *   3. collect.c: Hessians and, per layer, AWQ scales and GPTQ candidates;
 *   4. sensitivity.c: with a target, the KL divergence of each tensor alone and the plan;
 *   5. zse_convert again, with the hook of write.c supplying what calibration changed. */
#include "calib/calib_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEFAULT_CTX 512
#define DEFAULT_MAX_TOKENS 16384
#define MIN_TOKENS 64

void calib_progress(const calib *k, const char *fmt, ...)
{
    if (k->opts.quiet)
        return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "calibrate: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " [%.1f s]\n", zse_now() - k->seconds);
    va_end(ap);
}

const zse_tensor_info *calib_tensor_info(const calib *k, const char *name)
{
    return zse_file_tensor(k->file, name);
}

int calib_read_f32(const calib *k, const char *name, float *out, int64_t rows, int64_t cols)
{
    const zse_tensor_info *t = calib_tensor_info(k, name);
    if (!t || t->q.rows != rows || t->q.cols != cols)
        return zse_fail("the float reference has no %lld x %lld tensor '%s'", (long long)rows, (long long)cols, name);
    for (int64_t r = 0; r < rows; r++)
        zse_dequantize_row(&t->q, t->data, r, out + r * cols);
    return 0;
}

size_t calib_windows(const calib *k, size_t tokens)
{
    return (tokens + (size_t)k->ctx - 1) / (size_t)k->ctx;
}

void calib_window(const calib *k, size_t w, const int32_t **ids, size_t *n)
{
    size_t start = w * (size_t)k->ctx;
    *ids = k->ids + start;
    *n = k->n_ids - start < (size_t)k->ctx ? k->n_ids - start : (size_t)k->ctx;
}

/* ---- 1. the float reference -------------------------------------------------------------- */

/* the source's own float type when every 2-D weight has it (the reference is then exact
 * and half the size of f32), else f32 */
static int reference_scheme(const char *src_dir, zse_scheme *out)
{
    zse_safetensors st;
    if (zse_st_open(&st, src_dir) != 0)
        return -1;
    int bf16 = 0, f16 = 0, other = 0;
    for (size_t i = 0; i < st.n_tensors; i++) {
        if (st.tensors[i].ndim != 2)
            continue;
        zse_st_dtype d = st.tensors[i].dtype;
        bf16 += d == ZSE_ST_BF16;
        f16 += d == ZSE_ST_F16;
        other += d != ZSE_ST_BF16 && d != ZSE_ST_F16;
    }
    zse_st_close(&st);
    *out = other || (bf16 && f16) ? ZSE_SCHEME_F32 : bf16 ? ZSE_SCHEME_BF16 : f16 ? ZSE_SCHEME_F16 : ZSE_SCHEME_F32;
    return 0;
}

static int load_reference(calib *k, const char *src_dir, const char *out_path)
{
    zse_scheme fs;
    if (reference_scheme(src_dir, &fs) != 0)
        return -1;
    zse_buf tmp = {0};
    if (zse_buf_printf(&tmp, "%s.calib-ref.%d.zse", out_path, (int)getpid()) != 0)
        return -1;
    zse_convert_opts fo = {.scheme = fs, .group_size = 128, .embed_scheme = (int)fs, .lm_head_scheme = (int)fs,
                           .force = true, .threads = k->conv.threads};
    calib_progress(k, "converting %s to a %s reference", src_dir, zse_scheme_name(fs));
    int rc = zse_convert(src_dir, tmp.data, &fo);
    if (rc == 0) {
        zse_load_params lp;
        zse_load_params_default(&lp);
        lp.device = "cpu";
        lp.threads = k->conv.threads;
        lp.ctx_size = k->opts.ctx > 0 ? k->opts.ctx : DEFAULT_CTX;
        lp.max_seqs = 1;
        lp.no_prefix_cache = true; /* the sensitivity pass runs the same windows with other weights */
        k->model = zse_model_load(tmp.data, &lp);
        rc = k->model ? 0 : -1;
        unlink(tmp.data); /* the mapping keeps the file's data while the model lives */
    }
    zse_buf_free(&tmp);
    if (rc != 0)
        return -1;
    k->file = k->model->file;
    k->c = zse_file_config(k->file);
    return 0;
}

/* ---- 2. tokens -------------------------------------------------------------------------- */

static int read_tokens(calib *k)
{
    const char *path = k->opts.text_path;
    size_t len;
    char *text = zse_read_file(path, &len);
    if (!text)
        return -1;
    int rc = 0;
    if (len == 0)
        rc = zse_fail("the calibration text %s is empty; give a text like what the model will see "
                      "(a few thousand tokens or more)", path);
    if (rc == 0)
        rc = zse_tokenize(k->model, text, len, 0, &k->ids, &k->n_ids);
    free(text);
    if (rc != 0)
        return -1;
    if (k->n_ids < MIN_TOKENS)
        return zse_fail("the calibration text %s holds %zu tokens; at least %d are needed (a few thousand "
                        "give better scales)", path, k->n_ids, MIN_TOKENS);
    size_t cap = k->opts.max_tokens > 0 ? (size_t)k->opts.max_tokens : DEFAULT_MAX_TOKENS;
    if (k->n_ids > cap)
        k->n_ids = cap;
    zse_model_info info;
    zse_model_get_info(k->model, &info);
    k->ctx = info.ctx_size;
    const char *slash = strrchr(path, '/');
    k->text_name = slash ? slash + 1 : path;
    return zse_sha256_file(path, k->text_sha);
}

/* ---- the tensors ------------------------------------------------------------------------- */

static const char *const linear_kinds[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                           "ffn_down"};
static const int linear_input[] = {IN_ATTN, IN_ATTN, IN_ATTN, IN_ATTN_OUT, IN_FFN, IN_FFN, IN_DOWN};
/* the tensors a dense block holds: a layer with anything else (experts, ...) is left to the
 * plain quantizer, since folding scales into its norms would change what those read */
static const char *const dense_kinds[] = {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                          "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_q_norm.weight",
                                          "attn_k_norm.weight", "attn_output.weight", "attn_output.bias",
                                          "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                                          "ffn_down.weight"};

static const char *source_name(const calib *k, const char *name)
{
    const json_t *arr = json_object_get(zse_file_header(k->file), "tensors");
    size_t i;
    json_t *e;
    json_array_foreach(arr, i, e) {
        const char *n = json_string_value(json_object_get(e, "name"));
        if (n && strcmp(n, name) == 0) {
            const char *s = json_string_value(json_object_get(e, "source"));
            return s ? s : name;
        }
    }
    return name;
}

static bool layer_is_dense(const calib *k, int l)
{
    char prefix[32];
    int np = snprintf(prefix, sizeof prefix, "blk.%d.", l);
    for (size_t i = 0; i < zse_file_n_tensors(k->file); i++) {
        const char *n = zse_file_tensor_at(k->file, i)->name;
        if (strncmp(n, prefix, (size_t)np) != 0)
            continue;
        bool known = false;
        for (size_t j = 0; j < sizeof dense_kinds / sizeof dense_kinds[0] && !known; j++)
            known = strcmp(n + np, dense_kinds[j]) == 0;
        if (!known)
            return false;
    }
    return true;
}

static int add_tensor(calib *k, const char *name, int input, int row_input)
{
    const zse_tensor_info *ti = calib_tensor_info(k, name);
    if (!ti)
        return 0;
    calib_tensor *t = &k->t[k->n_t++];
    snprintf(t->name, sizeof t->name, "%s", name);
    snprintf(t->source, sizeof t->source, "%s", source_name(k, name));
    t->rows = ti->q.rows;
    t->cols = ti->q.cols;
    t->input = input;
    t->row_input = row_input;
    t->policy = zse_convert_policy(&k->conv, t->name, t->source, t->rows);
    t->calibrated = t->policy == k->conv.scheme && zse_scheme_layout(t->policy) == ZSE_LAYOUT_Q4_G;
    return 0;
}

static int list_tensors(calib *k)
{
    const zse_config *c = k->c;
    k->n_in = c->n_layers * IN_PER_LAYER + 1;
    k->in = zse_calloc((size_t)k->n_in, sizeof *k->in);
    k->t = zse_calloc((size_t)c->n_layers * 7 + 1, sizeof *k->t);
    if (!k->in || !k->t)
        return -1;
    const int64_t qd = (int64_t)c->n_heads * c->head_dim;
    for (int l = 0; l < c->n_layers; l++) {
        calib_input *in = k->in + l * IN_PER_LAYER;
        bool dense = layer_is_dense(k, l);
        in[IN_ATTN].n = in[IN_FFN].n = c->hidden_size;
        in[IN_ATTN_OUT].n = qd;
        in[IN_DOWN].n = c->intermediate_size;
        in[IN_ATTN].foldable = in[IN_FFN].foldable = in[IN_DOWN].foldable = dense;
        /* attn_output's input channels are v's rows only when every query head has its own
         * KV head; under GQA a v row feeds several of them */
        in[IN_ATTN_OUT].foldable = dense && c->n_heads == c->n_kv_heads;
        for (int i = 0; i < 7; i++) {
            char name[64];
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, linear_kinds[i]);
            int row_input = -1;
            if (i == 2 && in[IN_ATTN_OUT].foldable)
                row_input = l * IN_PER_LAYER + IN_ATTN_OUT;
            if (i == 5)
                row_input = l * IN_PER_LAYER + IN_DOWN;
            if (add_tensor(k, name, l * IN_PER_LAYER + linear_input[i], row_input) != 0)
                return -1;
        }
    }
    calib_input *out = &k->in[k->n_in - 1];
    out->n = c->hidden_size;
    out->foldable = !c->tie_embeddings; /* a tied table is also the embedding: not scaled */
    if (!c->tie_embeddings && add_tensor(k, "output.weight", k->n_in - 1, -1) != 0)
        return -1;
    int n_cal = 0;
    uint64_t bytes = 0, elements = 0;
    for (int i = 0; i < k->n_t; i++) {
        calib_tensor *t = &k->t[i];
        if (!t->calibrated)
            continue;
        n_cal++;
        zse_qshape q = {k->conv.scheme, t->rows, t->cols, k->conv.group_size};
        bytes += zse_qshape_bytes(&q);
        elements += (uint64_t)(t->rows * t->cols);
    }
    if (n_cal == 0)
        return zse_fail("no tensor takes the %s recipe (every linear weight is kept by --keep-fp16 or an "
                        "override), so there is nothing to calibrate", zse_scheme_name(k->conv.scheme));
    /* a budget below the recipe itself is known now, before any pass */
    const double least = 8.0 * (double)bytes / (double)elements;
    if (k->opts.target_bpw > 0 && k->opts.target_bpw < least)
        return zse_fail("--target-bpw %g is below what the %s g%d recipe itself takes (%.3f bits per weight over "
                        "these tensors); raise it or use a larger --group-size", k->opts.target_bpw,
                        zse_scheme_name(k->conv.scheme), k->conv.group_size, least);
    return 0;
}

/* ---- the candidate store: an anonymous file beside OUT ------------------------------------ */

static int store_open(calib *k, const char *out_path)
{
    const char *slash = strrchr(out_path, '/');
    char *dir = slash ? zse_strndup(out_path, (size_t)(slash - out_path + (slash == out_path))) : zse_strdup(".");
    if (!dir)
        return -1;
    k->store_fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (k->store_fd < 0) { /* no O_TMPFILE here: a named file, unlinked at once */
        zse_buf p = {0};
        if (zse_buf_printf(&p, "%s/.zse-calib-XXXXXX", dir) == 0) {
            k->store_fd = mkstemp(p.data);
            if (k->store_fd >= 0)
                unlink(p.data);
        }
        zse_buf_free(&p);
    }
    int rc = k->store_fd >= 0 ? 0 : zse_fail("cannot create a scratch file in %s: %s", dir, strerror(errno));
    free(dir);
    return rc;
}

int calib_store_read(const calib *k, const calib_option *o, void *packed)
{
    uint8_t *b = packed;
    size_t left = (size_t)o->bytes;
    off_t at = (off_t)o->stored;
    while (left) {
        ssize_t r = pread(k->store_fd, b, left, at);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return zse_fail("cannot read back a calibrated tensor: %s", r < 0 ? strerror(errno) : "short file");
        b += r;
        left -= (size_t)r;
        at += r;
    }
    return 0;
}

/* ---- the whole conversion --------------------------------------------------------------- */

static int check_opts(const zse_convert_opts *o, const zse_calib_opts *c)
{
    if (!c->text_path)
        return zse_fail("--calibrate needs a text file");
    struct stat sb;
    if (stat(c->text_path, &sb) != 0)
        return zse_fail("cannot read the calibration text %s: %s", c->text_path, strerror(errno));
    if (!S_ISREG(sb.st_mode))
        return zse_fail("the calibration text %s is not a regular file", c->text_path);
    if (sb.st_size == 0)
        return zse_fail("the calibration text %s is empty; give a text like what the model will see "
                        "(a few thousand tokens or more)", c->text_path);
    if (zse_scheme_layout(o->scheme) != ZSE_LAYOUT_Q4_G)
        return zse_fail("--calibrate quantizes to 4 bits: use --quant int4, int4s or nf4 (not %s)",
                        zse_scheme_name(o->scheme));
    if (c->no_awq && c->no_gptq)
        return zse_fail("calibration with neither AWQ nor GPTQ is plain round to nearest: convert without --calibrate");
    if (c->write_float && c->target_bpw != 0)
        return zse_fail("a float calibrated file has no bit budget to plan");
    if (c->target_bpw != 0 && !(c->target_bpw >= 2 && c->target_bpw <= 16))
        return zse_fail("--target-bpw %g is out of range: bits per weight of the quantized tensors, between "
                        "the 4-bit recipe's (about 4.1-5) and 16", c->target_bpw);
    if (c->ctx < 0 || c->max_tokens < 0)
        return zse_fail("calibration window and token counts must be positive");
    return 0;
}

/* what calibration runs on: a Hugging Face directory of a dense model. A GGUF's weights
 * are usually quantized already (calibrating from them would fit the new codes to the old
 * codes' error), and a mixture-of-experts model's experts are not seen by the taps (each runs on
 * the rows routed to it; docs/QUANT.md §What it does not do). */
static int check_source(const char *src)
{
    if (zse_is_gguf_file(src))
        return zse_fail("%s is a GGUF file, and --calibrate takes a Hugging Face directory (a GGUF's weights are "
                        "usually quantized already: calibrating them would fit the new codes to the old codes' "
                        "error); calibrate the original Hugging Face model, or convert the GGUF without "
                        "--calibrate", src);
    zse_hf_dir hf;
    if (zse_hf_open(&hf, src) != 0)
        return -1;
    const bool moe = hf.config.n_experts > 0;
    char arch[sizeof hf.config.arch];
    snprintf(arch, sizeof arch, "%s", hf.config.arch);
    zse_hf_close(&hf);
    if (moe)
        return zse_fail("%s is a mixture-of-experts model (%s): --calibrate supports dense models only (its "
                        "taps do not see the experts' inputs); convert it without --calibrate", src, arch);
    return 0;
}

static void calib_free(calib *k)
{
    for (int i = 0; k->in && i < k->n_in; i++) {
        free(k->in[i].H);
        free(k->in[i].s);
    }
    free(k->in);
    free(k->t);
    free(k->ids);
    if (k->store_fd >= 0)
        close(k->store_fd);
    zse_pool_free(k->pool);
    zse_model_free(k->model);
}

int zse_convert_calibrated(const char *src_dir, const char *out_path, const zse_convert_opts *o,
                           const zse_calib_opts *c)
{
    if (check_opts(o, c) != 0 || check_source(src_dir) != 0)
        return -1;
    if (!o->force && access(out_path, F_OK) == 0)
        return zse_fail("%s already exists; pass --force to overwrite it", out_path);
    calib k = {.opts = *c, .conv = *o, .store_fd = -1, .seconds = zse_now()};
    int rc = 0;
    if (!(k.pool = zse_pool_create(o->threads > 0 ? o->threads : zse_physical_cores())))
        rc = -1;
    if (rc == 0)
        rc = load_reference(&k, src_dir, out_path);
    if (rc == 0)
        rc = read_tokens(&k);
    if (rc == 0)
        rc = list_tensors(&k);
    if (rc == 0)
        rc = store_open(&k, out_path);
    if (rc == 0) {
        calib_progress(&k, "%zu tokens of %s in %zu windows of %d", k.n_ids, k.opts.text_path,
                       calib_windows(&k, k.n_ids), k.ctx);
        rc = calib_collect(&k);
    }
    if (rc == 0)
        rc = calib_plan(&k);
    if (rc == 0) {
        zse_convert_hook hook;
        calib_hook(&k, &hook);
        zse_convert_opts fo = k.conv;
        fo.hook = &hook;
        calib_progress(&k, "writing %s", out_path);
        rc = zse_convert(src_dir, out_path, &fo);
    }
    if (rc != 0)
        zse_error_prefix("calibration");
    calib_free(&k);
    return rc;
}
