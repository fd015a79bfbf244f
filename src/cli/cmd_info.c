/* zse info FILE.zse — what a model file holds, without touching tensor data. */
#include "cli/cli.h"

#include "engine/engine.h"
#include "format/format.h"

#include <stdio.h>
#include <string.h>

const char cmd_info_summary[] = "show a .zse file's architecture, sizes, quantization and memory needs";

typedef struct {
    uint64_t params;
    uint64_t bytes[ZSE_SCHEME_COUNT];
    uint64_t count[ZSE_SCHEME_COUNT];
    uint64_t weight_bytes;
    uint64_t host_bytes;    /* an untied embedding table: a GPU leaves it in host memory */
    /* routed experts (MoE files) */
    uint64_t expert_bytes;          /* every expert of every layer */
    uint64_t expert_params;
    uint64_t one_expert_bytes;      /* the largest single expert's checksummed range */
    uint64_t one_expert_params;
} tensor_totals;

static void total_tensors(const zse_file *f, tensor_totals *t)
{
    memset(t, 0, sizeof *t);
    for (size_t i = 0; i < zse_file_n_tensors(f); i++) {
        const zse_tensor_info *ti = zse_file_tensor_at(f, i);
        t->params += (uint64_t)(ti->q.rows * ti->q.cols);
        t->bytes[ti->q.scheme] += ti->size;
        t->count[ti->q.scheme]++;
        t->weight_bytes += ti->size;
        if (!zse_file_config(f)->tie_embeddings && strcmp(ti->name, "token_embd.weight") == 0)
            t->host_bytes += ti->size;
    }
    for (size_t i = 0; i < zse_file_n_expert_banks(f); i++) {
        const zse_expert_bank *b = zse_file_expert_bank_at(f, i);
        uint64_t params = 0;
        for (int p = 0; p < ZSE_EXPERT_PARTS; p++) {
            const zse_expert_part *ep = &b->part[p];
            params += (uint64_t)(ep->q.rows * ep->q.cols);
            t->bytes[ep->q.scheme] += ep->size * (uint64_t)b->count;
            t->count[ep->q.scheme] += (uint64_t)b->count;
        }
        t->expert_params += params * (uint64_t)b->count;
        t->expert_bytes += b->size * (uint64_t)b->count;
        t->one_expert_bytes = b->size > t->one_expert_bytes ? b->size : t->one_expert_bytes;
        t->one_expert_params = params > t->one_expert_params ? params : t->one_expert_params;
    }
    t->params += t->expert_params;
    t->weight_bytes += t->expert_bytes;
}

/* parameters a token runs through: everything but the experts it is not routed to (the
 * embedding table counts, as llama.cpp and the model cards count it) */
static uint64_t active_params(const zse_file *f, const tensor_totals *t)
{
    const zse_config *c = zse_file_config(f);
    const uint64_t routed = (uint64_t)zse_file_n_expert_banks(f) * (uint64_t)c->n_experts_used * t->one_expert_params;
    return t->params - t->expert_params + routed;
}

