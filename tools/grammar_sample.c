/* grammar_sample — draws outputs under a grammar's token masks with random logits, and
 * measures mask time per token.
 *
 *   build/grammar_sample TOKENIZER (--schema F | --schemas F | --regex F | --choice F | --json-object)
 *                        [--strict] [-n N] [--seed S] [--max-tokens M]
 *                        [--bench] [--precompute] [--vocab-size V] [--dump-vocab F]
 *
 * TOKENIZER: a .zse file, a .gguf vocabulary or a Hugging Face directory. --choice F: a JSON
 * array of strings. --schemas F: one schema a line, all sampled in one run (outputs carry
 * "schema": the line's index; a schema that does not compile prints {"schema", "error"}). Each output is one JSON line {"index", "text", "ended", "tokens"}: the
 * text is the bytes of the tokens drawn (random logits, argmax over the allowed tokens, so
 * uniform over them) until EOS or M tokens. A grammar that does not compile prints
 * "error: ..." on stderr and exits 2.
 *
 * --bench: no outputs; a JSON summary of compile time, the first mask of each output and
 * every later mask: p50/p99/max microseconds of this thread's CPU time (a shared machine's
 * preemption left out). A grammar position's first mask fills its cache: "cold" counts the
 * masks of the first output, "warm" those of the others (the grammar cached, as a server
 * keeps it).
 * --precompute: fills every position's cache at compile (zse_grammar_precompute; counted
 * in compile_ms), so no mask pays for a first use.
 * --vocab-size V: extends the vocabulary to V tokens with concatenations of two existing
 * tokens (seeded), to measure at a larger vocabulary than the tokenizer has.
 * --dump-vocab F: writes the vocabulary used ({"eos": [ids], "tokens": [hex bytes or null]})
 * so another engine can be measured on exactly the same tokens (tools/bench_xgrammar.py).
 * Not a test by itself: tests/grammar runs it; figures go to docs/BENCHMARKS.md. */
#include "grammar/grammar.h"
#include "tokenizer/tokenizer.h"
#include "util/util.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t rng = 1;

/* this thread's CPU seconds: on a shared machine, wall time includes other processes */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
static uint32_t next_u32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static int usage(void)
{
    fprintf(stderr, "usage: grammar_sample TOKENIZER (--schema F | --schemas F | --regex F | --choice F | --json-object)\n"
                    "                      [--strict]\n"
                    "                      [-n N] [--seed S] [--max-tokens M] [--bench] [--precompute]\n"
                    "                      [--vocab-size V] [--dump-vocab F]\n");
    return 2;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p)
{
    if (!n)
        return 0;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return v[i];
}

/* the tokenizer's tokens plus concatenated pairs up to `target` tokens */
static zse_grammar_vocab *build_vocab(const zse_tokenizer *tok, int target)
{
    int n = zse_tokenizer_n_vocab(tok);
    int32_t eos = zse_tokenizer_eos(tok);
    if (eos < 0) {
        fprintf(stderr, "error: the tokenizer has no EOS token\n");
        return NULL;
    }
    if (target <= n)
        return zse_grammar_vocab_from_tokenizer(tok, &eos, 1, NULL, 0);
    uint8_t **bytes = calloc((size_t)target, sizeof *bytes);
    uint32_t *lens = calloc((size_t)target, sizeof *lens);
    zse_buf buf = {0};
    if (!bytes || !lens)
        return NULL;
    for (int32_t i = 0; i < n; i++) {
        if (zse_tokenizer_is_special(tok, i) && i != eos)
            continue;
        buf.len = 0;
        if (zse_tokenizer_token_bytes(tok, i, &buf) || !buf.len)
            continue;
        bytes[i] = malloc(buf.len);
        memcpy(bytes[i], buf.data, buf.len);
        lens[i] = (uint32_t)buf.len;
    }
    for (int i = n; i < target; i++) {
        int a, b;
        do {
            a = (int)(next_u32() % (uint32_t)n);
            b = (int)(next_u32() % (uint32_t)n);
        } while (!bytes[a] || !bytes[b] || a == eos || b == eos || lens[a] + lens[b] > 32);
        lens[i] = lens[a] + lens[b];
        bytes[i] = malloc(lens[i]);
        memcpy(bytes[i], bytes[a], lens[a]);
        memcpy(bytes[i] + lens[a], bytes[b], lens[b]);
    }
    zse_grammar_vocab *v = zse_grammar_vocab_new(target, (const uint8_t *const *)bytes, lens, &eos, 1);
    for (int i = 0; i < target; i++)
        free(bytes[i]);
    free(bytes);
    free(lens);
    zse_buf_free(&buf);
    return v;
}

