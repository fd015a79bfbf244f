/* zse bench MODEL — prefill and decode speed and peak memory, as a user feels them. */
#include "cli/cli.h"

#include "zse.h"
#include "util/util.h"

#include <pthread.h>
#include <stdio.h>
#include <sys/stat.h>
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


/* a fixed pseudo-random prompt per seed: every run measures the same work */
static void fill_prompt(int32_t *ids, int64_t n, uint32_t seed, int vocab)
{
    uint32_t x = seed;
    for (int64_t i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        ids[i] = (int32_t)((x >> 8) % (uint32_t)vocab);
    }
}

/* the first n tokens of a text file's tokenization, the text repeated as often as needed */
static int prompt_from_file(const zse_model *m, const char *path, int32_t *ids, int64_t n)
{
    size_t len;
    char *text = zse_read_file(path, &len);
    int32_t *all = NULL;
    size_t n_all = 0;
    int rc = text ? zse_tokenize(m, text, len, 0, &all, &n_all) : -1;
    if (rc == 0 && n_all == 0)
        rc = zse_fail("%s holds no tokens", path);
    for (int64_t i = 0; rc == 0 && i < n; i++)
        ids[i] = all[(size_t)i % n_all];
    free(text);
    zse_free(all);
    return rc;
}

/* ---- many sequences at once through the batching engine ----------------------------- */

#define MAX_LEVELS 8

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t done;
    bool constrained;               /* a grammar may end a request before max_tokens */
    int n, remaining, started;      /* requests; not yet ended; that have their first token */
    double t_all_started;           /* when the last request got its first token */
    int64_t tokens, decode_tokens;  /* generated; generated after every request had started */
    bool failed;
} agg_run;

typedef struct {
    agg_run *run;
    bool started;
} agg_slot;

static bool on_token(void *user, const zse_token_event *ev)
{
    agg_slot *slot = user;
    agg_run *r = slot->run;
    pthread_mutex_lock(&r->mu);
    if (ev->token >= 0) {
        r->tokens++;
        if (r->started == r->n)
            r->decode_tokens++;
        if (!slot->started) {
            slot->started = true;
            if (++r->started == r->n)
                r->t_all_started = zse_now();
        }
    }
    if (ev->finish != ZSE_FINISH_NONE) {
        /* ignore_eos with max_tokens ends every request by length (or the grammar by its end) */
        if (ev->finish != ZSE_FINISH_LENGTH && !(r->constrained && ev->finish == ZSE_FINISH_STOP))
            r->failed = true;
        if (--r->remaining == 0)
            pthread_cond_signal(&r->done);
    }
    pthread_mutex_unlock(&r->mu);
    return true;
}

typedef struct {
    int n;
    double wall_s, aggregate_tok_s, decode_tok_s;
    int64_t tokens;
    zse_spec_stats spec;
    zse_mask_stats mask;            /* the run's masks (with --json-schema) */
} agg_result;

/* N requests of n_prompt tokens each (the first `shared` the same for all, the rest
 * distinct), submitted at once, each generating n_gen tokens greedily past end-of-sequence;
 * aggregate tokens/s over the whole run (prefill included) and over the decode phase (after
 * every request had its first token) */
