/* zse serve — the model behind an OpenAI-compatible (and TGI) HTTP API. The listener comes
 * up first and answers 503 "loading" while the model loads; SIGTERM or SIGINT drain it. */
#include "cli/cli.h"

#include "format/format.h"
#include "server/server.h"
#include "util/util.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

const char cmd_serve_summary[] = "serve a model over an OpenAI-compatible HTTP API";

static void usage(FILE *out)
{
    fprintf(out,
            "usage: zse serve MODEL.zse [options]\n\n"
            "HTTP:\n"
            "  --host ADDR             address to listen on (default 127.0.0.1)\n"
            "  --port N                port (default 8000; 0 picks a free one)\n"
            "  --model-id NAME         the model's id in the API (default: the file name)\n"
            "  --served-model-name NAME [NAME ...]  names requests may use for the model (the first is\n"
            "                          the id answers give; /v1/models lists each); instead of --model-id\n"
            "  --chat-template FILE    a Jinja chat template replacing the model's\n"
            "  --pooling last|mean     /v1/embeddings: the last token's hidden state (default, as for\n"
            "                          causal LMs) or the mean over the tokens"
            "  --max-body SIZE         largest request body (default 4M)\n"
            "  --max-buffered SIZE     request body bytes held across all connections (default 256M)\n"
            "  --max-connections N     open connections at most (default 1024)\n"
            "  --max-connections-per-ip N  open connections from one address (default 128; 0 = no cap)\n"
            "  --timeout S             close connections idle this long (default 60)\n"
            "  --header-timeout S      a request head must arrive within S of the connection or the\n"
            "                          previous answer, however steadily it trickles (default 30)\n"
            "  --body-timeout S        a request body must arrive within S of its head (default 60)\n"
            "  --max-refused-per-ip N  refused requests (no key, unknown route, bad HTTP) answered per\n"
            "                          address and minute; beyond, no answer (default 600; 0 = all)\n"
            "  --http-threads N        threads polling connections (default 4)\n"
            "  --workers N             threads parsing, templating and tokenizing requests (default 2;\n"
            "                          half as many more, at the lowest priority, for bodies of 64 KB and more)\n"
            "  --cors ORIGIN           send CORS headers allowing ORIGIN (\"*\" for any)\n"
            "  --tls-cert PEM --tls-key PEM   serve HTTPS\n"
            "Keys and audit:\n"
            "  --auth                  require 'Authorization: Bearer KEY' (zse api-key create)\n"
            "  --api-key KEY           accept this one key besides the database's (turns on --auth)\n"
            "  --db PATH               key and audit database (default $ZSE_DB or ~/.local/share/zse/zse.db)\n"
            "  --no-audit              do not record requests\n"
            "  --audit-retention D     drop audit rows older than D (default 30d; 0 keeps all)\n"
            "  --audit-max-rows N      keep at most N audit rows (default 1000000; 0 = no cap)\n"
            "Engine:\n"
            "  --max-seqs N            sequences generated together (default 16)\n"
            "  --max-batch-tokens N    tokens per step; long prompts are prefilled in chunks (default 512)\n"
            "  --max-queue N           sequences waiting at most; beyond, 503 (default 256)\n"
            "  --max-seqs-per-key N    sequences one key has in the engine, running or waiting there\n"
            "                          (one address without --auth)\n"
            "                          (default: all but an eighth of --max-seqs)\n"
            "  --max-queued-tokens-per-key N  prompt + completion tokens one key may have waiting;\n"
            "                          beyond, 429 (default: --max-seqs full contexts)\n"
            "  --ctx N                 context length (default: the model's)\n"
            "  --kv-cache f16|int8     KV cache storage (default f16)\n"
            "  --kv-cache-size SIZE    KV cache budget (default: max-seqs full contexts)\n"
            "  --no-prefix-cache       never reuse the KV of earlier prompts (default: full 16-token\n"
            "                          blocks of a shared prefix are computed once)\n"
            "  --no-fair-share         run every sequence every step: no key's sequences sit out so\n"
            "                          that others get their share of compute (default: a key taking\n"
            "                          more than twice the median's is held to the largest other's)\n"
            "  --threads N             CPU threads (default: physical cores)\n"
            "  --device cpu|cuda|cuda:N\n"
            "  --gpu-memory SIZE       GPU memory for weights, KV cache and activations (default: what is free);\n"
            "                          the KV cache gets what the rest leaves\n"
            CLI_SPEC_HELP
            "LoRA adapters (docs/SERVER.md):\n"
            "  --lora NAME=PATH        serve an adapter (PEFT directory or .zsa) as model NAME (repeatable)\n"
            "  --lora-dir DIR          every subfolder (or NAME.zsa) of DIR is an adapter, loaded on first use\n"
            "  --max-gpu-loras N       adapters that can run at once: slots on the device (default 8 with adapters)\n"
            "  --max-cpu-loras M       adapters kept in (pinned) host memory besides (default: N, or every --lora)\n"
            "  --max-lora-rank R       a slot holds rank R on every projection (default: the largest rank of the\n"
            "                          adapters found at start, at least 16)\n"
            "  --allow-lora-loading    answer POST /v1/load_lora_adapter and /v1/unload_lora_adapter\n"
            "Tool calls (docs/SERVER.md):\n"
            "  --tool-parser NAME      how tool calls are read from the model's output: hermes, llama3_json,\n"
            "                          mistral, json, or none (never parsed) (default: from the chat template)\n"
            "Lifecycle:\n"
            "  --shutdown-timeout S    on SIGTERM/SIGINT, let running requests finish this long (default 30)\n"
            "  --quiet                 no per-request log lines\n"
            "Every flag can come from the environment: --max-seqs 8 is ZSE_MAX_SEQS=8, --auth is\n"
            "ZSE_AUTH=1, --lora takes space-separated NAME=PATH items, ZSE_MODEL is MODEL.zse.\n"
            "A flag on the command line wins over its variable.\n");
}

