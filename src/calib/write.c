/* The convert hook of a calibrated conversion: each planned tensor's scheme and group, the
 * bytes of every tensor calibration changed, and the "calibration" header object
 * (docs/FORMAT.md §Calibration).
 *
 * Folding the AWQ scales: a weight's columns are multiplied by its input's scales s, and
 * whatever produced that input divides by them — the RMSNorm weight before q/k/v, gate/up
 * and the lm_head; v's rows (and bias) before attn_output; up's rows before ffn_down (the
 * SiLU of the gate multiplies up's output, so a row scale passes through). In f32 the model
 * computes the same function; only where the rounding falls changes. */
#include "calib/calib_internal.h"

#include <math.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

static calib_tensor *find_tensor(calib *k, const char *name)
{
    for (int i = 0; i < k->n_t; i++)
        if (strcmp(k->t[i].name, name) == 0)
            return &k->t[i];
    return NULL;
}

static int choose(void *ctx, const char *name, zse_qshape *q)
{
    calib *k = ctx;
    calib_tensor *t = find_tensor(k, name);
    if (!t || !t->calibrated)
        return 0;
    if (q->rows != t->rows || q->cols != t->cols || q->scheme != t->policy)
        return zse_fail("the source changed during calibration (%lld x %lld %s, was %lld x %lld %s)",
                        (long long)q->rows, (long long)q->cols, zse_scheme_name(q->scheme), (long long)t->rows,
                        (long long)t->cols, zse_scheme_name(t->policy));
    q->scheme = k->opts.write_float ? ZSE_SCHEME_F32 : t->opt[t->chosen].scheme;
    q->group_size = k->opts.write_float ? 0 : t->opt[t->chosen].group_size;
    return 0;
}

/* the vector a norm or bias becomes: divided by the scales of the input it produces */
static const float *vector_scales(const calib *k, const char *name)
{
    int l, end = 0;
    char what[32];
    if (strcmp(name, "output_norm.weight") == 0)
        return k->in[k->n_in - 1].s;
    if (sscanf(name, "blk.%d.%31[a-z_.]%n", &l, what, &end) != 2 || name[end] != '\0' || l < 0 ||
        l >= k->c->n_layers)
        return NULL;
    const calib_input *in = k->in + l * IN_PER_LAYER;
    if (strcmp(what, "attn_norm.weight") == 0)
        return in[IN_ATTN].s;
    if (strcmp(what, "ffn_norm.weight") == 0)
        return in[IN_FFN].s;
    if (strcmp(what, "attn_v.bias") == 0)
        return in[IN_ATTN_OUT].s;
    return NULL;
}

static int produce_vector(const calib *k, const char *name, const float *s, const zse_qshape *q, void *packed)
{
    float *v = zse_malloc((size_t)q->cols * sizeof *v);
    if (!v || calib_read_f32(k, name, v, 1, q->cols) != 0) {
        free(v);
        return -1;
    }
    for (int64_t c = 0; c < q->cols; c++)
        v[c] /= s[c];
    zse_quantize_rows(q, v, packed, 0, 1);
    free(v);
    return 1;
}

static int produce(void *ctx, const char *name, const zse_qshape *q, void *packed)
{
    calib *k = ctx;
    calib_tensor *t = find_tensor(k, name);
    if (!t) {
        const float *s = vector_scales(k, name);
        return s && q->rows == 1 ? produce_vector(k, name, s, q, packed) : 0;
    }
    if (t->calibrated && !k->opts.write_float) {
        const calib_option *o = &t->opt[t->chosen];
        if (o->stored >= 0)
            return calib_store_read(k, o, packed) == 0 ? 1 : -1;
    } else if (!k->in[t->input].s && !(t->row_input >= 0 && k->in[t->row_input].s)) {
        return 0; /* untouched: the writer converts the source as usual */
    }
    /* int8 / f16 options, and weights kept out of the recipe whose input was scaled */
    float *w = zse_malloc((size_t)(t->rows * t->cols) * sizeof *w);
    int rc = w ? calib_transformed(k, t, w) : -1;
    if (rc == 0)
        zse_quantize_rows(q, w, packed, 0, t->rows);
    free(w);
    return rc == 0 ? 1 : -1;
}

static const char *method_name(const calib *k)
{
    if (k->opts.write_float)
        return "awq (folded scales, f32 weights)";
    return k->opts.no_gptq ? "awq" : k->opts.no_awq ? "gptq" : "awq+gptq";
}

static json_t *header(void *ctx)
{
    calib *k = ctx;
    json_t *tensors = json_array();
    for (int i = 0; i < k->n_t; i++) {
        const calib_tensor *t = &k->t[i];
        if (!t->calibrated)
            continue;
        const calib_option *o = &t->opt[t->chosen];
        const bool f = k->opts.write_float;
        const double bits = f ? 32.0 : 8.0 * (double)o->bytes / (double)(t->rows * t->cols);
        json_t *e = json_pack("{s:s, s:s, s:i, s:f, s:f, s:f}", "name", t->name, "scheme",
                              zse_scheme_name(f ? ZSE_SCHEME_F32 : o->scheme), "group_size", f ? 0 : o->group_size,
                              "bits", round(bits * 1e4) / 1e4, "awq_alpha",
                              k->in[t->input].alpha, "error_vs_rtn",
                              t->error_rtn > 0 ? round(o->error / t->error_rtn * 1e4) / 1e4 : 0.0);
        if (k->sens_tokens)
            json_object_set_new(e, "kl", json_real(t->kl));
        json_array_append_new(tensors, e);
    }
    json_t *h = json_pack("{s:s, s:s, s:s, s:I, s:i, s:f, s:o, s:f, s:I, s:o}", "method", method_name(k), "text",
                          k->text_name, "text_sha256", k->text_sha, "tokens", (json_int_t)k->n_ids, "ctx", k->ctx,
                          "gptq_damp", k->opts.no_gptq ? 0.0 : 0.01,
                          "target_bpw", k->opts.target_bpw > 0 ? json_real(k->opts.target_bpw) : json_null(),
                          "bpw", round(calib_bpw(k) * 1e4) / 1e4, "sensitivity_tokens", (json_int_t)k->sens_tokens,
                          "tensors", tensors);
    if (!h)
        zse_fail("cannot build the calibration header");
    return h;
}

void calib_hook(calib *k, zse_convert_hook *h)
{
    memset(h, 0, sizeof *h);
    h->ctx = k;
    h->choose = choose;
    h->produce = produce;
    h->header = header;
}
