/* Hessians from the model's taps, then per layer: AWQ scales and the quantized candidates
 * of every calibrated tensor (docs/QUANT.md §Collecting).
 *
 * A layer's Hessians take 4 (hidden^2 * 2 + (heads*head_dim)^2 + ffn^2) bytes — 1.6 GB for
 * a 7B layer — so layers are taken in groups that fit a quarter of the machine's memory,
 * one forward pass over the calibration windows per group. Every Hessian comes from the
 * float model's activations (not from earlier layers already quantized): the passes stay
 * independent of each other and of the plan. */
#include "calib/calib_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- the taps -------------------------------------------------------------------------- */

static int input_of(const calib *k, int layer, zse_tap_point p)
{
    if (p == ZSE_TAP_OUTPUT)
        return k->n_in - 1;
    static const int kind[] = {[ZSE_TAP_ATTN_IN] = IN_ATTN, [ZSE_TAP_ATTN_OUT] = IN_ATTN_OUT,
                               [ZSE_TAP_FFN_IN] = IN_FFN, [ZSE_TAP_FFN_DOWN] = IN_DOWN};
    return layer * IN_PER_LAYER + kind[p];
}

static void on_tap(void *ctx, int layer, zse_tap_point p, const float *x, int64_t rows, int64_t cols)
{
    calib *k = ctx;
    if (layer >= k->c->n_layers || (layer < 0 && p != ZSE_TAP_OUTPUT))
        return;
    calib_input *in = &k->in[input_of(k, layer, p)];
    if (!in->H || cols != in->n)
        return; /* not in this pass */
    zse_hessian_accumulate(in->H, in->n, x, rows, cols, k->pool);
    in->tokens += (uint64_t)rows;
}

/* one forward pass over every calibration window; logits only when the lm_head's input is
 * wanted (its tap sees the rows that get logits) */
static int run_windows(calib *k, bool all_logits)
{
    float *logits = NULL;
    if (all_logits && !(logits = zse_malloc((size_t)k->ctx * (size_t)k->c->vocab_size * sizeof *logits)))
        return -1;
    int rc = zse_llm_set_tap(k->model->llm, on_tap, k);
    for (size_t w = 0; rc == 0 && w < calib_windows(k, k->n_ids); w++) {
        const int32_t *ids;
        size_t n;
        calib_window(k, w, &ids, &n);
        zse_seq *q = zse_seq_new(k->model, NULL);
        rc = q ? 0 : -1;
        if (rc == 0)
            rc = all_logits ? zse_seq_feed_logits(q, ids, n, logits) : zse_seq_feed(q, ids, n);
        zse_seq_free(q);
    }
    zse_llm_set_tap(k->model->llm, NULL, NULL);
    free(logits);
    return rc;
}

/* ---- weights as they will be stored ---------------------------------------------------------- */

static const float *row_scales(const calib *k, const calib_tensor *t)
{
    return t->row_input >= 0 ? k->in[t->row_input].s : NULL;
}

int calib_transformed(const calib *k, const calib_tensor *t, float *out)
{
    if (calib_read_f32(k, t->name, out, t->rows, t->cols) != 0)
        return -1;
    const float *s = k->in[t->input].s, *r = row_scales(k, t);
    for (int64_t i = 0; i < t->rows; i++)
        for (int64_t c = 0; c < t->cols; c++) {
            float *w = &out[i * t->cols + c];
            if (s)
                *w *= s[c];
            if (r)
                *w /= r[i];
        }
    return 0;
}

static zse_qshape option_shape(const calib_tensor *t, const calib_option *o)
{
    zse_qshape q = {o->scheme, t->rows, t->cols, o->group_size};
    return q;
}