static bool utf8_ok(const char *s, size_t n)
{
    json_t *j = json_stringn(s, n);
    json_decref(j);
    return j != NULL;
}

typedef struct {
    double *cold, *later;
    size_t n_cold, n_later, total_tokens;
    int ended;
} bench_stats;

/* draws n outputs under g: JSON lines on stdout (with "schema" when schema >= 0), or the
 * mask times into st when benchmarking; 0, or 1 on an error (printed) */
static int sample_outputs(zse_grammar *g, const zse_grammar_vocab *v, int n, int max_tokens, int schema,
                          bench_stats *st)
{
    int words = zse_grammar_mask_words(v), nv = zse_grammar_vocab_size(v);
    uint32_t *mask = calloc((size_t)words, sizeof *mask);
    int rc = 0;
    zse_buf text = {0};
    if (!mask)
        return 1;
    for (int k = 0; k < n && rc == 0; k++) {
        zse_matcher *m = zse_matcher_new(g, 0);
        if (!m) {
            fprintf(stderr, "error: %s\n", zse_error_message());
            rc = 1;
            break;
        }
        text.len = 0;
        int tokens = 0;
        while (tokens < max_tokens) {
            double ts = cpu_now();
            int allowed = zse_matcher_fill_mask(m, mask);
            double dt = cpu_now() - ts;
            if (st && k == 0)
                st->cold[st->n_cold++] = dt;
            else if (st)
                st->later[st->n_later++] = dt;
            if (allowed <= 0) {
                fprintf(stderr, "error: no token allowed after %d tokens (%s)\n", tokens,
                        allowed < 0 ? zse_error_message() : "a dead end");
                rc = 1;
                break;
            }
            /* random logits: the allowed token with the largest draw */
            uint32_t best = 0;
            int32_t pick = -1;
            for (int w = 0; w < words; w++) {
                uint32_t bits = mask[w];
                while (bits) {
                    int id = w * 32 + __builtin_ctz(bits);
                    bits &= bits - 1;
                    uint32_t r = next_u32();
                    if (id < nv && (pick < 0 || r > best)) {
                        best = r;
                        pick = id;
                    }
                }
            }
            if (zse_matcher_accept_token(m, pick) != 0) {
                fprintf(stderr, "error: token %d was in the mask but not accepted\n", pick);
                rc = 1;
                break;
            }
            tokens++;
            if (zse_matcher_ended(m))
                break;
            zse_buf_append(&text, v->bytes[pick], v->lens[pick]);
        }
        bool ended = zse_matcher_ended(m);
        if (st) {
            st->total_tokens += (size_t)tokens;
            st->ended += ended;
        }
        if (!st && rc == 0) {
            /* an output cut by the token limit may end inside a character: drop its start */
            size_t keep = text.len;
            for (int cut = 0; !ended && cut < 4 && keep > 0 && !utf8_ok(text.data, keep); cut++)
                keep--;
            json_t *line = json_pack("{s:i,s:s%,s:b,s:i}", "index", k, "text", text.data ? text.data : "", keep,
                                     "ended", ended, "tokens", tokens);
            if (line && schema >= 0)
                json_object_set_new(line, "schema", json_integer(schema));
            if (!line) {
                fprintf(stderr, "error: output %d is not valid UTF-8\n", k);
                rc = 1;
            } else {
                char *s = json_dumps(line, JSON_COMPACT | JSON_ENSURE_ASCII);
                printf("%s\n", s);
                free(s);
                json_decref(line);
            }
        }
        zse_matcher_free(m);
    }
    zse_buf_free(&text);
    free(mask);
    return rc;
}

/* --schemas F: one JSON Schema a line; each line's outputs carry "schema": its index, and a
 * schema that does not compile gives {"schema": i, "error": message} */