static void print_text(const char *path, const zse_file *f, const tensor_totals *t, int64_t ctx)
{
    const zse_config *c = zse_file_config(f);
    const json_t *h = zse_file_header(f);
    const char *quant = json_string_value(json_object_get(json_object_get(h, "quant"), "scheme"));
    json_t *g = json_object_get(json_object_get(h, "quant"), "group_size");
    char b1[32], b2[32], b3[32];
    printf("file:            %s (%s)\n", path, cli_human_bytes(zse_file_size(f), b1));
    json_t *ver = json_object_get(h, "version");
    printf("format:          .zse %lld.%lld\n", (long long)json_integer_value(json_array_get(ver, 0)),
           (long long)json_integer_value(json_array_get(ver, 1)));
    printf("architecture:    %s\n", c->arch);
    printf("parameters:      %.3f B\n", (double)t->params / 1e9);
    printf("layers:          %d\n", c->n_layers);
    printf("hidden / ffn:    %d / %d\n", c->hidden_size, c->intermediate_size);
    printf("heads / kv:      %d / %d (head_dim %d)\n", c->n_heads, c->n_kv_heads, c->head_dim);
    printf("vocab:           %d\n", c->vocab_size);
    printf("context length:  %d\n", c->max_position);
    printf("rope theta:      %g\n", c->rope_theta);
    if (c->sliding_window)
        printf("sliding window:  %d\n", c->sliding_window);
    if (c->n_experts > 0) {
        printf("experts:         %d per layer in %d of %d layers, %d active per token (%s)\n", c->n_experts,
               zse_config_moe_layer_count(c), c->n_layers, c->n_experts_used,
               c->norm_topk ? "weights renormalized" : "softmax weights");
        printf("expert ffn:      %d%s", c->expert_ffn, c->shared_ffn ? "" : "\n");
        if (c->shared_ffn)
            printf(", shared expert %d%s\n", c->shared_ffn, c->shared_gate ? " (sigmoid-gated)" : "");
        printf("expert bytes:    %s each, %s in all (%.1f%% of the weights)\n", cli_human_bytes(t->one_expert_bytes, b1),
               cli_human_bytes(t->expert_bytes, b2), 100.0 * (double)t->expert_bytes / (double)t->weight_bytes);
        printf("active params:   %.3f B per token\n", (double)active_params(f, t) / 1e9);
    }
    printf("tied embeddings: %s\n", c->tie_embeddings ? "yes" : "no");
    zse_scheme qs;
    if (quant && zse_scheme_from_name(quant, &qs) == 0 && zse_scheme_is_grouped(qs))
        printf("quantization:    %s (group %lld)\n", quant, (long long)json_integer_value(g));
    else if (quant && strcmp(quant, "gguf") == 0)
        printf("quantization:    gguf (each tensor kept its GGUF type or the nearest scheme; below)\n");
    else
        printf("quantization:    %s\n", quant ? quant : "?");
    for (int s = 0; s < ZSE_SCHEME_COUNT; s++)
        if (t->count[s])
            printf("  %-6s %4llu tensors %12s\n", zse_scheme_name((zse_scheme)s),
                   (unsigned long long)t->count[s], cli_human_bytes(t->bytes[s], b1));
    const char *tt = json_string_value(json_object_get(h, "tokenizer_type"));
    printf("tokenizer:       %s\n", tt ? tt : "unknown");
    printf("chat template:   %s\n", zse_file_chat_template(f) ? "yes" : "no");
    printf("memory at ctx %lld: weights %s + KV %s (f16) or %s (int8) per sequence\n", (long long)ctx,
           cli_human_bytes(t->weight_bytes, b1), cli_human_bytes(cli_kv_bytes(c, ctx, false), b2),
           cli_human_bytes(cli_kv_bytes(c, ctx, true), b3));
    if (t->host_bytes)
        printf("on a GPU:        weights %s in VRAM; the embedding table (%s) stays in host memory\n",
               cli_human_bytes(t->weight_bytes - t->host_bytes, b1), cli_human_bytes(t->host_bytes, b2));
}