/* the option's packed bytes: read back from the store, or quantized now (round to nearest) */
static int option_packed(const calib *k, const calib_tensor *t, const calib_option *o, uint8_t **out)
{
    zse_qshape q = option_shape(t, o);
    uint8_t *packed = zse_aligned_alloc(64, (size_t)o->bytes);
    float *w = NULL;
    int rc = packed ? 0 : -1;
    if (rc == 0)
        memset(packed, 0, (size_t)o->bytes);
    if (rc == 0 && o->stored >= 0) {
        rc = calib_store_read(k, o, packed);
    } else if (rc == 0) {
        w = zse_malloc((size_t)(t->rows * t->cols) * sizeof *w);
        rc = w ? calib_transformed(k, t, w) : -1;
        if (rc == 0)
            zse_quantize_rows(&q, w, packed, 0, t->rows);
    }
    free(w);
    if (rc != 0) {
        free(packed);
        return -1;
    }
    *out = packed;
    return 0;
}

int calib_effective(const calib *k, const calib_tensor *t, int o, float *out)
{
    uint8_t *packed;
    if (option_packed(k, t, &t->opt[o], &packed) != 0)
        return -1;
    zse_qshape q = option_shape(t, &t->opt[o]);
    zse_dequantize_all(&q, packed, out);
    free(packed);
    const float *s = k->in[t->input].s, *r = row_scales(k, t);
    for (int64_t i = 0; i < t->rows; i++)
        for (int64_t c = 0; c < t->cols; c++) {
            float *w = &out[i * t->cols + c];
            if (s)
                *w /= s[c];
            if (r)
                *w *= r[i];
        }
    return 0;
}

/* ---- per layer ------------------------------------------------------------------------------ */

static int store_append(calib *k, const void *data, uint64_t n, int64_t *at)
{
    const uint8_t *b = data;
    *at = (int64_t)k->store_size;
    for (uint64_t done = 0; done < n;) {
        ssize_t w = pwrite(k->store_fd, b + done, (size_t)(n - done), (off_t)(k->store_size + done));
        if (w <= 0)
            return zse_fail("cannot write a calibrated tensor to the scratch file (disk full?)");
        done += (uint64_t)w;
    }
    k->store_size += n;
    return 0;
}

/* the AWQ search over the calibrated weights that read this input; leaves in->s NULL when
 * plain scales (alpha 0) do best */
static int search_scales(calib *k, int idx)
{
    calib_input *in = &k->in[idx];
    const float *ws[8];
    int64_t rows[8];
    float *owned[8];
    int n = 0, rc = 0;
    for (int i = 0; i < k->n_t && rc == 0; i++) {
        calib_tensor *t = &k->t[i];
        if (t->input != idx || !t->calibrated || n == 8)
            continue;
        owned[n] = zse_malloc((size_t)(t->rows * t->cols) * sizeof(float));
        rc = owned[n] ? calib_read_f32(k, t->name, owned[n], t->rows, t->cols) : -1;
        ws[n] = owned[n];
        rows[n] = t->rows;
        n++;
    }
    float *s = NULL;
    if (rc == 0 && n > 0) {
        zse_qshape q = {k->conv.scheme, 0, in->n, k->conv.group_size};
        zse_awq_result res;
        rc = (s = zse_malloc((size_t)in->n * sizeof *s)) ? zse_awq_search(&q, ws, rows, n, in->H, s, &res, k->pool) : -1;
        if (rc == 0 && res.alpha > 0) {
            in->s = s;
            in->alpha = res.alpha;
            s = NULL;
        }
    }
    free(s);
    for (int i = 0; i < n; i++)
        free(owned[i]);
    return rc;
}

/* H' = diag(1/s) H diag(1/s): the Hessian of the input divided by s */
static void scale_hessian(calib_input *in)
{
    if (!in->s)
        return;
    for (int64_t i = 0; i < in->n; i++)
        for (int64_t c = 0; c < in->n; c++)
            in->H[i * in->n + c] /= in->s[i] * in->s[c];
}

/* the output error of storing `deq` for the transformed weight w, in the float model's
 * terms: rows multiplied back by what divided them (the scaled input is already in H); w
 * is left as it is (the next option starts from it), deq is scratch */
