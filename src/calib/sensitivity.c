/* Sensitivity and the plan (docs/QUANT.md §Sensitivity and the budget).
 *
 * A tensor's sensitivity is measured, not guessed: the float model runs the first
 * SENS_TOKENS calibration tokens with that one tensor replaced by what its recipe option
 * computes (calibrated and dequantized, the AWQ scales undone), and the mean KL divergence
 * of its next-token distributions from the float model's is the tensor's cost at that
 * option. Its other options cost that KL times their output error over the recipe's (the
 * KL of a small change grows with the square of the change, like the output error), so one
 * forward pass per tensor prices them all. The plan then spends the bit budget where it
 * removes the most KL per byte. */
#include "calib/calib_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SENS_TOKENS 512

typedef struct {
    calib *k;
    size_t tokens;          /* scored positions: the first `tokens` calibration tokens */
    float *base;            /* [tokens][vocab] log-probabilities of the float model */
    float *logits;          /* [ctx][vocab] scratch */
    double *lp;             /* [vocab] scratch */
} sens;

static void log_softmax(const float *x, int n, double *out)
{
    double mx = x[0], s = 0;
    for (int i = 1; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    for (int i = 0; i < n; i++)
        s += exp(x[i] - mx);
    double lz = mx + log(s);
    for (int i = 0; i < n; i++)
        out[i] = x[i] - lz;
}

/* runs the sensitivity windows; with kl NULL stores the log-probabilities into S->base,
 * else returns the mean KL(float || this model) through *kl */
static int run(sens *S, double *kl)
{
    calib *k = S->k;
    const int V = k->c->vocab_size;
    double total = 0;
    size_t done = 0;
    for (size_t w = 0; done < S->tokens; w++) {
        const int32_t *ids;
        size_t n;
        calib_window(k, w, &ids, &n);
        if (n > S->tokens - done)
            n = S->tokens - done;
        zse_seq *q = zse_seq_new(k->model, NULL);
        int rc = q ? zse_seq_feed_logits(q, ids, n, S->logits) : -1;
        zse_seq_free(q);
        if (rc != 0)
            return -1;
        for (size_t i = 0; i < n; i++) {
            float *b = S->base + (done + i) * (size_t)V;
            log_softmax(S->logits + i * (size_t)V, V, S->lp);
            if (!kl) {
                for (int v = 0; v < V; v++)
                    b[v] = (float)S->lp[v];
                continue;
            }
            double d = 0;
            for (int v = 0; v < V; v++)
                d += exp((double)b[v]) * ((double)b[v] - S->lp[v]);
            total += d;
        }
        done += n;
    }
    if (kl)
        *kl = total / (double)S->tokens;
    return 0;
}

/* the KL when tensor t alone is stored as its recipe option */
static int measure(sens *S, calib_tensor *t)
{
    calib *k = S->k;
    const zse_tensor_info *orig = calib_tensor_info(k, t->name);
    float *w = zse_malloc((size_t)(t->rows * t->cols) * sizeof *w);
    if (!w || calib_effective(k, t, 0, w) != 0) {
        free(w);
        return -1;
    }
    zse_tensor_info ti = *orig;
    ti.q = (zse_qshape){ZSE_SCHEME_F32, t->rows, t->cols, 0};
    ti.layout = ZSE_LAYOUT_PLAIN;
    ti.size = (uint64_t)(t->rows * t->cols) * sizeof *w;
    ti.data = w;
    int rc = zse_llm_swap_weight(k->model->llm, t->name, &ti);
    if (rc == 0) {
        rc = run(S, &t->kl);
        if (zse_llm_swap_weight(k->model->llm, t->name, orig) != 0)
            rc = -1;
    }
    free(w);
    if (rc != 0)
        zse_error_prefix("sensitivity of %s", t->name);
    return rc;
}

static int plan_budget(calib *k)
{
    uint64_t elements = 0;
    int n = 0;
    for (int i = 0; i < k->n_t; i++)
        if (k->t[i].calibrated) {
            elements += (uint64_t)(k->t[i].rows * k->t[i].cols);
            n++;
        }
    const zse_plan_option **opts = zse_calloc((size_t)n, sizeof *opts);
    int *n_opts = zse_calloc((size_t)n, sizeof *n_opts), *choice = zse_calloc((size_t)n, sizeof *choice);
    zse_plan_option *all = zse_calloc((size_t)n * CALIB_MAX_OPTS, sizeof *all);
    int rc = opts && n_opts && choice && all ? 0 : -1;
    for (int i = 0, j = 0; rc == 0 && i < k->n_t; i++) {
        calib_tensor *t = &k->t[i];
        if (!t->calibrated)
            continue;
        for (int o = 0; o < t->n_opts; o++)
            all[j * CALIB_MAX_OPTS + o] = (zse_plan_option){t->opt[o].bytes, t->opt[o].cost};
        opts[j] = all + j * CALIB_MAX_OPTS;
        n_opts[j] = t->n_opts;
        j++;
    }
    const uint64_t budget = (uint64_t)floor(k->opts.target_bpw * (double)elements / 8.0);
    if (rc == 0 && zse_plan_choose(opts, n_opts, n, budget, choice) != 0) {
        uint64_t least = 0;
        for (int j = 0; j < n; j++)
            least += opts[j][0].bytes;
        rc = zse_fail("--target-bpw %g is below what the %s g%d recipe itself takes (%.3f bits per weight over "
                      "these tensors); raise it or use a larger --group-size", k->opts.target_bpw,
                      zse_scheme_name(k->conv.scheme), k->conv.group_size, 8.0 * (double)least / (double)elements);
    }
    for (int i = 0, j = 0; rc == 0 && i < k->n_t; i++)
        if (k->t[i].calibrated)
            k->t[i].chosen = choice[j++];
    free(opts);
    free(n_opts);
    free(choice);
    free(all);
    return rc;
}

double calib_bpw(const calib *k)
{
    uint64_t bytes = 0, elements = 0;
    for (int i = 0; i < k->n_t; i++)
        if (k->t[i].calibrated) {
            bytes += k->t[i].opt[k->t[i].chosen].bytes;
            elements += (uint64_t)(k->t[i].rows * k->t[i].cols);
        }
    return elements ? 8.0 * (double)bytes / (double)elements : 0;
}

int calib_plan(calib *k)
{
    for (int i = 0; i < k->n_t; i++)
        k->t[i].chosen = 0;
    if (k->opts.target_bpw <= 0)
        return 0;
    const int V = k->c->vocab_size;
    sens S = {.k = k, .tokens = k->n_ids < SENS_TOKENS ? k->n_ids : SENS_TOKENS};
    k->sens_tokens = S.tokens;
    S.base = zse_malloc(S.tokens * (size_t)V * sizeof *S.base);
    S.logits = zse_malloc((size_t)k->ctx * (size_t)V * sizeof *S.logits);
    S.lp = zse_malloc((size_t)V * sizeof *S.lp);
    int rc = S.base && S.logits && S.lp ? run(&S, NULL) : -1;
    int n = 0, total = 0;
    for (int i = 0; i < k->n_t; i++)
        total += k->t[i].calibrated;
    if (rc == 0)
        calib_progress(k, "sensitivity: %d tensors, each alone, over %zu tokens", total, S.tokens);
    for (int i = 0; rc == 0 && i < k->n_t; i++) {
        calib_tensor *t = &k->t[i];
        if (!t->calibrated)
            continue;
        rc = measure(&S, t);
        for (int o = 0; rc == 0 && o < t->n_opts; o++)
            t->opt[o].cost = t->opt[0].error > 0 ? t->kl * t->opt[o].error / t->opt[0].error : 0;
        if (rc == 0 && ++n % 16 == 0)
            calib_progress(k, "sensitivity: %d of %d", n, total);
    }
    free(S.base);
    free(S.logits);
    free(S.lp);
    if (rc == 0)
        rc = plan_budget(k);
    if (rc == 0)
        calib_progress(k, "plan: %.3f bits per weight (target %g)", calib_bpw(k), k->opts.target_bpw);
    return rc;
}
