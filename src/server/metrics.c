/* Counters and histograms behind GET /metrics, rendered in the Prometheus text format
 * (version 0.0.4). One mutex guards them: updates are a few adds per request or token
 * batch, far below the cost of the request itself. */
#include "server/server.h"

#include <pthread.h>
#include <string.h>

#define MAX_STATUSES 24          /* distinct status codes counted per route */

static const double TTFT_BUCKETS[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
static const double TPOT_BUCKETS[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
#define N_TTFT (sizeof TTFT_BUCKETS / sizeof TTFT_BUCKETS[0])
#define N_TPOT (sizeof TPOT_BUCKETS / sizeof TPOT_BUCKETS[0])

typedef struct {
    const double *bounds;
    size_t n_bounds;
    uint64_t counts[16];        /* per bucket (not cumulative); the last is +Inf */
    double sum;
    uint64_t n;
} histogram;

typedef struct {
    int status;
    uint64_t count;
} status_count;

struct srv_metrics {
    pthread_mutex_t mu;
    status_count requests[SRV_N_ROUTES][MAX_STATUSES];
    uint64_t prompt_tokens, completion_tokens, rate_limited;
    histogram ttft, tpot;
};

static const char *const ROUTE_NAMES[SRV_N_ROUTES] = {
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/generate", "/generate_stream",
    "/health", "/metrics", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/", "dashboard",
    "/ui/session", "/admin", "/tokenize", "/detokenize", "/tokenizer_info", "/info", "/v1/embeddings", "other",
};

const char *srv_route_name(srv_route r)
{
    return r < SRV_N_ROUTES ? ROUTE_NAMES[r] : "other";
}

srv_metrics *srv_metrics_new(void)
{
    srv_metrics *m = zse_calloc(1, sizeof *m);
    if (!m)
        return NULL;
    pthread_mutex_init(&m->mu, NULL);
    m->ttft.bounds = TTFT_BUCKETS;
    m->ttft.n_bounds = N_TTFT;
    m->tpot.bounds = TPOT_BUCKETS;
    m->tpot.n_bounds = N_TPOT;
    return m;
}

void srv_metrics_free(srv_metrics *m)
{
    if (!m)
        return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void srv_metrics_request(srv_metrics *m, srv_route route, int status)
{
    if (route >= SRV_N_ROUTES)
        route = SRV_ROUTE_OTHER;
    pthread_mutex_lock(&m->mu);
    status_count *row = m->requests[route];
    for (int i = 0; i < MAX_STATUSES; i++) {
        if (row[i].status == status || row[i].status == 0) {
            row[i].status = status;
            row[i].count++;
            break;
        }
    }
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_tokens(srv_metrics *m, int prompt_tokens, int completion_tokens)
{
    pthread_mutex_lock(&m->mu);
    m->prompt_tokens += prompt_tokens > 0 ? (uint64_t)prompt_tokens : 0;
    m->completion_tokens += completion_tokens > 0 ? (uint64_t)completion_tokens : 0;
    pthread_mutex_unlock(&m->mu);
}

static void observe(histogram *h, double v)
{
    size_t i = 0;
    while (i < h->n_bounds && v > h->bounds[i])
        i++;
    h->counts[i]++;
    h->sum += v;
    h->n++;
}

void srv_metrics_ttft(srv_metrics *m, double seconds)
{
    pthread_mutex_lock(&m->mu);
    observe(&m->ttft, seconds);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_tpot(srv_metrics *m, double seconds)
{
    pthread_mutex_lock(&m->mu);
    observe(&m->tpot, seconds);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_rate_limited(srv_metrics *m)
{
    pthread_mutex_lock(&m->mu);
    m->rate_limited++;
    pthread_mutex_unlock(&m->mu);
}

static int render_histogram(zse_buf *out, const char *name, const char *help, const histogram *h)
{
    int rc = zse_buf_printf(out, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (size_t i = 0; i < h->n_bounds && rc == 0; i++) {
        cum += h->counts[i];
        rc = zse_buf_printf(out, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds[i], (unsigned long long)cum);
    }
    if (rc == 0)
        rc = zse_buf_printf(out, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
                            (unsigned long long)h->n, name, h->sum, name, (unsigned long long)h->n);
    return rc;
}

/* the engine's mask-time histogram, at every fourth of its buckets (octaves from 100 ns) */
static int render_mask(zse_buf *out, const zse_mask_stats *m)
{
    const char *name = "zse_grammar_mask_seconds";
    int rc = zse_buf_printf(out, "# HELP %s time to compute one token's grammar mask (constrained decoding)\n"
                                 "# TYPE %s histogram\n", name, name);
    uint64_t cum = 0;
    for (int i = 0; rc == 0 && i < ZSE_MASK_BUCKETS - 1; i++) {
        cum += m->count[i];
        if (i % 4 == 0)
            rc = zse_buf_printf(out, "%s_bucket{le=\"%g\"} %llu\n", name, zse_mask_bucket_le(i), (unsigned long long)cum);
    }
    if (rc == 0)
        rc = zse_buf_printf(out, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9f\n%s_count %llu\n", name,
                            (unsigned long long)m->n, name, m->total_s, name, (unsigned long long)m->n);
    return rc;
}

static int render_gauge(zse_buf *out, const char *name, const char *help, double v)
{
    return zse_buf_printf(out, "# HELP %s %s\n# TYPE %s gauge\n%s %.17g\n", name, help, name, name, v);
}

static int render_counter(zse_buf *out, const char *name, const char *help, uint64_t v)
{
    return zse_buf_printf(out, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name,
                          (unsigned long long)v);
}

int srv_metrics_render(srv_metrics *m, const srv_live_stats *live, zse_buf *out)
{
    pthread_mutex_lock(&m->mu);
    int rc = zse_buf_puts(out, "# HELP zse_requests_total HTTP requests answered, by route and status\n"
                               "# TYPE zse_requests_total counter\n");
    for (int r = 0; r < SRV_N_ROUTES && rc == 0; r++)
        for (int i = 0; i < MAX_STATUSES && m->requests[r][i].status && rc == 0; i++)
            rc = zse_buf_printf(out, "zse_requests_total{route=\"%s\",status=\"%d\"} %llu\n", ROUTE_NAMES[r],
                                m->requests[r][i].status, (unsigned long long)m->requests[r][i].count);
    if (rc == 0)
        rc = render_counter(out, "zse_prompt_tokens_total", "prompt tokens of admitted requests",
                            m->prompt_tokens);
    if (rc == 0)
        rc = render_counter(out, "zse_generation_tokens_total", "tokens generated", m->completion_tokens);
    if (rc == 0)
        rc = render_counter(out, "zse_rate_limit_rejections_total", "requests refused with 429",
                            m->rate_limited);
    if (rc == 0)
        rc = render_histogram(out, "zse_time_to_first_token_seconds",
                              "from the request's arrival to its first generated token", &m->ttft);
    if (rc == 0)
        rc = render_histogram(out, "zse_time_per_output_token_seconds",
                              "mean time between generated tokens of a completed choice", &m->tpot);
    pthread_mutex_unlock(&m->mu);
    const srv_guard_stats *g = &live->guard;
    if (rc == 0)
        rc = render_gauge(out, "zse_model_ready", "1 when the model is loaded and serving", live->ready);
    if (rc == 0)
        rc = render_gauge(out, "zse_http_requests_active", "generation requests in flight", live->active_requests);
    if (rc == 0)
        rc = render_gauge(out, "zse_http_connections", "open HTTP connections", g->open);
    if (rc == 0)
        rc = zse_buf_printf(out,
                            "# HELP zse_http_connections_closed_total connections the server closed: request head or "
                            "body past its deadline, evicted while idle to make room, or half-closed by the client "
                            "with the request unfinished\n"
                            "# TYPE zse_http_connections_closed_total counter\n"
                            "zse_http_connections_closed_total{reason=\"header_timeout\"} %llu\n"
                            "zse_http_connections_closed_total{reason=\"body_timeout\"} %llu\n"
                            "zse_http_connections_closed_total{reason=\"evicted\"} %llu\n"
                            "zse_http_connections_closed_total{reason=\"half_closed\"} %llu\n",
                            (unsigned long long)g->header_timeouts, (unsigned long long)g->body_timeouts,
                            (unsigned long long)g->evicted, (unsigned long long)g->half_closed);
    if (rc == 0)
        rc = render_gauge(out, "zse_http_body_bytes_buffered", "request body bytes held in memory",
                          (double)live->body_bytes);
    if (rc == 0)
        rc = render_counter(out, "zse_refused_requests_total",
                            "requests refused before reaching the API (no valid key, unknown route, bad HTTP)",
                            live->refused);
    if (rc == 0)
        rc = render_counter(out, "zse_refused_requests_unanswered_total",
                            "refused requests closed without an answer: their address was over its budget",
                            g->refused_unanswered);
    if (rc == 0)
        rc = render_counter(out, "zse_audit_rows_dropped_total",
                            "audit rows lost to a full queue or a failed write", live->audit_dropped);
    if (rc == 0 && live->engine) {
        const zse_engine_stats *st = live->engine;
        rc = render_gauge(out, "zse_queue_depth", "sequences waiting: in the server's fair queue and the engine's",
                          st->queued + live->waiting);
        if (rc == 0)
            rc = render_gauge(out, "zse_running_sequences", "sequences the engine is generating", st->running);
        if (rc == 0)
            rc = render_gauge(out, "zse_kv_blocks_used", "KV cache blocks in use", st->kv_blocks_used);
        if (rc == 0)
            rc = render_gauge(out, "zse_kv_blocks_free", "KV cache blocks free",
                              st->kv_blocks_total - st->kv_blocks_used);
        if (rc == 0)
            rc = render_gauge(out, "zse_kv_blocks_capacity", "KV cache blocks in all (used and free)",
                              st->kv_blocks_total);
        if (rc == 0)
            rc = render_counter(out, "zse_preemptions_total", "sequences whose KV was freed to make room",
                                st->preemptions);
        if (rc == 0)
            rc = render_counter(out, "zse_engine_steps_total", "forward passes the engine ran", st->steps);
        if (rc == 0)
            rc = render_counter(out, "zse_fair_waits_total",
                                "sequence-steps sat out because their key had used its share of a step",
                                st->fair_waits);
        if (rc == 0)
            rc = render_gauge(out, "zse_tenants", "keys (or addresses) with sequences in the engine", st->tenants);
        if (rc == 0)
            rc = render_gauge(out, "zse_paused_sequences",
                              "sequences paused because their stream's client is not reading", st->paused);
        if (rc == 0)
            rc = render_gauge(out, "zse_fair_context_cost",
                                "what fair sharing charges for a token of context, in tokens of other work",
                                st->ctx_cost);
        if (rc == 0)
            rc = render_counter(out, "zse_prefix_cache_hit_tokens_total",
                                "prompt tokens whose KV came from the prefix cache", st->prefix_hit_tokens);
        if (rc == 0)
            rc = render_counter(out, "zse_prefix_cache_query_tokens_total",
                                "prompt tokens looked up in the prefix cache", st->prefix_query_tokens);
        if (rc == 0)
            rc = render_gauge(out, "zse_prefix_cache_blocks", "KV blocks published in the prefix cache",
                              st->prefix_cached_blocks);
        if (rc == 0)
            rc = render_counter(out, "zse_spec_draft_tokens_total", "speculative draft tokens checked",
                                st->spec.drafted);
        if (rc == 0)
            rc = render_counter(out, "zse_spec_accepted_tokens_total", "speculative draft tokens accepted",
                                st->spec.accepted);
        if (rc == 0)
            rc = render_counter(out, "zse_spec_verify_passes_total",
                                "sequence passes that checked drafts (tokens per pass = emitted / passes)",
                                st->spec.passes);
        if (rc == 0)
            rc = render_counter(out, "zse_spec_emitted_tokens_total", "tokens those passes produced",
                                st->spec.emitted);
        /* weights in host memory (all zero for a resident model) */
        const struct {
            const char *name, *help;
            uint64_t v;
        } off[] = {
            {"zse_offload_steps_total", "forward passes of a model with weights in host memory", st->offload.steps},
            {"zse_expert_cache_hits_total", "routed experts found in the device's expert cache", st->offload.expert_hits},
            {"zse_expert_fetches_total", "routed experts copied to the device when a step needed them",
             st->offload.expert_fetches},
            {"zse_expert_prefetches_total", "experts copied ahead for the next layer's predicted routing",
             st->offload.expert_prefetches},
            {"zse_expert_prefetch_hits_total", "prefetched experts routed to before they were evicted",
             st->offload.expert_prefetch_hits},
            {"zse_experts_on_host_total", "routed experts computed on the host", st->offload.expert_host},
            {"zse_layers_streamed_total", "streamed layers computed (zStream)", st->offload.layers_streamed},
            {"zse_offload_bytes_total", "bytes copied from host memory to the device (experts and layers)",
             st->offload.bytes_to_device},
        };
        for (size_t i = 0; rc == 0 && i < sizeof off / sizeof off[0]; i++)
            rc = render_counter(out, off[i].name, off[i].help, off[i].v);
    }
    if (rc == 0 && live->mask)
        rc = render_mask(out, live->mask);
    return rc;
}

int srv_memory_metrics(zse_model *m, zse_buf *out)
{
    zse_memory_info mem;
    zse_model_get_memory(m, &mem);
    int rc = zse_buf_printf(out,
                            "# HELP zse_memory_bytes Memory the model holds, by part (on its device; weights on the "
                            "CPU are the mapped file).\n# TYPE zse_memory_bytes gauge\n"
                            "zse_memory_bytes{part=\"weights\"} %llu\nzse_memory_bytes{part=\"kv_cache\"} %llu\n"
                            "zse_memory_bytes{part=\"activations\"} %llu\nzse_memory_bytes{part=\"workspace\"} %llu\n"
                            "zse_memory_bytes{part=\"adapters\"} %llu\n",
                            (unsigned long long)mem.weights, (unsigned long long)mem.kv_cache,
                            (unsigned long long)mem.activations, (unsigned long long)mem.workspace,
                            (unsigned long long)mem.adapters);
    if (rc == 0 && mem.on_device)
        rc = zse_buf_printf(out,
                            "# HELP zse_device_memory_used_bytes The whole device's memory in use (as nvidia-smi "
                            "counts it).\n# TYPE zse_device_memory_used_bytes gauge\nzse_device_memory_used_bytes %llu\n"
                            "# HELP zse_device_memory_capacity_bytes The device's memory.\n"
                            "# TYPE zse_device_memory_capacity_bytes gauge\nzse_device_memory_capacity_bytes %llu\n",
                            (unsigned long long)mem.device_used, (unsigned long long)mem.device_total);
    return rc;
}
