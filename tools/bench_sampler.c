/* bench_sampler — the host sampler's time per token on a vocabulary of logits, the cost a
 * step pays for every row that is not sampled on a GPU (penalties, logit bias, logprobs,
 * or the CPU backend).
 *
 *   build/bench_sampler [--vocab N] [--temperature T] [--top-k K] [--top-p P] [--min-p P]
 *                       [--spread S] [--tokens R]
 *
 * Logits are uniform in [0, spread): a small spread is a flat distribution, whose nucleus
 * is most of the vocabulary (the worst case for top-p), a large one a peaked distribution.
 * Not a test: figures go to docs/BENCHMARKS.md with the command that made them. */
#include "engine/engine.h"
#include "util/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    int vocab = 152064, tokens = 30;
    double spread = 0.5;
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 0.8f;
    s.top_p = 0.9f;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--vocab")) vocab = atoi(v);
        else if (!strcmp(k, "--temperature")) s.temperature = (float)atof(v);
        else if (!strcmp(k, "--top-k")) s.top_k = atoi(v);
        else if (!strcmp(k, "--top-p")) s.top_p = (float)atof(v);
        else if (!strcmp(k, "--min-p")) s.min_p = (float)atof(v);
        else if (!strcmp(k, "--spread")) spread = atof(v);
        else if (!strcmp(k, "--tokens")) tokens = atoi(v);
        else {
            fprintf(stderr, "bench_sampler: unknown option %s\n", k);
            return 2;
        }
    }
    if (vocab < 2 || tokens < 1) {
        fprintf(stderr, "bench_sampler: --vocab must be at least 2 and --tokens at least 1\n");
        return 2;
    }
    float *base = malloc((size_t)vocab * sizeof *base), *logits = malloc((size_t)vocab * sizeof *logits),
          *work_p = malloc((size_t)vocab * sizeof *work_p);
    int32_t *work_i = calloc((size_t)vocab, sizeof *work_i);
    if (!base || !logits || !work_p || !work_i) {
        fprintf(stderr, "bench_sampler: out of memory for a vocabulary of %d\n", vocab);
        return 1;
    }
    uint32_t x = 1;
    for (int i = 0; i < vocab; i++) {
        x = x * 1664525u + 1013904223u;
        base[i] = (float)((double)(x >> 8) / 16777216.0 * spread);
    }
    zse_rng rng;
    zse_rng_seed(&rng, 1);
    zse_history none = {0};
    double t0 = zse_now();
    int64_t check = 0;
    for (int r = 0; r < tokens; r++) {
        memcpy(logits, base, (size_t)vocab * sizeof *logits);
        check += zse_sample(&s, logits, vocab, &none, &rng, work_p, work_i);
    }
    double ms = (zse_now() - t0) / tokens * 1e3;
    printf("{\"vocab\": %d, \"temperature\": %g, \"top_k\": %d, \"top_p\": %g, \"min_p\": %g, \"spread\": %g, "
           "\"ms_per_token\": %.3f, \"checksum\": %lld}\n",
           vocab, s.temperature, s.top_k, s.top_p, s.min_p, spread, ms, (long long)check);
    free(base);
    free(logits);
    free(work_p);
    free(work_i);
    return 0;
}
