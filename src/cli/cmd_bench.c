/* zse bench MODEL — prefill and decode speed and peak memory, as a user feels them. */
#include "cli/cli.h"

#include "zse.h"
#include "util/util.h"

#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/resource.h>

const char cmd_bench_summary[] = "measure load time, prefill and decode tokens/s and peak memory";

static double peak_rss_mb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss / 1024.0;
}

int cmd_bench(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        printf("usage: zse bench MODEL.zse [--prompt-tokens N] [--gen-tokens N] [--threads N]\n"
               "                 [--kv-cache f16|int8] [--device D] [--json]\n\n"
               "Feeds N prompt tokens (prefill), then generates greedily past end-of-sequence\n"
               "(decode), and reports tokens/s for each, load time and peak resident memory.\n");
        return 0;
    }
    const char *path = NULL, *kv = "f16";
    int64_t n_prompt = 512, n_gen = 128, threads = 0;
    bool as_json = false;
    zse_load_params lp;
    zse_load_params_default(&lp);
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_is(&a, NULL, "--prompt-tokens")) cli_int(&a, 1, 1 << 20, &n_prompt);
        else if (cli_is(&a, NULL, "--gen-tokens")) cli_int(&a, 1, 1 << 20, &n_gen);
        else if (cli_is(&a, NULL, "--threads")) cli_int(&a, 1, 1024, &threads);
        else if (cli_is(&a, NULL, "--kv-cache")) kv = cli_value(&a);
        else if (cli_is(&a, NULL, "--device")) lp.device = cli_value(&a);
        else if (cli_is(&a, NULL, "--json")) as_json = true;
        else if (cli_positional(&a) && !path) path = a.arg;
        else return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!path) {
        fprintf(stderr, "usage: zse bench MODEL.zse [--prompt-tokens N] [--gen-tokens N] [--json]\n");
        return 2;
    }
    lp.threads = (int)threads;
    lp.kv_type = kv && strcmp(kv, "int8") == 0 ? ZSE_KV_INT8 : ZSE_KV_F16;
    lp.ctx_size = (int)(n_prompt + n_gen + 1);
    double t0 = zse_now();
    zse_model *m = zse_model_load(path, &lp);
    if (!m)
        return cli_error("bench");
    double t_load = zse_now() - t0;
    zse_model_info info;
    zse_model_get_info(m, &info);
    if (n_prompt + n_gen + 1 > info.ctx_size) {
        zse_model_free(m);
        fprintf(stderr, "zse bench: %lld + %lld tokens exceed the model's context of %d\n",
                (long long)n_prompt, (long long)n_gen, info.ctx_size);
        return 2;
    }
    int32_t *ids = zse_malloc((size_t)n_prompt * sizeof *ids);
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 0;
    s.ignore_eos = true;
    s.max_tokens = (int)n_gen;
    zse_seq *q = ids ? zse_seq_new(m, &s) : NULL;
    int rc = 1;
    if (!q)
        goto done;
    /* a fixed pseudo-random prompt: every run measures the same work */
    uint32_t x = 12345;
    for (int64_t i = 0; i < n_prompt; i++) {
        x = x * 1664525u + 1013904223u;
        ids[i] = (int32_t)((x >> 8) % (uint32_t)info.vocab_size);
    }
    double t1 = zse_now();
    if (zse_seq_feed(q, ids, (size_t)n_prompt) != 0)
        goto done;
    double t_prefill = zse_now() - t1;
    double t2 = zse_now();
    int produced = 0;
    for (;;) {
        int32_t tok;
        char *piece;
        zse_finish fin;
        if (zse_seq_next(q, &tok, &piece, &fin) != 0)
            goto done;
        zse_free(piece);
        produced++;
        if (fin != ZSE_FINISH_NONE)
            break;
    }
    double t_decode = zse_now() - t2;
    double pp = (double)n_prompt / t_prefill, tg = produced / t_decode;
    if (as_json)
        printf("{\"model\": \"%s\", \"device\": \"%s\", \"quant\": \"%s\", \"load_s\": %.3f, "
               "\"prompt_tokens\": %lld, \"prefill_tok_s\": %.2f, \"gen_tokens\": %d, \"decode_tok_s\": %.2f, "
               "\"peak_rss_mb\": %.1f}\n",
               info.name, info.device, info.quant, t_load, (long long)n_prompt, pp, produced, tg, peak_rss_mb());
    else
        printf("%s (%s, %s): load %.3f s | prefill %lld tokens %.2f tok/s | decode %d tokens %.2f tok/s | "
               "peak RSS %.1f MB\n",
               info.name, info.device, info.quant, t_load, (long long)n_prompt, pp, produced, tg, peak_rss_mb());
    rc = 0;
done:
    if (rc)
        cli_error("bench");
    zse_seq_free(q);
    free(ids);
    zse_model_free(m);
    return rc;
}