static int run_concurrent(zse_model *m, int n, int64_t n_prompt, int64_t shared, int64_t n_gen, int max_batch_tokens,
                          const zse_spec_params *spec, zse_adapter *const *adapters, int n_adapters,
                          const zse_constraint *constraint, agg_result *out)
{
    zse_model_info info;
    zse_model_get_info(m, &info);
    zse_engine_params ep = {.max_seqs = n, .max_batch_tokens = max_batch_tokens, .max_queue = n, .spec = *spec};
    zse_engine *e = zse_engine_start(m, &ep);
    agg_run r = {.n = n, .remaining = n, .constrained = constraint != NULL};
    zse_mask_stats mask_before;
    zse_model_get_mask_stats(m, &mask_before);
    agg_slot *slots = zse_calloc((size_t)n, sizeof *slots);
    int32_t *ids = zse_malloc((size_t)n_prompt * sizeof *ids);
    if (!e || !slots || !ids) {
        zse_engine_stop(e, 0);
        free(slots);
        free(ids);
        return -1;
    }
    pthread_mutex_init(&r.mu, NULL);
    pthread_cond_init(&r.done, NULL);
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 0;
    s.ignore_eos = true;
    s.max_tokens = (int)n_gen;
    s.constraint = constraint;
    int rc = 0, submitted = 0;
    double t0 = zse_now();
    for (int i = 0; i < n && rc == 0; i++) {
        slots[i].run = &r;
        fill_prompt(ids, shared, 4242u, info.vocab_size);
        fill_prompt(ids + shared, n_prompt - shared, 777u + (uint32_t)i, info.vocab_size);
        s.adapter = n_adapters ? adapters[i % n_adapters] : NULL; /* request i: adapter i of the set, in turn */
        uint64_t id;
        rc = zse_engine_submit(e, ids, (size_t)n_prompt, &s, 0, on_token, &slots[i], &id);
        submitted += rc == 0;
    }
    pthread_mutex_lock(&r.mu);
    r.remaining -= n - submitted; /* those never started */
    while (r.remaining > 0)
        pthread_cond_wait(&r.done, &r.mu);
    double t_end = zse_now();
    pthread_mutex_unlock(&r.mu);
    zse_engine_stats st;
    zse_engine_get_stats(e, &st);
    out->spec = st.spec;
    zse_model_get_mask_stats(m, &out->mask);
    zse_mask_stats_sub(&out->mask, &mask_before);
    zse_engine_stop(e, 0);
    if (rc == 0 && r.failed)
        rc = zse_fail("a request of the concurrent run ended early (not by length)");
    out->n = n;
    out->wall_s = t_end - t0;
    out->tokens = r.tokens;
    out->aggregate_tok_s = (double)r.tokens / out->wall_s;
    out->decode_tok_s = r.started == n && t_end > r.t_all_started ? (double)r.decode_tokens / (t_end - r.t_all_started) : 0;
    if (rc == 0 && (constraint ? r.tokens > (int64_t)n * n_gen : r.tokens != (int64_t)n * n_gen))
        rc = zse_fail("the concurrent run generated %lld tokens, not %lld", (long long)r.tokens,
                      (long long)n * (long long)n_gen);
    pthread_mutex_destroy(&r.mu);
    pthread_cond_destroy(&r.done);
    free(slots);
    free(ids);
    return rc;
}

/* ---- LoRA adapters ------------------------------------------------------------------------- */

#define MAX_BENCH_ADAPTERS 4096

typedef struct {
    zse_adapter *adapters[MAX_BENCH_ADAPTERS];
    int n;
    double register_s;          /* reading them all into host memory */
    double cold_ttft_s, warm_ttft_s; /* an adapter on disk only, then the same again */
} lora_bench;

/* the directory's first n adapters registered (read into host memory, timed) */
static int lora_setup(zse_model *m, const char *dir, int n, lora_bench *lb, char ***names, size_t *n_names)
{
    if (zse_adapter_set_dir(m, dir) != 0 || !(*names = zse_adapter_list(m, n_names)))
        return -1;
    if (*n_names < (size_t)n)
        return zse_fail("--lora-dir %s holds %zu adapters; --lora-adapters asks for %d", dir, *n_names, n);
    double t0 = zse_now();
    for (int i = 0; i < n; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, (*names)[i]);
        struct stat st;
        if (stat(path, &st) != 0)
            snprintf(path, sizeof path, "%s/%s.zsa", dir, (*names)[i]);
        if (zse_adapter_register(m, (*names)[i], path, 1.0f) != 0 || !(lb->adapters[i] = zse_adapter_get(m, (*names)[i])))
            return -1;
        lb->n = i + 1;
    }
    lb->register_s = zse_now() - t0;
    return 0;
}

/* time to first token of one short request whose adapter is read from disk, then again */
static int lora_cold_ttft(zse_model *m, const char *name, lora_bench *lb)
{
    zse_adapter *a = zse_adapter_get(m, name);
    if (!a)
        return -1;
    zse_model_info info;
    zse_model_get_info(m, &info);
    int32_t ids[32];
    const size_t n_ids = info.ctx_size > 34 ? 32 : (size_t)(info.ctx_size > 3 ? info.ctx_size - 2 : 1);
    fill_prompt(ids, (int64_t)n_ids, 4711u, info.vocab_size);
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 0;
    s.adapter = a;
    int rc = 0;
    for (int k = 0; rc == 0 && k < 2; k++) {
        double t = zse_now();
        zse_seq *q = zse_seq_new(m, &s);
        int32_t tok;
        char *piece = NULL;
        zse_finish fin;
        rc = q && zse_seq_feed(q, ids, n_ids) == 0 && zse_seq_next(q, &tok, &piece, &fin) == 0 ? 0 : -1;
        zse_free(piece);
        zse_seq_free(q);
        *(k ? &lb->warm_ttft_s : &lb->cold_ttft_s) = zse_now() - t;
    }
    zse_adapter_release(a);
    return rc;
}