static json_t *build_json(const char *path, const zse_file *f, const tensor_totals *t, int64_t ctx)
{
    const zse_config *c = zse_file_config(f);
    const json_t *h = zse_file_header(f);
    json_t *schemes = json_object();
    for (int s = 0; s < ZSE_SCHEME_COUNT; s++)
        if (t->count[s])
            json_object_set_new(schemes, zse_scheme_name((zse_scheme)s),
                                json_pack("{s:I, s:I}", "tensors", (json_int_t)t->count[s], "bytes",
                                          (json_int_t)t->bytes[s]));
    json_t *q = json_object_get(h, "quant");
    json_t *o = json_pack(
        "{s:s, s:s, s:I, s:I, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:O, s:O, s:o, s:O, s:b, s:b,"
        " s:I, s:I, s:I, s:I, s:I, s:i}",
        "file", path, "architecture", c->arch, "file_bytes", (json_int_t)zse_file_size(f),
        "parameters", (json_int_t)t->params, "n_layers", c->n_layers, "hidden_size", c->hidden_size,
        "intermediate_size", c->intermediate_size, "n_heads", c->n_heads, "n_kv_heads",
        c->n_kv_heads, "head_dim", c->head_dim, "vocab_size", c->vocab_size, "context_length",
        c->max_position, "quant", json_object_get(q, "scheme"), "group_size",
        json_object_get(q, "group_size"), "schemes", schemes, "tokenizer_type",
        json_object_get(h, "tokenizer_type"), "chat_template", zse_file_chat_template(f) != NULL,
        "tied_embeddings", c->tie_embeddings, "weight_bytes", (json_int_t)t->weight_bytes,
        "gpu_weight_bytes", (json_int_t)(t->weight_bytes - t->host_bytes),
        "kv_bytes_f16", (json_int_t)cli_kv_bytes(c, ctx, false), "kv_bytes_int8",
        (json_int_t)cli_kv_bytes(c, ctx, true), "ctx", (json_int_t)ctx, "sliding_window",
        c->sliding_window);
    if (c->n_experts > 0)
        json_object_set_new(o, "experts", json_pack("{s:i, s:i, s:i, s:i, s:i, s:b, s:b, s:I, s:I, s:I, s:I}",
            "n_experts", c->n_experts, "n_experts_used", c->n_experts_used, "moe_layers", zse_config_moe_layer_count(c),
            "expert_ffn", c->expert_ffn, "shared_ffn", c->shared_ffn, "shared_gate", c->shared_gate, "norm_topk",
            c->norm_topk, "expert_bytes", (json_int_t)t->one_expert_bytes, "experts_bytes", (json_int_t)t->expert_bytes,
            "expert_params", (json_int_t)t->one_expert_params, "active_params", (json_int_t)active_params(f, t)));
    return o;
}

static void dump_json(json_t *o)
{
    char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (s)
        printf("%s\n", s);
    free(s);
    json_decref(o);
}

/* where zse run --gpu-memory X --ctx N would keep the weights (zse_model_fit); 0, or 1 with
 * the error (it states the least memory that runs the model) */
static int print_placement(const char *path, const zse_file *f, int64_t ctx, bool int8, uint64_t budget, bool as_json,
                           json_t *o)
{
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.ctx_size = (int)ctx;
    lp.kv_type = int8 ? ZSE_KV_INT8 : ZSE_KV_F16;
    zse_fit fit;
    /* a GPU leaves an untied embedding table in host memory (weight_load_lookup) */
    if (zse_model_fit(f, &lp, budget, "--gpu-memory allows", !zse_file_config(f)->tie_embeddings, &fit) != 0) {
        fprintf(stderr, "zse: info: %s: %s\n", path, zse_error_message());
        json_decref(o);
        return 1;
    }
    if (as_json) {
        json_object_set_new(o, "placement", json_pack(
            "{s:I, s:I, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:i, s:i, s:i, s:I, s:i, s:i, s:I}", "gpu_memory",
            (json_int_t)budget, "ctx", (json_int_t)ctx, "mode", zse_fit_mode_name(fit.mode), "device_weight_bytes",
            (json_int_t)fit.device_weights, "buffer_bytes", (json_int_t)fit.slab_bytes, "host_weight_bytes",
            (json_int_t)fit.host_weights, "activation_bytes", (json_int_t)fit.act_bytes, "kv_bytes",
            (json_int_t)fit.kv_bytes, "reserve_bytes", (json_int_t)fit.reserve, "layers", fit.n_layers,
            "layers_streamed", fit.layers_streamed, "stream_buffers", fit.stream_buffers, "layer_buffer_bytes",
            (json_int_t)fit.layer_buffer_bytes, "experts_cached", fit.expert_slots, "experts_total", fit.experts_total,
            "minimum_bytes", (json_int_t)fit.minimum));
    } else {
        char b[6][32];
        printf("--gpu-memory %.0f MiB, ctx %lld, %s KV: %s\n", (double)budget / 1048576.0, (long long)ctx,
               int8 ? "int8" : "f16", zse_fit_mode_name(fit.mode));
        cli_print_placement(&fit, "                 ");
        printf("                 on the GPU: weights %s, ", cli_human_bytes(fit.device_weights, b[0]));
        if (fit.mode != ZSE_FIT_RESIDENT)
            printf("%s %s, ", fit.mode == ZSE_FIT_STREAM ? "layer buffers" : "expert cache",
                   cli_human_bytes(fit.slab_bytes, b[1]));
        printf("activations %s, KV cache %s, reserve %s (this placement needs at least %s)\n",
               cli_human_bytes(fit.act_bytes, b[2]), cli_human_bytes(fit.kv_bytes, b[3]), cli_human_bytes(fit.reserve, b[4]),
               cli_human_bytes(fit.minimum, b[5]));
    }
    zse_fit_free(&fit);
    return 0;
}