typedef struct {
    const char *model_path;
    zse_load_params load;
    zse_engine_params engine;
    cli_spec spec_flags;
    zse_model *model;
    zse_model *draft;           /* --draft: the speculative decoding draft model */
    zse_engine *eng;
    const char *lora_names[64], *lora_paths[64]; /* --lora NAME=PATH */
    int n_lora;
    const char *lora_dir;
    bool lora_wanted;           /* any adapter flag: the model gets adapter slots */
    const char *chat_template_path;     /* --chat-template FILE */
    char *chat_template;                /* its text, read before loading */
    bool done, failed;
    char error[ZSE_ERROR_MAX];
    pthread_mutex_t mu;
} loader;

/* --chat-template: replaces the model's template, which must render a conversation now
 * (a syntax error stops the server at start, not at the first request) */
static int use_chat_template(zse_model *m, const loader *l)
{
    if (zse_model_set_chat_template(m, l->chat_template) != 0)
        return -1;
    char *probe = zse_chat_render(m, "[{\"role\":\"user\",\"content\":\"hi\"}]", NULL, true);
    if (!probe) {
        zse_error_prefix("--chat-template %s", l->chat_template_path);
        return -1;
    }
    free(probe);
    return 0;
}

static void *load_main(void *arg)
{
    loader *l = arg;
    /* a draft model loads first: the model's KV cache is sized for what it leaves */
    zse_model *m = cli_spec_load_draft(&l->spec_flags, &l->load, &l->draft, &l->engine.spec) == 0
                       ? zse_model_load(l->model_path, &l->load)
                       : NULL;
    if (m && l->chat_template && use_chat_template(m, l) != 0) {
        zse_model_free(m);
        m = NULL;
    }
    /* the --lora adapters are read and checked now: a bad one stops the server at start */
    bool adapters_ok = m != NULL;
    for (int i = 0; adapters_ok && i < l->n_lora; i++)
        if (zse_adapter_register(m, l->lora_names[i], l->lora_paths[i], 1.0f) != 0) {
            zse_error_prefix("--lora %s=%s", l->lora_names[i], l->lora_paths[i]);
            adapters_ok = false;
        }
    if (adapters_ok && l->lora_dir && zse_adapter_set_dir(m, l->lora_dir) != 0) {
        zse_error_prefix("--lora-dir");
        adapters_ok = false;
    }
    zse_engine *e = adapters_ok ? zse_engine_start(m, &l->engine) : NULL;
    pthread_mutex_lock(&l->mu);
    l->model = m;
    l->eng = e;
    l->failed = !e;
    if (!e)
        snprintf(l->error, sizeof l->error, "%s", zse_last_error());
    l->done = true;
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

/* the engine behind the server's generator interface */
static int engine_submit(void *ctx, const char *tenant, const int32_t *prompt, size_t n, const zse_sampling *s,
                         int priority, zse_token_cb cb, void *user, uint64_t *id)
{
    return zse_engine_submit_for(ctx, tenant, prompt, n, s, priority, cb, user, id);
}

static void engine_cancel(void *ctx, uint64_t id) { zse_engine_cancel(ctx, id); }
static void engine_stats(void *ctx, zse_engine_stats *out) { zse_engine_get_stats(ctx, out); }
static void engine_pause(void *ctx, uint64_t id, bool paused) { zse_engine_pause(ctx, id, paused); }

/* the file name without folders and ".zse" */
static char *default_model_id(const char *path)
{
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t n = strlen(base);
    if (n > 4 && strcmp(base + n - 4, ".zse") == 0)
        n -= 4;
    return zse_strndup(base, n);
}

/* waits up to `seconds` for SIGINT/SIGTERM (blocked in every thread); the signal or 0 */
static int wait_signal(const sigset_t *set, double seconds)
{
    struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    int sig = sigtimedwait(set, NULL, &ts);
    return sig > 0 ? sig : 0;
}

typedef struct {
    srv_config http;
    const char *db_path;
    bool audit;
    double retention_s;
    int64_t max_rows;
    double shutdown_timeout;
    const char *api_key;            /* --api-key / ZSE_API_KEY */
    const char *names[16];          /* --served-model-name */
    int n_names;
} serve_opts;

/* --lora NAME=PATH */
static bool lora_arg(cli_args *a, loader *l)
{
    const char *v = cli_value(a);
    const char *eq = v ? strchr(v, '=') : NULL;
    if (!v)
        return false;
    if (!eq || eq == v || !eq[1] || l->n_lora == 64) {
        fprintf(stderr, "zse serve: --lora takes NAME=PATH (up to 64; --lora-dir serves more), not '%s'\n", v);
        a->failed = true;
        return false;
    }
    static char names[64][257];
    snprintf(names[l->n_lora], sizeof names[l->n_lora], "%.*s", (int)(eq - v < 256 ? eq - v : 256), v);
    l->lora_names[l->n_lora] = names[l->n_lora];
    l->lora_paths[l->n_lora++] = eq + 1;
    return true;
}

/* the largest rank of the adapters known at start (--lora and the --lora-dir's), so a slot
 * holds the largest; at least 16 */
static int start_rank(const loader *l)
{
    int best = 16, r;
    for (int i = 0; i < l->n_lora; i++)
        if (zse_adapter_probe(l->lora_paths[i], &r) == 0 && r > best)
            best = r;
    DIR *d = l->lora_dir ? opendir(l->lora_dir) : NULL;
    for (struct dirent *e; d && (e = readdir(d));) {
        char *p = e->d_name[0] != '.' ? zse_path_join(l->lora_dir, e->d_name) : NULL;
        if (p && zse_adapter_probe(p, &r) == 0 && r > best)
            best = r;
        free(p);
    }
    if (d)
        closedir(d);
    return best;
}

/* --served-model-name NAME [NAME ...]: the names up to the next flag (an existing file is
 * the model, not a name) */
static int served_names(cli_args *a, serve_opts *o)
{
    const char *v = cli_value(a);
    if (!v)
        return -1;
    bool more = !a->inline_value; /* --served-model-name=A takes one */
    for (;;) {
        if (o->n_names == (int)(sizeof o->names / sizeof o->names[0])) {
            fprintf(stderr, "zse serve: --served-model-name takes at most %zu names\n",
                    sizeof o->names / sizeof o->names[0]);
            return -1;
        }
        if (!*v) {
            fprintf(stderr, "zse serve: --served-model-name: a name must not be empty\n");
            return -1;
        }
        o->names[o->n_names++] = v;
        if (!more || a->i + 1 >= a->argc || a->argv[a->i + 1][0] == '-' || zse_file_exists(a->argv[a->i + 1]))
            return 0;
        v = a->argv[++a->i];
    }
}

/* --served-model-name, --api-key, --chat-template, --pooling: 1 taken, 0 not one of them, -1 wrong */
static int serve_more_arg(cli_args *a, serve_opts *o, loader *l)
{
    if (cli_is(a, NULL, "--served-model-name"))
        return served_names(a, o) == 0 ? 1 : -1;
    if (cli_is(a, NULL, "--api-key")) {
        o->api_key = cli_value(a);
        if (o->api_key && !*o->api_key) {
            fprintf(stderr, "zse serve: --api-key (ZSE_API_KEY) is empty\n");
            return -1;
        }
        o->http.auth = true;
        return 1;
    }
    if (cli_is(a, NULL, "--chat-template")) {
        l->chat_template_path = cli_value(a);
        return 1;
    }
    if (cli_is(a, NULL, "--pooling")) {
        const char *v = cli_value(a);
        if (v && strcmp(v, "last") && strcmp(v, "mean")) {
            fprintf(stderr, "zse serve: --pooling takes last or mean, not '%s'\n", v);
            return -1;
        }
        o->http.pooling = v && !strcmp(v, "mean") ? ZSE_POOL_MEAN : ZSE_POOL_LAST;
        return 1;
    }
    return 0;
}

static int parse_args(int argc, char **argv, serve_opts *o, loader *l)
{
    cli_args a = cli_begin(argc, argv);
    int64_t i;
    double d;
    while (cli_next(&a)) {
        if (cli_spec_arg(&a, &l->spec_flags))
            continue;
        if (cli_is(&a, NULL, "--lora")) {
            l->lora_wanted = lora_arg(&a, l) || l->lora_wanted;
            continue;
        }
        if (cli_is(&a, NULL, "--lora-dir")) {
            l->lora_dir = cli_value(&a);
            l->lora_wanted = true;
            continue;
        }
        if (cli_is(&a, NULL, "--max-gpu-loras")) {
            if (cli_int(&a, 1, 4096, &i))
                l->load.max_loras = (int)i;
            l->lora_wanted = true;
            continue;
        }
        if (cli_is(&a, NULL, "--max-cpu-loras")) {
            if (cli_int(&a, 1, 65536, &i))
                l->load.max_cpu_loras = (int)i;
            continue;
        }
        if (cli_is(&a, NULL, "--max-lora-rank")) {
            if (cli_int(&a, 1, 128, &i))
                l->load.max_lora_rank = (int)i;
            continue;
        }
        if (cli_is(&a, NULL, "--allow-lora-loading")) {
            o->http.allow_lora_loading = true;
            continue;
        }
        if (cli_is(&a, NULL, "--tool-parser")) {
            const char *name = cli_value(&a);
            if (name && srv_tool_parser_from_name(name, &o->http.tool_parser) != 0) {
                fprintf(stderr, "zse serve: --tool-parser: %s\n", zse_last_error());
                return 2;
            }
            continue;
        }
        int more = serve_more_arg(&a, o, l);
        if (more < 0)
            return 2;
        if (more)
            continue;
        if (cli_is(&a, NULL, "--host"))
            o->http.host = cli_value(&a);
        else if (cli_is(&a, NULL, "--port") && cli_int(&a, 0, 65535, &i))
            o->http.port = (int)i;
        else if (cli_is(&a, NULL, "--model-id"))
            o->http.model_id = cli_value(&a);
        else if (cli_is(&a, NULL, "--max-body")) {
            const char *v = cli_value(&a);
            uint64_t sz;
            if (v && (!zse_parse_size(v, &sz) || sz < 1024 || sz > (1ull << 31))) {
                fprintf(stderr, "zse serve: --max-body takes a size from 1K to 2G, not '%s'\n", v);
                return 2;
            }
            o->http.max_body = v ? (size_t)sz : o->http.max_body;
        } else if (cli_is(&a, NULL, "--max-buffered")) {
            const char *v = cli_value(&a);
            uint64_t sz;
            if (v && (!zse_parse_size(v, &sz) || sz < 1024 || sz > (1ull << 40))) {
                fprintf(stderr, "zse serve: --max-buffered takes a size from 1K to 1T, not '%s'\n", v);
                return 2;
            }
            o->http.max_buffered = v ? (size_t)sz : o->http.max_buffered;
        } else if (cli_is(&a, NULL, "--max-connections") && cli_int(&a, 1, 100000, &i))
            o->http.max_connections = (int)i;
        else if (cli_is(&a, NULL, "--max-connections-per-ip") && cli_int(&a, 0, 100000, &i))
            o->http.max_connections_per_ip = (int)i;
        else if (cli_is(&a, NULL, "--timeout") && cli_int(&a, 1, 86400, &i))
            o->http.timeout_s = (int)i;
        else if (cli_is(&a, NULL, "--header-timeout") && cli_float(&a, 0.1, 86400, &d))
            o->http.header_timeout_s = d;
        else if (cli_is(&a, NULL, "--body-timeout") && cli_float(&a, 0.1, 86400, &d))
            o->http.body_timeout_s = d;
        else if (cli_is(&a, NULL, "--max-refused-per-ip") && cli_int(&a, 0, 1000000, &i))
            o->http.refused_per_min = (int)i;
        else if (cli_is(&a, NULL, "--http-threads") && cli_int(&a, 1, 256, &i))
            o->http.http_threads = (int)i;
        else if (cli_is(&a, NULL, "--workers") && cli_int(&a, 1, 64, &i))
            o->http.workers = (int)i;
        else if (cli_is(&a, NULL, "--cors"))
            o->http.cors_origin = cli_value(&a);
        else if (cli_is(&a, NULL, "--tls-cert"))
            o->http.tls_cert = cli_value(&a);
        else if (cli_is(&a, NULL, "--tls-key"))
            o->http.tls_key = cli_value(&a);
        else if (cli_is(&a, NULL, "--auth"))
            o->http.auth = true;
        else if (cli_is(&a, NULL, "--db"))
            o->db_path = cli_value(&a);
        else if (cli_is(&a, NULL, "--no-audit"))
            o->audit = false;
        else if (cli_is(&a, NULL, "--audit-retention")) {
            const char *v = cli_value(&a);
            if (v && !srv_parse_duration(v, &o->retention_s)) {
                fprintf(stderr, "zse serve: --audit-retention takes a duration like 7d or 12h, not '%s'\n", v);
                return 2;
            }
        } else if (cli_is(&a, NULL, "--audit-max-rows") && cli_int(&a, 0, INT64_MAX, &i))
            o->max_rows = i;
        else if (cli_is(&a, NULL, "--max-seqs") && cli_int(&a, 1, 4096, &i))
            l->engine.max_seqs = l->load.max_seqs = (int)i;
        else if (cli_is(&a, NULL, "--max-batch-tokens") && cli_int(&a, 1, 1 << 20, &i))
            l->engine.max_batch_tokens = (int)i;
        else if (cli_is(&a, NULL, "--max-queue") && cli_int(&a, 0, 1 << 20, &i))
            l->engine.max_queue = o->http.max_waiting = (int)i;
        else if (cli_is(&a, NULL, "--max-seqs-per-key") && cli_int(&a, 1, 4096, &i))
            o->http.max_seqs_per_key = (int)i;
        else if (cli_is(&a, NULL, "--max-queued-tokens-per-key") && cli_int(&a, 1, INT64_MAX, &i))
            o->http.max_queued_tokens_per_key = i;
        else if (cli_is(&a, NULL, "--ctx") && cli_int(&a, 1, 1 << 24, &i))
            l->load.ctx_size = (int)i;
        else if (cli_is(&a, NULL, "--kv-cache")) {
            const char *v = cli_value(&a);
            if (v && strcmp(v, "f16") && strcmp(v, "int8")) {
                fprintf(stderr, "zse serve: --kv-cache takes f16 or int8, not '%s'\n", v);
                return 2;
            }
            l->load.kv_type = v && !strcmp(v, "int8") ? ZSE_KV_INT8 : ZSE_KV_F16;
        } else if (cli_is(&a, NULL, "--kv-cache-size")) {
            const char *v = cli_value(&a);
            if (v && !zse_parse_size(v, &l->load.kv_cache_bytes)) {
                fprintf(stderr, "zse serve: --kv-cache-size takes a size like 512M or 4G, not '%s'\n", v);
                return 2;
            }
        } else if (cli_is(&a, NULL, "--no-prefix-cache"))
            l->load.no_prefix_cache = true;
        else if (cli_is(&a, NULL, "--no-fair-share"))
            l->engine.no_compute_share = true;
        else if (cli_is(&a, NULL, "--threads") && cli_int(&a, 0, 1024, &i))
            l->load.threads = (int)i;
        else if (cli_is(&a, NULL, "--device"))
            l->load.device = cli_value(&a);
        else if (cli_is(&a, NULL, "--gpu-memory"))
            cli_size(&a, 1ull << 20, &l->load.gpu_memory);
        else if (cli_is(&a, NULL, "--shutdown-timeout") && cli_float(&a, 0, 86400, &d))
            o->shutdown_timeout = d;
        else if (cli_is(&a, NULL, "--quiet"))
            o->http.log_requests = false;
        else if (cli_positional(&a) && !l->model_path)
            l->model_path = a.arg;
        else if (!a.failed)
            return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!l->model_path && getenv("ZSE_MODEL") && *getenv("ZSE_MODEL"))
        l->model_path = getenv("ZSE_MODEL");
    if (!l->model_path) {
        usage(stderr);
        return 2;
    }
    if (o->n_names && o->http.model_id) {
        fprintf(stderr, "zse serve: --model-id and --served-model-name both name the model; use one\n");
        return 2;
    }
    if (o->n_names) {
        o->http.model_id = o->names[0];
        o->http.aliases = o->names;
        o->http.n_aliases = o->n_names;
    }

    if (!l->lora_wanted && (l->load.max_cpu_loras || l->load.max_lora_rank || o->http.allow_lora_loading)) {
        fprintf(stderr, "zse serve: --max-cpu-loras, --max-lora-rank and --allow-lora-loading need adapters: --lora, "
                        "--lora-dir or --max-gpu-loras\n");
        return 2;
    }
    if (l->lora_wanted) {
        if (!l->load.max_loras)
            l->load.max_loras = 8;
        if (!l->load.max_cpu_loras)
            l->load.max_cpu_loras = l->n_lora > l->load.max_loras ? l->n_lora : l->load.max_loras;
        if (!l->load.max_lora_rank)
            l->load.max_lora_rank = start_rank(l);
    }
    return cli_spec_parse(&l->spec_flags, &l->engine.spec, "serve");
}

/* stop accepting, let requests finish for the timeout, end the rest, close */
static void shut_down(srv_server *s, loader *l, double timeout)
{
    double t0 = zse_now();
    srv_drain(s);
    int running = srv_active_requests(s);
    if (running)
        zse_log(ZSE_LOG_INFO, "waiting up to %.0f s for %d running requests", timeout, running);
    bool idle = srv_wait_idle(s, timeout);
    if (l->eng) {
        double left = timeout - (zse_now() - t0);
        zse_engine_stop(l->eng, left > 0 ? left : 0); /* cancels what is still running */
    }
    if (!idle)
        srv_wait_idle(s, 2); /* the cancelled requests' last bytes */
    srv_stop(s);
}

/* whether a --served-model-name names the model `name` */
static bool served_as(const serve_opts *o, const char *name)
{
    for (int i = 0; i < o->n_names; i++)
        if (strcmp(o->names[i], name) == 0)
            return true;
    return false;
}

static int serve(int argc, char **argv);

int cmd_serve(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    cli_serve_env env; /* the ZSE_ variables' flags first, then the command line's (which win) */
    int rc = cli_serve_env_args(argc, argv, &env) == 0 ? serve(env.argc, env.argv) : 2;
    cli_serve_env_free(&env);
    return rc;
}

static int serve(int argc, char **argv)
{
    serve_opts o = {.audit = true, .retention_s = 30 * 86400.0, .max_rows = 1000000, .shutdown_timeout = 30};
    srv_config_default(&o.http);
    o.http.model_id = NULL; /* the file's name unless --model-id */
    loader l;
    memset(&l, 0, sizeof l);
    pthread_mutex_init(&l.mu, NULL);
    zse_load_params_default(&l.load);
    l.load.max_seqs = l.engine.max_seqs = 16;
    l.engine.max_batch_tokens = 512;
    l.engine.max_queue = 256;
    o.http.max_waiting = l.engine.max_queue;
    int rc = parse_args(argc, argv, &o, &l);
    if (rc != 0)
        return rc;
    o.http.engine_slots = l.engine.max_seqs;
    if (o.http.max_seqs_per_key > l.engine.max_seqs) {
        fprintf(stderr, "zse serve: --max-seqs-per-key %d is more than --max-seqs %d\n", o.http.max_seqs_per_key,
                l.engine.max_seqs);
        return 2;
    }
    if (!zse_file_exists(l.model_path)) {
        struct stat sb;
        if (stat(l.model_path, &sb) == 0 && S_ISDIR(sb.st_mode))
            fprintf(stderr, "zse serve: %s is a folder; zse serves one .zse file. Convert it first:\n"
                            "  zse convert %s -o model.zse && zse serve model.zse\n", l.model_path, l.model_path);
        else if (stat(l.model_path, &sb) == 0)
            fprintf(stderr, "zse serve: %s is not a regular file\n", l.model_path);
        else
            fprintf(stderr, "zse serve: %s does not exist (zse convert makes a .zse from a Hugging Face folder or "
                            "a .gguf file)\n", l.model_path);
        return 1;
    }
    if (zse_is_gguf_file(l.model_path)) {
        fprintf(stderr, "zse serve: %s is a GGUF file; zse serves .zse files. Convert it first:\n"
                        "  zse convert %s -o model.zse && zse serve model.zse\n", l.model_path, l.model_path);
        return 1;
    }
    char *model_id = o.http.model_id ? NULL : default_model_id(l.model_path);
    if (model_id)
        o.http.model_id = model_id;
    for (int i = 0; o.http.model_id && i < l.n_lora; i++)
        if (strcmp(l.lora_names[i], o.http.model_id) == 0 || served_as(&o, l.lora_names[i])) {
            fprintf(stderr, "zse serve: --lora %s: the model is served as '%s' already; name the adapter otherwise\n",
                    l.lora_names[i], o.http.model_id);
            free(model_id);
            return 2;
        }
    if (l.chat_template_path && !(l.chat_template = zse_read_file(l.chat_template_path, NULL))) {
        fprintf(stderr, "zse serve: --chat-template %s: %s\n", l.chat_template_path, zse_last_error());
        free(model_id);
        return 2;
    }

    /* SIGINT/SIGTERM are taken by sigtimedwait here, never delivered to another thread */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* a write past the file-size limit fails (and audit rows lost to it are counted)
     * instead of killing the server */
    signal(SIGXFSZ, SIG_IGN);

    char *db_path = NULL;
    srv_keyring *kr = NULL;
    srv_audit *audit = NULL;
    srv_server *s = NULL;
    rc = 1;
    if (o.http.auth || o.audit) {
        db_path = o.db_path ? zse_strdup(o.db_path) : srv_db_default_path();
        if (!db_path || (o.http.auth && !(kr = srv_keyring_new())) ||
            !(audit = srv_audit_start(db_path, o.retention_s, o.max_rows, kr)))
            goto done;
        if (kr && o.api_key && srv_keyring_set_plain(kr, o.api_key) != 0)
            goto done;
        if (kr && srv_keyring_size(kr) == 0)
            zse_log(ZSE_LOG_WARN, "--auth with no keys in %s: every API request will get 401 (zse api-key create NAME)",
                    db_path);
    }
    o.http.keyring = kr;
    o.http.db_path = db_path; /* the dashboard's admin routes (with --auth) */
    o.http.audit = o.audit ? audit : NULL;
    if (!(s = srv_start(&o.http)))
        goto done;
    fprintf(stderr, "zse serve: listening on %s://%s:%d (model '%s' loading)\n", o.http.tls_cert ? "https" : "http",
            o.http.host, srv_port(s), o.http.model_id);

    pthread_t th;
    if (pthread_create(&th, NULL, load_main, &l) != 0) {
        zse_fail("cannot start the loading thread");
        srv_stop(s);
        s = NULL;
        goto done;
    }
    int sig = 0;
    for (;;) {
        pthread_mutex_lock(&l.mu);
        bool finished = l.done;
        pthread_mutex_unlock(&l.mu);
        if (finished)
            break;
        if (!sig)
            sig = wait_signal(&sigs, 0.05);
        else
            wait_signal(&sigs, 0.05);
    }
    pthread_join(th, NULL);
    if (l.failed) {
        zse_fail("%s", l.error);
        shut_down(s, &l, 0);
        s = NULL;
        goto done;
    }
    srv_engine binding = {l.eng, engine_submit, engine_cancel, engine_stats, engine_pause};
    srv_set_ready(s, l.model, &binding);
    zse_model_info info;
    zse_model_get_info(l.model, &info);
    fprintf(stderr, "zse serve: ready: %s (%s, %s, context %d) on %s://%s:%d\n", o.http.model_id, info.arch, info.quant,
            info.ctx_size, o.http.tls_cert ? "https" : "http", o.http.host, srv_port(s));
    while (!sig)
        sig = wait_signal(&sigs, 3600);
    fprintf(stderr, "zse serve: %s: shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    shut_down(s, &l, o.shutdown_timeout);
    s = NULL;
    rc = 0;
done:
    if (rc != 0)
        cli_error("serve");
    if (s)
        srv_stop(s);
    srv_audit_stop(audit); /* flushes what the last requests queued */
    srv_keyring_free(kr);
    zse_model_free(l.model);
    zse_model_free(l.draft);
    free(db_path);
    free(model_id);
    free(l.chat_template);
    pthread_mutex_destroy(&l.mu);
    if (rc == 0)
        fprintf(stderr, "zse serve: stopped\n");
    return rc;
}