static void print_lora(zse_model *m, const lora_bench *lb, bool as_json)
{
    zse_adapter_stats st;
    zse_adapter_get_stats(m, &st);
    const double host_ms = st.loads_host ? 1e3 * st.load_host_seconds / (double)st.loads_host : 0,
                 slot_ms = st.loads_slot ? 1e3 * st.load_slot_seconds / (double)st.loads_slot : 0,
                 wait_ms = st.waits ? 1e3 * st.wait_seconds / (double)st.waits : 0;
    if (as_json)
        printf(", \"lora\": {\"adapters\": %d, \"slots\": %d, \"host_slots\": %d, \"load_host_ms\": %.3f, "
               "\"load_slot_ms\": %.3f, \"loads_slot\": %llu, \"evictions_slot\": %llu, \"waits\": %llu, "
               "\"wait_ms_mean\": %.3f, \"cold_ttft_s\": %.4f, \"warm_ttft_s\": %.4f}",
               lb->n, st.slots, st.host_slots, host_ms, slot_ms, (unsigned long long)st.loads_slot,
               (unsigned long long)st.evictions_slot, (unsigned long long)st.waits, wait_ms, lb->cold_ttft_s,
               lb->warm_ttft_s);
    else
        printf("lora: %d adapters, %d slots, %d host slots | disk -> host %.3f ms, host -> slot %.3f ms each | %llu "
               "slot loads, %llu evictions | %llu requests waited %.3f ms on average | first token with an adapter "
               "on disk %.4f s, again %.4f s\n",
               lb->n, st.slots, st.host_slots, host_ms, slot_ms, (unsigned long long)st.loads_slot,
               (unsigned long long)st.evictions_slot, (unsigned long long)st.waits, wait_ms, lb->cold_ttft_s,
               lb->warm_ttft_s);
}

/* "8,32,64" -> levels; false on anything else */
static bool parse_levels(const char *text, int *levels, int *n)
{
    *n = 0;
    for (const char *p = text; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > 4096 || *n == MAX_LEVELS || (*end && *end != ','))
            return false;
        levels[(*n)++] = (int)v;
        p = *end ? end + 1 : end;
    }
    return *n > 0;
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: zse bench MODEL.zse [--prompt-tokens N] [--gen-tokens N] [--ctx N] [--threads N]\n"
            "                 [--kv-cache f16|int8] [--device D] [--gpu-memory SIZE] [--concurrency N[,N...]]\n"
            "                 [--batch-prompt-tokens N] [--batch-gen-tokens N] [--max-batch-tokens N]\n"
            "                 [--prefix-cache] [--shared-prefix N] [--prompt-file F] [--json-schema F] [--json]\n\n"
            "Feeds N prompt tokens (prefill), then generates greedily past end-of-sequence\n"
            "(decode), and reports tokens/s for each, load time, peak resident memory and the\n"
            "memory the model holds (weights, KV cache, activations; on a GPU also what the\n"
            "device has in use). A model larger than --gpu-memory (or the GPU) keeps experts or\n"
            "layers in host memory: bench says where, and per step of the prefill and the decode\n"
            "how many experts hit the device cache, were fetched, ran on the host, and how many\n"
            "layers streamed. --ctx sizes the KV cache for that context (default: the\n"
            "prompt plus the generated tokens). --concurrency runs N requests of\n"
            "--batch-prompt-tokens + --batch-gen-tokens (default 128 + 128) at once through\n"
            "the batching engine (as zse serve does) and reports aggregate generated tokens/s,\n"
            "over the whole run and over its decode phase.\n"
            "The prefix cache is off unless --prefix-cache: then the prompt is fed twice and\n"
            "the time to first token of each is reported (the second finds the first's KV), and\n"
            "--shared-prefix N makes the concurrent requests' first N prompt tokens the same.\n"
            "The single-sequence prompt is random tokens, or the first N tokens of --prompt-file.\n"
            "With speculative decoding the decode figures are effective tokens/s, with the\n"
            "acceptance rate and tokens per verification pass beside them.\n"
            "--json-schema F decodes every sequence under that JSON Schema (constrained decoding;\n"
            "give one whose outputs run long, e.g. an array without maxItems: a grammar that\n"
            "ends stops its sequence early) and reports the time each token's mask took to\n"
            "compute (p50, p99, mean); run without it for the unconstrained figures.\n\n" CLI_SPEC_HELP
            "LoRA adapters (the figures are then for adapted sequences):\n"
            "  --lora PATH             every sequence runs this adapter (PEFT directory or .zsa)\n"
            "  --lora-dir DIR --lora-adapters N\n"
            "                          the concurrent runs' request i takes adapter i mod N of the first N\n"
            "                          in DIR (registered first: in host memory); with one more in DIR, the\n"
            "                          time to first token of a request whose adapter is on disk only\n"
            "  --max-gpu-loras N, --max-cpu-loras M, --max-lora-rank R   as for zse serve\n");
}