static double option_error(const calib *k, const calib_tensor *t, const float *w, float *deq)
{
    const float *r = row_scales(k, t);
    const int64_t step = t->rows > 512 ? t->rows / 512 : 1;
    const size_t n = (size_t)(t->rows * t->cols);
    float *wr = NULL;
    if (r) {
        if (!(wr = zse_malloc(n * sizeof *wr)))
            return NAN;
        for (int64_t i = 0; i < t->rows; i++)
            for (int64_t c = 0; c < t->cols; c++) {
                wr[i * t->cols + c] = w[i * t->cols + c] * r[i];
                deq[i * t->cols + c] *= r[i];
            }
    }
    double e = zse_weighted_error(wr ? wr : w, deq, t->rows, t->cols, k->in[t->input].H, step, k->pool);
    free(wr);
    return e;
}

static void add_option(calib_tensor *t, zse_scheme s, int g)
{
    calib_option *o = &t->opt[t->n_opts++];
    memset(o, 0, sizeof *o);
    o->scheme = s;
    o->group_size = zse_scheme_layout(s) == ZSE_LAYOUT_Q4_G ? g : 0;
    zse_qshape q = {s, t->rows, t->cols, o->group_size};
    o->bytes = zse_qshape_bytes(&q);
    o->stored = -1;
}

/* the options a tensor may be stored in: the recipe first; with a target, the recipe at
 * every smaller group, int8 and f16 */
static void list_options(const calib *k, calib_tensor *t)
{
    t->n_opts = 0;
    add_option(t, k->conv.scheme, k->conv.group_size);
    if (k->opts.target_bpw <= 0)
        return;
    for (int g = k->conv.group_size / 2; g >= 32; g /= 2)
        add_option(t, k->conv.scheme, g);
    add_option(t, ZSE_SCHEME_Q8, 0);
    add_option(t, ZSE_SCHEME_F16, 0);
}

/* the output error the plain writer would leave (round to nearest, no scales), measured
 * like the options' (with the input's scales on both sides, since H is scaled) */
static int rtn_error(const calib *k, calib_tensor *t, float *w, float *deq)
{
    zse_qshape q = {k->conv.scheme, t->rows, t->cols, k->conv.group_size};
    if (calib_read_f32(k, t->name, w, t->rows, t->cols) != 0 || zse_fake_quantize(&q, w, deq) != 0)
        return -1;
    const float *s = k->in[t->input].s;
    if (s)
        for (int64_t i = 0; i < t->rows; i++)
            for (int64_t c = 0; c < t->cols; c++) {
                w[i * t->cols + c] *= s[c];
                deq[i * t->cols + c] *= s[c];
            }
    const int64_t step = t->rows > 512 ? t->rows / 512 : 1;
    t->error_rtn = zse_weighted_error(w, deq, t->rows, t->cols, k->in[t->input].H, step, k->pool);
    return 0;
}

/* every option of one tensor: 4-bit ones by GPTQ (or round to nearest), stored; the rest
 * round to nearest when written; the output error of each */
static int quantize_tensor(calib *k, calib_tensor *t, const zse_gptq_factor *f)
{
    list_options(k, t);
    const size_t n = (size_t)(t->rows * t->cols);
    float *w = zse_malloc(n * sizeof *w), *deq = zse_malloc(n * sizeof *deq);
    int rc = w && deq ? rtn_error(k, t, w, deq) : -1;
    if (rc == 0)
        rc = calib_transformed(k, t, w);
    for (int i = 0; rc == 0 && i < t->n_opts; i++) {
        calib_option *o = &t->opt[i];
        zse_qshape q = option_shape(t, o);
        uint8_t *packed = zse_aligned_alloc(64, (size_t)o->bytes);
        if (!packed) {
            rc = -1;
            break;
        }
        memset(packed, 0, (size_t)o->bytes);
        if (zse_scheme_layout(o->scheme) == ZSE_LAYOUT_Q4_G && f)
            rc = zse_gptq(&q, w, f, packed, k->pool);
        else
            zse_quantize_rows(&q, w, packed, 0, t->rows);
        if (rc == 0 && zse_scheme_layout(o->scheme) == ZSE_LAYOUT_Q4_G)
            rc = store_append(k, packed, o->bytes, &o->stored);
        if (rc == 0) {
            zse_dequantize_all(&q, packed, deq);
            o->error = option_error(k, t, w, deq);
            if (isnan(o->error))
                rc = -1;
        }
        free(packed);
    }
    if (rc != 0)
        zse_error_prefix("%s", t->name);
    free(w);
    free(deq);
    return rc;
}