static int run_schema_lines(const zse_grammar_vocab *v, const char *file, int n, int max_tokens, unsigned flags)
{
    size_t len;
    char *text = zse_read_file(file, &len);
    if (!text) {
        fprintf(stderr, "error: %s\n", zse_error_message());
        return 1;
    }
    int rc = 0, index = 0;
    for (char *line = text, *next; rc == 0 && line < text + len; line = next, index++) {
        char *nl = memchr(line, '\n', (size_t)(text + len - line));
        next = nl ? nl + 1 : text + len;
        size_t l = (size_t)((nl ? nl : text + len) - line);
        zse_grammar *g = zse_grammar_json_schema(v, line, l, flags);
        if (!g) {
            json_t *e = json_pack("{s:i,s:s}", "schema", index, "error", zse_error_message());
            char *s = json_dumps(e, JSON_COMPACT | JSON_ENSURE_ASCII);
            printf("%s\n", s);
            free(s);
            json_decref(e);
            continue;
        }
        rc = sample_outputs(g, v, n, max_tokens, index, NULL);
        zse_grammar_release(g);
    }
    free(text);
    return rc;
}

static int dump_vocab(const zse_grammar_vocab *v, const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "{\"eos\": [");
    for (int i = 0; i < v->n_eos; i++)
        fprintf(f, "%s%d", i ? ", " : "", v->eos[i]);
    fprintf(f, "], \"tokens\": [");
    for (int i = 0; i < v->n_vocab; i++) {
        fprintf(f, "%s", i ? ",\n" : "\n");
        if (!v->bytes[i] || v->is_eos[i]) {
            fprintf(f, "null");
            continue;
        }
        fputc('"', f);
        for (uint32_t k = 0; k < v->lens[i]; k++)
            fprintf(f, "%02x", v->bytes[i][k]);
        fputc('"', f);
    }
    fprintf(f, "]}\n");
    return fclose(f);
}

static zse_grammar *compile(const zse_grammar_vocab *v, const char *kind, const char *file, unsigned flags)
{
    if (!strcmp(kind, "--json-object"))
        return zse_grammar_json_object(v);
    size_t len;
    char *text = zse_read_file(file, &len);
    if (!text)
        return NULL;
    zse_grammar *g = NULL;
    if (!strcmp(kind, "--schema")) {
        g = zse_grammar_json_schema(v, text, len, flags);
    } else if (!strcmp(kind, "--regex")) {
        while (len && (text[len - 1] == '\n' || text[len - 1] == '\r'))
            len--; /* the file's final newline is not part of the pattern */
        g = zse_grammar_regex(v, text, len);
    } else {
        json_error_t e;
        json_t *arr = json_loadb(text, len, 0, &e);
        size_t n = json_array_size(arr);
        const char **choices = calloc(n ? n : 1, sizeof *choices);
        for (size_t i = 0; choices && i < n; i++)
            choices[i] = json_string_value(json_array_get(arr, i));
        bool ok = arr && n && choices;
        for (size_t i = 0; ok && i < n; i++)
            ok = choices[i] != NULL;
        if (ok)
            g = zse_grammar_choice(v, choices, (int)n);
        else
            zse_fail("--choice needs a JSON array of strings");
        free(choices);
        json_decref(arr);
    }
    free(text);
    return g;
}

