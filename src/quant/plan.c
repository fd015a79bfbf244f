/* The mixed-precision plan: one storage option per tensor, least summed cost within a
 * byte budget (docs/QUANT.md §Sensitivity and the budget).
 *
 * Each tensor starts at its smallest option. Its options that are worth taking lie on the
 * lower convex hull of (bytes, cost): along the hull each further step buys less cost per
 * byte than the one before, so the greedy choice — always the step, of any tensor, that
 * removes the most cost per byte and still fits — takes every tensor's steps in order and
 * is optimal up to the last step that does not fit (a knapsack's usual gap). */
#include "quant/quant.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    int *hull;          /* option indices along the hull, bytes ascending */
    int n_hull;
    int at;             /* the hull position taken so far */
    bool closed;        /* its next step did not fit */
} tensor_hull;

/* the lower convex hull of a tensor's options, from its smallest (cheapest on ties) */
static int build_hull(const zse_plan_option *o, int n, tensor_hull *h)
{
    h->hull = zse_malloc((size_t)n * sizeof *h->hull);
    int *order = zse_malloc((size_t)n * sizeof *order);
    if (!h->hull || !order) {
        free(order);
        return -1;
    }
    for (int i = 0; i < n; i++) /* insertion sort by bytes, then cost: a handful of options */
        order[i] = i;
    for (int i = 1; i < n; i++)
        for (int k = i; k > 0; k--) {
            const zse_plan_option *a = &o[order[k - 1]], *b = &o[order[k]];
            if (a->bytes < b->bytes || (a->bytes == b->bytes && a->cost <= b->cost))
                break;
            int t = order[k];
            order[k] = order[k - 1];
            order[k - 1] = t;
        }
    h->n_hull = 0;
    for (int i = 0; i < n; i++) {
        const zse_plan_option *p = &o[order[i]];
        if (h->n_hull > 0 && p->cost >= o[h->hull[h->n_hull - 1]].cost)
            continue; /* more bytes and no less cost: never worth it */
        /* drop hull points that the new one makes non-convex */
        while (h->n_hull >= 2) {
            const zse_plan_option *a = &o[h->hull[h->n_hull - 2]], *b = &o[h->hull[h->n_hull - 1]];
            double slope_ab = (b->cost - a->cost) / (double)(b->bytes - a->bytes);
            double slope_ap = (p->cost - a->cost) / (double)(p->bytes - a->bytes);
            if (slope_ap > slope_ab)
                break;
            h->n_hull--;
        }
        h->hull[h->n_hull++] = order[i];
    }
    free(order);
    h->at = 0;
    h->closed = h->n_hull < 2;
    return 0;
}

int zse_plan_choose(const zse_plan_option *const *opts, const int *n_opts, int n, uint64_t budget, int *choice)
{
    tensor_hull *h = zse_calloc((size_t)(n > 0 ? n : 1), sizeof *h);
    if (!h)
        return -1;
    int rc = 0;
    uint64_t used = 0;
    for (int t = 0; rc == 0 && t < n; t++) {
        if (n_opts[t] < 1)
            rc = zse_fail("tensor %d of the plan has no storage option", t);
        else if (build_hull(opts[t], n_opts[t], &h[t]) != 0)
            rc = -1;
        else
            used += opts[t][h[t].hull[0]].bytes;
    }
    if (rc == 0 && used > budget)
        rc = zse_fail("the smallest storage of every tensor takes %llu bytes, over the budget of %llu",
                      (unsigned long long)used, (unsigned long long)budget);
    while (rc == 0) {
        int best = -1;
        double best_gain = 0;
        for (int t = 0; t < n; t++) {
            if (h[t].closed)
                continue;
            const zse_plan_option *a = &opts[t][h[t].hull[h[t].at]], *b = &opts[t][h[t].hull[h[t].at + 1]];
            if (used - a->bytes + b->bytes > budget) {
                h[t].closed = true; /* later steps are larger still */
                continue;
            }
            double gain = (a->cost - b->cost) / (double)(b->bytes - a->bytes > 0 ? b->bytes - a->bytes : 1);
            if (best < 0 || gain > best_gain) {
                best = t;
                best_gain = gain;
            }
        }
        if (best < 0)
            break;
        tensor_hull *b = &h[best];
        used += opts[best][b->hull[b->at + 1]].bytes - opts[best][b->hull[b->at]].bytes;
        b->at++;
        b->closed = b->at + 1 >= b->n_hull;
    }
    for (int t = 0; t < n; t++) {
        if (rc == 0)
            choice[t] = h[t].hull[h[t].at];
        free(h[t].hull);
    }
    free(h);
    return rc;
}