int cmd_info(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        printf("usage: zse info FILE.zse [--json] [--ctx N] [--fit] [--gpu-memory SIZE [--kv-cache f16|int8]]\n\n"
               "  --json             machine-readable output\n"
               "  --ctx N            context length for the KV-cache estimate (default: the model's)\n"
               "  --fit              what fits where on this machine (as zse hardware --fit FILE.zse)\n"
               "  --gpu-memory SIZE  where zse run --gpu-memory SIZE --ctx N would keep the weights: resident,\n"
               "                     experts in host memory, or layers streamed (how many); an error that states\n"
               "                     the least memory when nothing fits\n"
               "  --kv-cache T       the KV cache type for --gpu-memory (default f16)\n");
        return 0;
    }
    const char *path = NULL, *kv = "f16";
    bool as_json = false, fit = false;
    int64_t ctx = 0;
    uint64_t gpu_memory = 0;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_is(&a, NULL, "--json"))
            as_json = true;
        else if (cli_is(&a, NULL, "--ctx"))
            cli_int(&a, 1, 1 << 24, &ctx);
        else if (cli_is(&a, NULL, "--gpu-memory"))
            cli_size(&a, 1ull << 20, &gpu_memory);
        else if (cli_is(&a, NULL, "--kv-cache"))
            kv = cli_value(&a);
        else if (cli_is(&a, NULL, "--fit"))
            fit = true;
        else if (cli_positional(&a) && !path)
            path = a.arg;
        else
            return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!path) {
        fprintf(stderr, "usage: zse info FILE.zse [--json] [--ctx N] [--fit] [--gpu-memory SIZE [--kv-cache f16|int8]]\n");
        return 2;
    }
    if (!kv || (strcmp(kv, "f16") != 0 && strcmp(kv, "int8") != 0)) {
        fprintf(stderr, "zse info: --kv-cache takes f16 or int8\n");
        return 2;
    }
    if (fit)
        return cli_print_fit(path, as_json);
    zse_file *f = zse_file_open(path);
    if (!f)
        return cli_error("info");
    if (ctx == 0)
        ctx = zse_file_config(f)->max_position;
    tensor_totals t;
    total_tensors(f, &t);
    int rc = 0;
    if (as_json) {
        json_t *o = build_json(path, f, &t, ctx);
        if (gpu_memory)
            rc = print_placement(path, f, ctx, strcmp(kv, "int8") == 0, gpu_memory, true, o);
        if (rc == 0)
            dump_json(o);
    } else {
        print_text(path, f, &t, ctx);
        if (gpu_memory)
            rc = print_placement(path, f, ctx, strcmp(kv, "int8") == 0, gpu_memory, false, NULL);
    }
    zse_file_close(f);
    return rc;
}