/* AWQ scales for every input of the layer (before any GPTQ: up's rows take the down
 * projection's scales), then the candidates of its tensors */
static int process_inputs(calib *k, int first, int count)
{
    int rc = 0;
    for (int i = first; rc == 0 && i < first + count; i++) {
        calib_input *in = &k->in[i];
        if (!in->H)
            continue;
        zse_hessian_mirror(in->H, in->n);
        if (in->tokens > 0 && in->foldable && !k->opts.no_awq)
            rc = search_scales(k, i);
        scale_hessian(in);
    }
    /* input by input: one GPTQ factor serves every weight that reads it, at every group */
    for (int i = first; rc == 0 && i < first + count; i++) {
        zse_gptq_factor *f = NULL;
        for (int j = 0; rc == 0 && j < k->n_t; j++) {
            calib_tensor *t = &k->t[j];
            if (t->input != i || !t->calibrated)
                continue;
            if (k->in[i].tokens == 0) { /* its input never ran (a layer kind the taps do not see) */
                t->calibrated = false;
                continue;
            }
            if (!f && !k->opts.no_gptq && !(f = zse_gptq_factor_new(k->in[i].H, k->in[i].n, 0.01, k->pool))) {
                zse_error_prefix("%s", t->name);
                rc = -1;
                break;
            }
            rc = quantize_tensor(k, t, f);
        }
        zse_gptq_factor_free(f);
    }
    for (int i = first; i < first + count; i++) {
        free(k->in[i].H);
        k->in[i].H = NULL;
    }
    return rc;
}

/* ---- the passes ------------------------------------------------------------------------------ */

static uint64_t input_bytes(const calib_input *in)
{
    return (uint64_t)in->n * (uint64_t)in->n * sizeof(float);
}

static uint64_t memory_budget(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    uint64_t phys = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : (8ull << 30);
    return phys / 4;
}

int calib_collect(calib *k)
{
    const int L = k->c->n_layers;
    const uint64_t budget = memory_budget();
    for (int l0 = 0; l0 <= L;) {
        /* layers [l0, l1), and the lm_head's input with the last of them */
        int l1 = l0;
        uint64_t bytes = 0;
        while (l1 < L) {
            uint64_t b = 0;
            for (int j = 0; j < IN_PER_LAYER; j++)
                b += input_bytes(&k->in[l1 * IN_PER_LAYER + j]);
            if (l1 > l0 && bytes + b > budget)
                break;
            bytes += b;
            l1++;
        }
        const int first = l0 * IN_PER_LAYER, count = (l1 - l0) * IN_PER_LAYER + (l1 == L);
        int rc = 0;
        for (int i = first; rc == 0 && i < first + count; i++) {
            calib_input *in = &k->in[i];
            size_t nn;
            if (!zse_mul_ok((size_t)in->n, (size_t)in->n, &nn) || !(in->H = zse_calloc(nn, sizeof *in->H)))
                rc = -1;
        }
        if (rc == 0) {
            calib_progress(k, "layers %d-%d: collecting activations", l0, l1 - 1);
            rc = run_windows(k, l1 == L);
        }
        /* every tap saw every token, or (a layer kind the taps do not see) none */
        for (int i = first; rc == 0 && i < first + count; i++)
            if (k->in[i].tokens != 0 && k->in[i].tokens != k->n_ids)
                rc = zse_fail("the calibration pass saw %llu of %zu tokens at one input (out of memory in the "
                              "model's tap?)", (unsigned long long)k->in[i].tokens, k->n_ids);
        if (rc == 0) {
            calib_progress(k, "layers %d-%d: %s", l0, l1 - 1,
                           k->opts.no_gptq ? "AWQ scales, round to nearest" :
                           k->opts.no_awq ? "GPTQ" : "AWQ scales, GPTQ");
            rc = process_inputs(k, first, count);
        }
        if (rc != 0) {
            for (int i = first; i < first + count; i++) {
                free(k->in[i].H);
                k->in[i].H = NULL;
            }
            return -1;
        }
        if (l1 == L)
            break;
        l0 = l1;
    }
    return 0;
}