static void print_spec(const zse_spec_stats *st, bool as_json)
{
    double rate = st->drafted ? (double)st->accepted / (double)st->drafted : 0;
    double per_pass = st->passes ? (double)st->emitted / (double)st->passes : 0;
    if (as_json)
        printf("\"spec\": {\"drafted\": %llu, \"accepted\": %llu, \"acceptance\": %.4f, \"tokens_per_pass\": %.3f}",
               (unsigned long long)st->drafted, (unsigned long long)st->accepted, rate, per_pass);
    else
        printf("speculative: %llu drafted, %llu accepted (%.1f%%), %.2f tokens per verification pass",
               (unsigned long long)st->drafted, (unsigned long long)st->accepted, 100 * rate, per_pass);
}

/* what the weights kept in host memory did over a phase (stats `a` then `b`), per step */
typedef struct {
    double steps, hits, fetched, prefetched, prefetch_hits, host, layers, mb;
} offload_phase;

static offload_phase phase_of(const zse_offload_stats *a, const zse_offload_stats *b)
{
    offload_phase p = {0};
    p.steps = (double)(b->steps - a->steps);
    const double n = p.steps > 0 ? p.steps : 1;
    p.hits = (double)(b->expert_hits - a->expert_hits) / n;
    p.fetched = (double)(b->expert_fetches - a->expert_fetches) / n;
    p.prefetched = (double)(b->expert_prefetches - a->expert_prefetches) / n;
    p.prefetch_hits = (double)(b->expert_prefetch_hits - a->expert_prefetch_hits) / n;
    p.host = (double)(b->expert_host - a->expert_host) / n;
    p.layers = (double)(b->layers_streamed - a->layers_streamed) / n;
    p.mb = (double)(b->bytes_to_device - a->bytes_to_device) / n / (1024.0 * 1024.0);
    return p;
}

static void print_phase(const char *name, const offload_phase *p, bool as_json)
{
    if (as_json) {
        printf("\"%s\": {\"steps\": %.0f, \"experts_hit\": %.2f, \"experts_fetched\": %.2f, \"experts_prefetched\": "
               "%.2f, \"prefetch_hits\": %.2f, \"experts_on_host\": %.2f, \"layers_streamed\": %.2f, "
               "\"mb_to_device\": %.1f}",
               name, p->steps, p->hits, p->fetched, p->prefetched, p->prefetch_hits, p->host, p->layers, p->mb);
        return;
    }
    printf("%s, per step (%.0f steps): ", name, p->steps);
    if (p->hits + p->fetched + p->host > 0)
        printf("experts %.1f hit, %.1f fetched, %.1f computed on the host, %.1f prefetched (%.1f of them routed to); ",
               p->hits, p->fetched, p->host, p->prefetched, p->prefetch_hits);
    if (p->layers > 0)
        printf("%.1f layers streamed; ", p->layers);
    printf("%.1f MB to the device\n", p->mb);
}

/* the JSON Schema in path, compiled against the model (not strict) */
static zse_constraint *compile_schema(zse_model *m, const char *path)
{
    size_t len;
    char *text = zse_read_file(path, &len);
    if (!text)
        return NULL;
    zse_constraint *c = zse_constraint_json_schema(m, text, len, false);
    if (!c)
        zse_fail("--json-schema %s: %s", path, zse_last_error());
    free(text);
    return c;
}

/* the prompt and n_gen tokens generated under the sequence's constraint */
static int warm_constraint(zse_seq *q, const int32_t *ids, int64_t n_prompt, int64_t n_gen)
{
    if (zse_seq_feed(q, ids, (size_t)n_prompt) != 0)
        return -1;
    for (int64_t i = 0; i < n_gen; i++) {
        int32_t tok;
        char *piece;
        zse_finish fin;
        if (zse_seq_next(q, &tok, &piece, &fin) != 0)
            return -1;
        zse_free(piece);
        if (fin != ZSE_FINISH_NONE)
            break;
    }
    return 0;
}

/* each token's mask compute time (the grammar matcher, not applying it) */
static void print_mask(const zse_mask_stats *st, bool as_json)
{
    const double p50 = 1e6 * zse_mask_stats_quantile(st, 0.5), p99 = 1e6 * zse_mask_stats_quantile(st, 0.99),
                 mean = st->n ? 1e6 * st->total_s / (double)st->n : 0;
    if (as_json)
        printf(", \"mask_us\": {\"masks\": %llu, \"p50\": %.2f, \"p99\": %.2f, \"mean\": %.2f}",
               (unsigned long long)st->n, p50, p99, mean);
    else
        printf("mask per token: %llu masks, p50 %.2f us, p99 %.2f us, mean %.2f us", (unsigned long long)st->n, p50, p99,
               mean);
}

