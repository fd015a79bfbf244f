/* zse perplexity MODEL -f TEXT — perplexity in windows, and the KL divergence of this
 * model's next-token distributions from another file's (what quantization changed). */
#include "cli/cli.h"

#include "zse.h"
#include "util/util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char cmd_perplexity_summary[] = "measure perplexity over a text file (and KL divergence from another model)";

/* log-softmax of one row into out; returns nothing, out[i] = log p(i) */
static void log_softmax(const float *x, int n, double *out)
{
    double mx = x[0];
    for (int i = 1; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    double s = 0;
    for (int i = 0; i < n; i++)
        s += exp(x[i] - mx);
    double lz = mx + log(s);
    for (int i = 0; i < n; i++)
        out[i] = x[i] - lz;
}

typedef struct {
    double nll, kld;
    size_t scored;
} totals;

static int score_window(zse_model *m, zse_model *base, const int32_t *ids, size_t n, int vocab, totals *t)
{
    float *lg = malloc(n * (size_t)vocab * sizeof *lg);
    float *lb = base ? malloc(n * (size_t)vocab * sizeof *lb) : NULL;
    double *lp = malloc((size_t)vocab * sizeof *lp), *lq = base ? malloc((size_t)vocab * sizeof *lq) : NULL;
    zse_seq *q = zse_seq_new(m, NULL), *qb = base ? zse_seq_new(base, NULL) : NULL;
    int rc = -1;
    if (!lg || !lp || !q || (base && (!lb || !lq || !qb))) {
        zse_fail("out of memory for a window of %zu tokens", n);
        goto done;
    }
    if (zse_seq_feed_logits(q, ids, n, lg) != 0 || (base && zse_seq_feed_logits(qb, ids, n, lb) != 0))
        goto done;
    /* the first half of a window is context only: every scored token sees at least n/2 */
    for (size_t i = n / 2; i + 1 < n; i++) {
        log_softmax(lg + i * (size_t)vocab, vocab, lp);
        t->nll -= lp[ids[i + 1]];
        if (base) {
            log_softmax(lb + i * (size_t)vocab, vocab, lq);
            double kl = 0;
            for (int k = 0; k < vocab; k++)
                kl += exp(lq[k]) * (lq[k] - lp[k]);
            t->kld += kl;
        }
        t->scored++;
    }
    rc = 0;
done:
    zse_seq_free(q);
    zse_seq_free(qb);
    free(lg);
    free(lb);
    free(lp);
    free(lq);
    return rc;
}

int cmd_perplexity(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        printf("usage: zse perplexity MODEL.zse -f TEXT [--ctx N] [--kld-base OTHER.zse] [--threads N]\n"
               "                      [--device D] [--gpu-memory SIZE] [--json]\n\n"
               "Splits the file's tokens into windows of N (default 512) and scores the second half\n"
               "of each window. --kld-base also reports the mean KL divergence KL(base || model) of\n"
               "the next-token distributions (both files need the same tokenizer).\n");
        return 0;
    }
    const char *path = NULL, *text_path = NULL, *base_path = NULL;
    int64_t ctx = 512, threads = 0;
    bool as_json = false;
    zse_load_params lp;
    zse_load_params_default(&lp);
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_is(&a, "-f", "--file")) text_path = cli_value(&a);
        else if (cli_is(&a, NULL, "--ctx")) cli_int(&a, 4, 1 << 20, &ctx);
        else if (cli_is(&a, NULL, "--kld-base")) base_path = cli_value(&a);
        else if (cli_is(&a, NULL, "--threads")) cli_int(&a, 1, 1024, &threads);
        else if (cli_is(&a, NULL, "--device")) lp.device = cli_value(&a);
        else if (cli_is(&a, NULL, "--gpu-memory")) cli_size(&a, 1ull << 20, &lp.gpu_memory);
        else if (cli_is(&a, NULL, "--json")) as_json = true;
        else if (cli_positional(&a) && !path) path = a.arg;
        else return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!path || !text_path) {
        fprintf(stderr, "usage: zse perplexity MODEL.zse -f TEXT [--ctx N] [--kld-base OTHER.zse]\n");
        return 2;
    }
    lp.threads = (int)threads;
    lp.ctx_size = (int)ctx;
    size_t len;
    char *text = zse_read_file(text_path, &len);
    if (!text)
        return cli_error("perplexity");
    zse_model *m = zse_model_load(path, &lp), *base = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = 1;
    if (!m || (base_path && !(base = zse_model_load(base_path, &lp))))
        goto done;
    zse_model_info info, binfo;
    zse_model_get_info(m, &info);
    if (base) {
        zse_model_get_info(base, &binfo);
        if (binfo.vocab_size != info.vocab_size) {
            zse_fail("%s has %d vocabulary entries and %s %d; KL divergence needs the same vocabulary",
                     base_path, binfo.vocab_size, path, info.vocab_size);
            goto done;
        }
    }
    if (ctx > info.ctx_size)
        ctx = info.ctx_size;
    if (zse_tokenize(m, text, len, 0, &ids, &n) != 0)
        goto done;
    if (n < (size_t)ctx) {
        zse_fail("%s holds %zu tokens, fewer than one window of %lld; use a longer text or a smaller --ctx",
                 text_path, n, (long long)ctx);
        goto done;
    }
    totals t = {0};
    double t0 = zse_now();
    size_t windows = n / (size_t)ctx;
    for (size_t w = 0; w < windows; w++)
        if (score_window(m, base, ids + w * (size_t)ctx, (size_t)ctx, info.vocab_size, &t) != 0)
            goto done;
    double ppl = exp(t.nll / (double)t.scored), secs = zse_now() - t0;
    if (as_json) {
        printf("{\"model\": \"%s\", \"file\": \"%s\", \"ctx\": %lld, \"windows\": %zu, \"scored_tokens\": %zu, "
               "\"perplexity\": %.6f",
               path, text_path, (long long)ctx, windows, t.scored, ppl);
        if (base)
            printf(", \"kld_base\": \"%s\", \"mean_kld\": %.8f", base_path, t.kld / (double)t.scored);
        printf(", \"seconds\": %.2f}\n", secs);
    } else {
        printf("%s: perplexity %.4f over %zu tokens (%zu windows of %lld)", path, ppl, t.scored, windows,
               (long long)ctx);
        if (base)
            printf(", mean KL divergence from %s %.6f", base_path, t.kld / (double)t.scored);
        printf(" [%.1f s]\n", secs);
    }
    rc = 0;
done:
    if (rc)
        cli_error("perplexity");
    free(ids);
    free(text);
    zse_model_free(m);
    zse_model_free(base);
    return rc;
}