int main(int argc, char **argv)
{
    const char *tok_path = NULL, *kind = NULL, *file = NULL, *dump = NULL;
    int n = 1, max_tokens = 2000, vocab_size = 0;
    unsigned flags = 0;
    bool bench = false, precompute = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has = i + 1 < argc;
        if (!strcmp(a, "--schema") || !strcmp(a, "--schemas") || !strcmp(a, "--regex") || !strcmp(a, "--choice")) {
            if (!has)
                return usage();
            kind = a;
            file = argv[++i];
        } else if (!strcmp(a, "--json-object")) {
            kind = a;
        } else if (!strcmp(a, "--strict")) {
            flags |= ZSE_SCHEMA_STRICT;
        } else if (!strcmp(a, "--precompute")) {
            precompute = true;
        } else if (!strcmp(a, "--bench")) {
            bench = true;
        } else if (!strcmp(a, "-n") && has) {
            n = atoi(argv[++i]);
        } else if (!strcmp(a, "--seed") && has) {
            rng = strtoull(argv[++i], NULL, 10) * 2654435761u + 1;
        } else if (!strcmp(a, "--max-tokens") && has) {
            max_tokens = atoi(argv[++i]);
        } else if (!strcmp(a, "--dump-vocab") && has) {
            dump = argv[++i];
        } else if (!strcmp(a, "--vocab-size") && has) {
            vocab_size = atoi(argv[++i]);
        } else if (a[0] != '-' && !tok_path) {
            tok_path = a;
        } else {
            return usage();
        }
    }
    if (!tok_path || (!kind && !dump) || n < 1 || max_tokens < 1)
        return usage();
    zse_tokenizer *tok = zse_tokenizer_open(tok_path);
    if (!tok) {
        fprintf(stderr, "error: %s\n", zse_error_message());
        return 1;
    }
    double t0 = cpu_now();
    zse_grammar_vocab *v = build_vocab(tok, vocab_size);
    double t_vocab = cpu_now() - t0;
    if (!v) {
        fprintf(stderr, "error: %s\n", zse_error_message());
        return 1;
    }
    if (dump && dump_vocab(v, dump)) {
        fprintf(stderr, "error: cannot write %s\n", dump);
        return 1;
    }
    if (!kind) {
        zse_grammar_vocab_free(v);
        zse_tokenizer_free(tok);
        return 0;
    }
    if (!strcmp(kind, "--schemas")) {
        int rc = run_schema_lines(v, file, n, max_tokens, flags);
        zse_grammar_vocab_free(v);
        zse_tokenizer_free(tok);
        return rc;
    }
    t0 = cpu_now();
    zse_grammar *g = compile(v, kind, file, flags);
    if (g && precompute && zse_grammar_precompute(g)) {
        zse_grammar_release(g);
        g = NULL;
    }
    double t_compile = cpu_now() - t0;
    if (!g) {
        fprintf(stderr, "error: %s\n", zse_error_message());
        zse_grammar_vocab_free(v);
        zse_tokenizer_free(tok);
        return 2;
    }
    bench_stats st = {0};
    if (bench) {
        st.cold = calloc((size_t)max_tokens, sizeof *st.cold);
        st.later = calloc((size_t)n * (size_t)max_tokens, sizeof *st.later);
        if (!st.cold || !st.later) {
            fprintf(stderr, "error: out of memory for the timings\n");
            return 1;
        }
    }
    int rc = sample_outputs(g, v, n, max_tokens, -1, bench ? &st : NULL);
    int ended_count = st.ended;
    int nv = zse_grammar_vocab_size(v);
    double *cold = st.cold, *later = st.later;
    size_t n_cold = st.n_cold, n_later = st.n_later, total_tokens = st.total_tokens;
    if (bench && rc == 0) {
        double cold_sum = 0, sum = 0;
        for (size_t i = 0; i < n_cold; i++)
            cold_sum += cold[i];
        for (size_t i = 0; i < n_later; i++)
            sum += later[i];
        qsort(cold, n_cold, sizeof *cold, cmp_double);
        qsort(later, n_later, sizeof *later, cmp_double);
        printf("{\"vocab\": %d, \"vocab_build_ms\": %.1f, \"compile_ms\": %.2f, \"outputs\": %d, \"ended\": %d, "
               "\"tokens\": %zu, \"cold_mask_us\": {\"p50\": %.1f, \"p99\": %.1f, \"max\": %.1f, \"total_ms\": %.1f}, "
               "\"warm_mask_us\": {\"p50\": %.2f, \"p99\": %.2f, \"max\": %.1f, \"mean\": %.2f}}\n",
               nv, t_vocab * 1e3, t_compile * 1e3, n, ended_count, total_tokens, pct(cold, n_cold, 0.5) * 1e6,
               pct(cold, n_cold, 0.99) * 1e6, n_cold ? cold[n_cold - 1] * 1e6 : 0, cold_sum * 1e3,
               pct(later, n_later, 0.5) * 1e6, pct(later, n_later, 0.99) * 1e6,
               n_later ? later[n_later - 1] * 1e6 : 0, n_later ? sum / (double)n_later * 1e6 : 0);
    }
    free(cold);
    free(later);
    zse_grammar_release(g);
    zse_grammar_vocab_free(v);
    zse_tokenizer_free(tok);
    return rc;
}