static void print_memory(const zse_memory_info *mem, bool as_json)
{
    double mb = 1024.0 * 1024.0;
    const bool offloaded = strcmp(mem->placement, "resident") != 0;
    if (as_json) {
        printf(", \"placement\": {\"mode\": \"%s\", \"layers_resident\": %d, \"layers_streamed\": %d, "
               "\"experts_cached\": %d, \"experts_total\": %d}",
               mem->placement, mem->layers_resident, mem->layers_streamed, mem->experts_cached, mem->experts_total);
        printf(", \"memory_mb\": {\"weights\": %.1f, \"kv_cache\": %.1f, \"activations\": %.1f, "
               "\"workspace\": %.1f, \"stream_buffers\": %.1f, \"expert_cache\": %.1f, \"host_pinned\": %.1f",
               (double)mem->weights / mb, (double)mem->kv_cache / mb, (double)mem->activations / mb,
               (double)mem->workspace / mb, (double)mem->stream_buffers / mb, (double)mem->expert_cache / mb,
               (double)mem->host_pinned / mb);
        if (mem->on_device)
            printf(", \"device_used\": %.1f, \"device_other\": %.1f, \"device_total\": %.1f",
                   (double)mem->device_used / mb, (double)mem->device_other / mb, (double)mem->device_total / mb);
        printf("}");
        return;
    }
    if (offloaded && mem->layers_streamed)
        printf("placement: streamed, %d of %d layers resident, %d streamed through %.1f MB of layer buffers; %.1f MB "
               "pinned in host memory\n", mem->layers_resident, mem->layers_resident + mem->layers_streamed,
               mem->layers_streamed, (double)mem->stream_buffers / mb, (double)mem->host_pinned / mb);
    else if (offloaded)
        printf("placement: experts offloaded, %d of %d experts cached on the device (%.1f MB); %.1f MB pinned in host "
               "memory\n", mem->experts_cached, mem->experts_total, (double)mem->expert_cache / mb,
               (double)mem->host_pinned / mb);
    printf("memory: weights %.1f MB, KV cache %.1f MB, activations %.1f MB, workspace %.1f MB", (double)mem->weights / mb,
           (double)mem->kv_cache / mb, (double)mem->activations / mb, (double)mem->workspace / mb);
    if (mem->on_device)
        printf(" | device in use %.1f MB (CUDA context, libraries and other processes: %.1f MB) of %.1f MB",
               (double)mem->device_used / mb, (double)mem->device_other / mb, (double)mem->device_total / mb);
    printf("\n");
}

