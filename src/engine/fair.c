/* What a step costs, for fair sharing between tenants (scheduler.c).
 *
 * The scheduler charges each tenant the work its sequences add to a step. A token's matmuls
 * cost the same at any position; its attention grows with the context before it, and that
 * is what a tenant with long contexts makes everyone pay for. So a sequence's part of a step
 * costs `tokens + ctx_cost × context`, in units of a token's work apart from attention.
 *
 * How much a token of context costs against the rest depends on the backend more than on
 * the model (a CPU's int8 matmuls reuse each weight chunk over a tile of tokens while its
 * attention reads every K/V row once per token; a GPU's decode is bound by reading the
 * weights once per step), so it is measured: each step's time is fitted as
 * fixed + per_token × tokens + per_context × context by least squares over recent steps
 * (weights fading by FORGET a step; a step descheduled by a busy machine is clipped to
 * OUTLIER times the prediction), and ctx_cost = per_context / per_token, followed slowly.
 * Until enough steps have run, the model's shape gives it: attention's multiply-adds per
 * token of context over the weights' per token; a fit that is not sound (too few kinds of
 * step to separate the terms, a negative term) leaves it as it was. */
#include "engine/engine.h"

#include <math.h>
#include <string.h>

#define FORGET 0.995        /* a step's weight in the fit, one step later */
#define OUTLIER 3.0         /* a step's time counts as at most this × the fit's prediction */
#define MIN_STEPS 32        /* steps before the fit is used */
#define FOLLOW 0.05         /* how far the figures in use move towards a step's fit */
#define TOKEN_SCALE 64.0    /* the regressors are scaled to be of the order of one */
#define CONTEXT_SCALE 65536.0

void zse_step_fit_init(zse_step_fit *f, const zse_model *m)
{
    *f = (zse_step_fit){0};
    zse_model_info in;
    zse_model_get_info(m, &in);
    /* per layer: q·k and p·v over each head; the weights: about 12 hidden² (attention's
     * four projections, an MLP of about 2.7× hidden) and the output head */
    double attention = 2.0 * in.n_heads * in.head_dim * in.n_layers;
    double weights = 12.0 * in.hidden_size * (double)in.hidden_size * in.n_layers + (double)in.vocab_size * in.hidden_size;
    f->prior = weights > 0 && attention > 0 ? attention / weights : 1e-3;
    f->ctx_cost = f->prior;
}

/* solves the 3×3 system a x = y by Gaussian elimination with partial pivoting; false when
 * it is (nearly) singular */
static bool solve3(double a[3][3], double y[3], double x[3])
{
    for (int c = 0; c < 3; c++) {
        int p = c;
        for (int r = c + 1; r < 3; r++)
            if (fabs(a[r][c]) > fabs(a[p][c]))
                p = r;
        if (fabs(a[p][c]) < 1e-12)
            return false;
        for (int k = 0; k < 3; k++) {
            double t = a[c][k];
            a[c][k] = a[p][k];
            a[p][k] = t;
        }
        double t = y[c];
        y[c] = y[p];
        y[p] = t;
        for (int r = c + 1; r < 3; r++) {
            double m = a[r][c] / a[c][c];
            for (int k = c; k < 3; k++)
                a[r][k] -= m * a[c][k];
            y[r] -= m * y[c];
        }
    }
    for (int c = 2; c >= 0; c--) {
        double s = y[c];
        for (int k = c + 1; k < 3; k++)
            s -= a[c][k] * x[k];
        x[c] = s / a[c][c];
    }
    return true;
}

void zse_step_fit_add(zse_step_fit *f, double tokens, double context, double seconds)
{
    if (!(seconds > 0) || tokens <= 0)
        return;
    const double x[3] = {1.0, tokens / TOKEN_SCALE, context / CONTEXT_SCALE};
    /* a step that took far longer than the fit says was descheduled, not dearer: it counts
     * as OUTLIER times the prediction */
    if (f->valid) {
        double predicted = f->theta[0] * x[0] + f->theta[1] * x[1] + f->theta[2] * x[2];
        if (predicted > 0 && seconds > OUTLIER * predicted)
            seconds = OUTLIER * predicted;
    }
    for (int i = 0; i < 3; i++) {
        for (int j = 0; j < 3; j++)
            f->s[i][j] = FORGET * f->s[i][j] + x[i] * x[j];
        f->b[i] = FORGET * f->b[i] + x[i] * seconds;
    }
    if (++f->n < MIN_STEPS)
        return;
    /* a little ridge keeps an unexcited direction (every step alike) from blowing up */
    double a[3][3], y[3], theta[3];
    double ridge = 1e-6 * (f->s[0][0] + f->s[1][1] + f->s[2][2]) / 3.0;
    for (int i = 0; i < 3; i++) {
        for (int j = 0; j < 3; j++)
            a[i][j] = f->s[i][j] + (i == j ? ridge : 0.0);
        y[i] = f->b[i];
    }
    if (!solve3(a, y, theta))
        return; /* not enough kinds of step yet: the last figures stand */
    double per_token = theta[1] / TOKEN_SCALE, per_context = theta[2] / CONTEXT_SCALE;
    if (!(per_token > 0) || per_context < 0)
        return;
    memcpy(f->theta, theta, sizeof theta);
    f->valid = true;
    double cost = per_context / per_token;
    /* a context token costing more than a whole token's other work, or far less than its
     * arithmetic says, is noise in the fit rather than the machine */
    if (cost > 1.0)
        cost = 1.0;
    if (cost < f->prior / 16)
        cost = f->prior / 16;
    /* step times jitter (a shared machine deschedules the engine): the figures in use follow
     * the fit slowly, the ratio in log space since it spans orders of magnitude */
    f->ctx_cost = exp((1 - FOLLOW) * log(f->ctx_cost) + FOLLOW * log(cost));
}