int cmd_bench(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *path = NULL, *kv = "f16", *levels_text = NULL, *prompt_file = NULL, *schema_file = NULL;
    int64_t n_prompt = 512, n_gen = 128, threads = 0, ctx = 0, b_prompt = 128, b_gen = 128, max_batch = 512;
    int64_t shared = 0;
    bool as_json = false, prefix_cache = false;
    const char *lora_path = NULL, *lora_dir = NULL;
    int64_t lora_count = 0, gpu_loras = 0, cpu_loras = 0, lora_rank = 0;
    zse_load_params lp;
    zse_load_params_default(&lp);
    cli_spec spec_flags = {0};
    zse_spec_params spec;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_spec_arg(&a, &spec_flags)) continue;
        else if (cli_is(&a, NULL, "--prompt-tokens")) cli_int(&a, 1, 1 << 20, &n_prompt);
        else if (cli_is(&a, NULL, "--prompt-file")) prompt_file = cli_value(&a);
        else if (cli_is(&a, NULL, "--gen-tokens")) cli_int(&a, 1, 1 << 20, &n_gen);
        else if (cli_is(&a, NULL, "--ctx")) cli_int(&a, 1, 1 << 24, &ctx);
        else if (cli_is(&a, NULL, "--threads")) cli_int(&a, 1, 1024, &threads);
        else if (cli_is(&a, NULL, "--kv-cache")) kv = cli_value(&a);
        else if (cli_is(&a, NULL, "--device")) lp.device = cli_value(&a);
        else if (cli_is(&a, NULL, "--gpu-memory")) cli_size(&a, 1ull << 20, &lp.gpu_memory);
        else if (cli_is(&a, NULL, "--concurrency")) levels_text = cli_value(&a);
        else if (cli_is(&a, NULL, "--batch-prompt-tokens")) cli_int(&a, 1, 1 << 20, &b_prompt);
        else if (cli_is(&a, NULL, "--batch-gen-tokens")) cli_int(&a, 1, 1 << 20, &b_gen);
        else if (cli_is(&a, NULL, "--max-batch-tokens")) cli_int(&a, 1, 1 << 20, &max_batch);
        else if (cli_is(&a, NULL, "--prefix-cache")) prefix_cache = true;
        else if (cli_is(&a, NULL, "--shared-prefix")) cli_int(&a, 0, 1 << 20, &shared);
        else if (cli_is(&a, NULL, "--json")) as_json = true;
        else if (cli_is(&a, NULL, "--json-schema")) schema_file = cli_value(&a);
        else if (cli_is(&a, NULL, "--lora")) lora_path = cli_value(&a);
        else if (cli_is(&a, NULL, "--lora-dir")) lora_dir = cli_value(&a);
        else if (cli_is(&a, NULL, "--lora-adapters")) cli_int(&a, 1, 4096, &lora_count);
        else if (cli_is(&a, NULL, "--max-gpu-loras")) cli_int(&a, 1, 4096, &gpu_loras);
        else if (cli_is(&a, NULL, "--max-cpu-loras")) cli_int(&a, 1, 65536, &cpu_loras);
        else if (cli_is(&a, NULL, "--max-lora-rank")) cli_int(&a, 1, 128, &lora_rank);
        else if (cli_positional(&a) && !path) path = a.arg;
        else return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!path) {
        usage(stderr);
        return 2;
    }
    if (!kv || (strcmp(kv, "f16") != 0 && strcmp(kv, "int8") != 0)) {
        fprintf(stderr, "zse bench: --kv-cache takes f16 or int8\n");
        return 2;
    }
    if (cli_spec_parse(&spec_flags, &spec, "bench") != 0)
        return 2;
    if (shared > b_prompt || (shared && !levels_text)) {
        fprintf(stderr, "zse bench: --shared-prefix takes at most --batch-prompt-tokens (%lld) and needs --concurrency\n",
                (long long)b_prompt);
        return 2;
    }
    int levels[MAX_LEVELS], n_levels = 0, max_level = 1;
    if (levels_text && !parse_levels(levels_text, levels, &n_levels)) {
        fprintf(stderr, "zse bench: --concurrency takes up to %d counts from 1 to 4096, like 8,32,64\n", MAX_LEVELS);
        return 2;
    }
    for (int i = 0; i < n_levels; i++)
        max_level = levels[i] > max_level ? levels[i] : max_level;
    if (!lora_dir != !lora_count || (lora_dir && lora_path) || ((gpu_loras || cpu_loras || lora_rank) && !lora_dir && !lora_path)) {
        fprintf(stderr, "zse bench: --lora-dir and --lora-adapters go together (and not with --lora); --max-*-loras and "
                        "--max-lora-rank need adapters\n");
        return 2;
    }
    char **dir_names = NULL; /* the adapter directory's first names */
    size_t n_dir = 0;
    if (lora_path || lora_dir) {
        int rank = 16, r;
        if (lora_path && zse_adapter_probe(lora_path, &r) != 0) {
            fprintf(stderr, "zse bench: --lora: %s\n", zse_last_error());
            return 2;
        }
        if (lora_path)
            rank = r;
        lp.max_loras = gpu_loras ? (int)gpu_loras : lora_path ? 1 : 8;
        lp.max_cpu_loras = cpu_loras ? (int)cpu_loras : lora_count > lp.max_loras ? (int)lora_count : lp.max_loras;
        lp.max_lora_rank = lora_rank ? (int)lora_rank : rank;
    }
    lp.threads = (int)threads;
    lp.kv_type = strcmp(kv, "int8") == 0 ? ZSE_KV_INT8 : ZSE_KV_F16;
    int64_t need = n_prompt + n_gen + 1;
    if (n_levels && b_prompt + b_gen + 1 > need)
        need = b_prompt + b_gen + 1;
    if (ctx && ctx < need) {
        fprintf(stderr, "zse bench: --ctx %lld is shorter than the %lld tokens the run needs\n", (long long)ctx,
                (long long)need);
        return 2;
    }
    lp.ctx_size = (int)(ctx ? ctx : need);
    lp.max_seqs = max_level;
    /* the figures are compute: a repeated prompt must not come from the cache */
    lp.no_prefix_cache = !prefix_cache;
    zse_model *draft = NULL;
    if (cli_spec_load_draft(&spec_flags, &lp, &draft, &spec) != 0)
        return cli_error("bench");
    double t0 = zse_now();
    zse_model *m = zse_model_load(path, &lp);
    if (!m) {
        zse_model_free(draft);
        return cli_error("bench");
    }
    double t_load = zse_now() - t0;
    zse_model_info info;
    zse_model_get_info(m, &info);
    if (need > info.ctx_size) {
        zse_model_free(m);
        zse_model_free(draft);
        fprintf(stderr, "zse bench: the run needs %lld tokens of context; the model has %d\n", (long long)need,
                info.ctx_size);
        return 2;
    }
    int32_t *ids = zse_malloc((size_t)n_prompt * sizeof *ids);
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 0;
    s.ignore_eos = true;
    s.max_tokens = (int)n_gen;
    zse_seq *q = NULL;
    agg_result agg[MAX_LEVELS];
    int rc = 1;
    zse_constraint *constraint = NULL;
    zse_mask_stats mask_decode = {0};
    lora_bench lb = {0};
    if (lora_path && !(lb.adapters[0] = zse_adapter_open(m, lora_path, 1.0f)))
        goto done;
    lb.n = lora_path ? 1 : 0;
    if (lora_dir && lora_setup(m, lora_dir, (int)lora_count, &lb, &dir_names, &n_dir) != 0)
        goto done;
    if (schema_file && !(constraint = compile_schema(m, schema_file)))
        goto done;
    s.constraint = constraint;
    s.adapter = lora_path ? lb.adapters[0] : NULL;
    q = ids ? zse_seq_new(m, &s) : NULL;
    if (!q || zse_seq_set_spec(q, &spec) != 0)
        goto done;
    fill_prompt(ids, n_prompt, 12345u, info.vocab_size);
    /* warm-up, as llama-bench does: the prompt and one more token through the model fault
     * the mapped weights in and let a GPU finish its lazy setup (cuBLAS, kernels of both
     * the prefill and the decode path), so the figures below are steady-state speeds;
     * load_s and a server's first request pay it instead */
    double tw = zse_now();
    /* with the cache on, the warm-up runs another prompt: the one measured is not cached */
    if (prefix_cache)
        fill_prompt(ids, n_prompt, 999u, info.vocab_size);
    else if (prompt_file && prompt_from_file(m, prompt_file, ids, n_prompt) != 0)
        goto done;
    if (zse_seq_feed(q, ids, (size_t)n_prompt) != 0 || zse_seq_feed(q, ids, 1) != 0 || zse_seq_truncate(q, 0) != 0)
        goto done;
    if (prompt_file ? prompt_from_file(m, prompt_file, ids, n_prompt) != 0 : (fill_prompt(ids, n_prompt, 12345u, info.vocab_size), 0))
        goto done;
    /* a grammar classifies the vocabulary at each of its positions the first time one is
     * reached (docs/GRAMMAR.md): one output under it first, so the figures are those of a
     * grammar in use (a server caches it), not of its first outputs */
    if (constraint && (warm_constraint(q, ids, n_prompt, n_gen) != 0 || zse_seq_truncate(q, 0) != 0))
        goto done;
    double t_warm = zse_now() - tw;
    double ttft[2] = {0, 0}; /* --prefix-cache: the prompt's first and repeated time to first token */
    for (int k = 0; prefix_cache && k < 2; k++) {
        double t = zse_now();
        int32_t tok;
        char *piece;
        zse_finish fin;
        if (zse_seq_feed(q, ids, (size_t)n_prompt) != 0 || zse_seq_next(q, &tok, &piece, &fin) != 0)
            goto done;
        zse_free(piece);
        ttft[k] = zse_now() - t;
        if (zse_seq_truncate(q, 0) != 0)
            goto done;
    }
    /* the prefill figure is compute: with the cache on, a prompt it has not seen */
    if (prefix_cache)
        fill_prompt(ids, n_prompt, 5151u, info.vocab_size);
    zse_offload_stats off0, off1, off2;
    zse_model_get_offload_stats(m, &off0);
    double t1 = zse_now();
    if (zse_seq_feed(q, ids, (size_t)n_prompt) != 0)
        goto done;
    double t_prefill = zse_now() - t1;
    zse_mask_stats mask_before;
    zse_model_get_mask_stats(m, &mask_before);
    zse_model_get_offload_stats(m, &off1);
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
    zse_model_get_mask_stats(m, &mask_decode);
    zse_mask_stats_sub(&mask_decode, &mask_before);
    zse_model_get_offload_stats(m, &off2);
    const offload_phase prefill_off = phase_of(&off0, &off1), decode_off = phase_of(&off1, &off2);
    zse_spec_stats sst;
    zse_seq_get_spec_stats(q, &sst);
    zse_memory_info mem;
    zse_model_get_memory(m, &mem);
    zse_seq_free(q); /* its KV blocks go back for the concurrent runs */
    q = NULL;
    for (int i = 0; i < n_levels; i++)
        if (run_concurrent(m, levels[i], b_prompt, shared, b_gen, (int)max_batch, &spec, lb.adapters, lb.n, constraint,
                           &agg[i]) != 0)
            goto done;
    if (lora_dir && n_dir > (size_t)lora_count && lora_cold_ttft(m, dir_names[lora_count], &lb) != 0)
        goto done;
    double pp = (double)n_prompt / t_prefill, tg = produced / t_decode;
    if (as_json) {
        printf("{\"model\": \"%s\", \"device\": \"%s\", \"quant\": \"%s\", \"load_s\": %.3f, \"warmup_s\": %.3f, \"ctx\": %d, "
               "\"prompt_tokens\": %lld, \"prefill_tok_s\": %.2f, \"gen_tokens\": %d, \"decode_tok_s\": %.2f, "
               "\"peak_rss_mb\": %.1f",
               info.name, info.device, info.quant, t_load, t_warm, info.ctx_size, (long long)n_prompt, pp, produced,
               tg, peak_rss_mb());
        print_memory(&mem, true);
        if (off2.steps) {
            printf(", \"offload\": {");
            print_phase("prefill", &prefill_off, true);
            printf(", ");
            print_phase("decode", &decode_off, true);
            printf("}");
        }
        if (prefix_cache)
            printf(", \"prefix_cache\": {\"ttft_first_s\": %.4f, \"ttft_repeat_s\": %.4f}", ttft[0], ttft[1]);
        if (constraint)
            print_mask(&mask_decode, true);
        if (spec.mode != ZSE_SPEC_OFF) {
            printf(", ");
            print_spec(&sst, true);
        }
        if (lb.n)
            print_lora(m, &lb, true);
        if (n_levels) {
            printf(", \"concurrent\": [");
            for (int i = 0; i < n_levels; i++) {
                printf("%s{\"sequences\": %d, \"prompt_tokens\": %lld, \"shared_prefix\": %lld, \"gen_tokens\": %lld, "
                       "\"wall_s\": %.3f, \"aggregate_tok_s\": %.1f, \"decode_phase_tok_s\": %.1f",
                       i ? ", " : "", agg[i].n, (long long)b_prompt, (long long)shared, (long long)b_gen,
                       agg[i].wall_s, agg[i].aggregate_tok_s, agg[i].decode_tok_s);
                if (spec.mode != ZSE_SPEC_OFF) {
                    printf(", ");
                    print_spec(&agg[i].spec, true);
                }
                if (constraint)
                    print_mask(&agg[i].mask, true);
                printf("}");
            }
            printf("]");
        }
        printf("}\n");
    } else {
        printf("%s (%s, %s): load %.3f s, warm-up %.3f s | prefill %lld tokens %.2f tok/s | decode %d tokens %.2f "
               "tok/s | peak RSS %.1f MB\n",
               info.name, info.device, info.quant, t_load, t_warm, (long long)n_prompt, pp, produced, tg, peak_rss_mb());
        print_memory(&mem, false);
        if (off2.steps) {
            print_phase("prefill", &prefill_off, false);
            print_phase("decode", &decode_off, false);
        }
        if (prefix_cache)
            printf("prefix cache: time to first token %.4f s, the same prompt again %.4f s\n", ttft[0], ttft[1]);
        if (constraint) {
            print_mask(&mask_decode, false);
            printf("\n");
        }
        if (spec.mode != ZSE_SPEC_OFF) {
            print_spec(&sst, false);
            printf("\n");
        }
        if (lb.n)
            print_lora(m, &lb, false);
        for (int i = 0; i < n_levels; i++) {
            printf("%d sequences x (%lld + %lld tokens): %.3f s, %.1f tok/s generated overall, %.1f tok/s in the "
                   "decode phase",
                   agg[i].n, (long long)b_prompt, (long long)b_gen, agg[i].wall_s, agg[i].aggregate_tok_s,
                   agg[i].decode_tok_s);
            if (spec.mode != ZSE_SPEC_OFF) {
                printf(" | ");
                print_spec(&agg[i].spec, false);
            }
            if (constraint) {
                printf(" | ");
                print_mask(&agg[i].mask, false);
            }
            printf("\n");
        }
    }
    rc = 0;
done:
    if (rc)
        cli_error("bench");
    zse_seq_free(q);
    zse_constraint_free(constraint);
    for (int i = 0; i < lb.n; i++)
        zse_adapter_release(lb.adapters[i]);
    for (size_t i = 0; i < n_dir; i++)
        zse_free(dir_names[i]);
    zse_free(dir_names);
    free(ids);
    zse_model_free(m);
    zse_model_free(draft);
    return rc;
}
