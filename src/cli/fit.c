/* What fits where: a .zse file's memory needs against each GPU and the CPU of this machine,
 * for `zse hardware --fit` and `zse info --fit`.
 *
 * Per device it answers: how the model runs there — resident (every weight in that device's
 * memory), with its experts offloaded to host memory, or with layers streamed through the
 * GPU (zse_model_fit, the arithmetic zse_model_load itself uses) — and with how long a
 * context for each KV-cache type. A GPU's budget is its free memory less what cuBLAS takes
 * beyond zse's own allocations; the CPU row is resident or nothing (its weights are used in
 * place: weights, the activations of a 512-token prefill chunk, then the KV cache out of
 * what is left less the engine's reserve). */
#include "cli/cli.h"

#include "backend/backend.h"
#include "engine/engine.h"
#include "format/format.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define MIB (1024.0 * 1024.0)
#define GIB (1024.0 * 1024.0 * 1024.0)

/* what the engine's prefill keeps per step (src/engine/api.c PREFILL_CHUNK, LOGIT_ROWS) */
enum { FIT_CHUNK = 512, FIT_LOGIT_ROWS = 8, FIT_KV_BLOCK = 16 };
/* a GPU beyond zse's own buffers: cuBLAS's pool and the workspace (measured 200-260 MiB
 * and 44-74 MiB on H100/H200, docs/BENCHMARKS.md); the CUDA context itself is already
 * out of the free memory measured once it exists, else taken as 640 MiB */
static const double GPU_LIBRARIES = 320 * MIB, GPU_CONTEXT = 640 * MIB;

uint64_t cli_kv_bytes_per_token(const zse_config *c, bool int8)
{
    uint64_t per_head = int8 ? (uint64_t)c->head_dim + 4 /* f32 scale */ : (uint64_t)c->head_dim * 2;
    return 2ull * (uint64_t)c->n_layers * (uint64_t)c->n_kv_heads * per_head;
}

uint64_t cli_kv_bytes(const zse_config *c, int64_t ctx, bool int8)
{
    uint64_t blocks = (uint64_t)(ctx + FIT_KV_BLOCK - 1) / FIT_KV_BLOCK;
    return blocks * FIT_KV_BLOCK * cli_kv_bytes_per_token(c, int8);
}

/* the model code's activation buffers (src/model/llama.c alloc_acts), f32 */
static uint64_t activation_bytes(const zse_config *c)
{
    uint64_t q = (uint64_t)c->n_heads * (uint64_t)c->head_dim, kv = (uint64_t)c->n_kv_heads * (uint64_t)c->head_dim;
    uint64_t per_row = 3 * (uint64_t)c->hidden_size + 2 * q + 2 * kv + 2 * (uint64_t)c->intermediate_size;
    uint64_t per_out = 2 * (uint64_t)c->hidden_size + (uint64_t)c->vocab_size;
    return 4 * (FIT_CHUNK * per_row + FIT_LOGIT_ROWS * per_out);
}

typedef struct {
    const char *mode;           /* "resident", "experts offloaded", "streamed" */
    bool fits;
    uint64_t device_bytes;      /* weights the device holds in this mode */
    uint64_t host_bytes;        /* weights left in host memory */
    int64_t max_ctx[2];         /* per KV type (f16, int8); 0 = not even one block */
    zse_fit fit;                /* a GPU's placement at a typical context (FIT_TYPICAL_CTX) */
    uint64_t minimum;           /* the least memory that runs it (when it does not fit) */
} fit_result;

/* the context of a GPU row's placement: a typical run, or the model's whole context if shorter */
enum { FIT_TYPICAL_CTX = 4096 };

/* the longest context (a multiple of 16, at most the model's) whose KV cache fits in
 * `room` after the engine's reserve */
static int64_t ctx_that_fits(const zse_config *c, double room, bool int8)
{
    double reserve = room / 20 > 256 * MIB ? room / 20 : 256 * MIB;
    double left = room - reserve;
    if (left <= 0)
        return 0;
    int64_t ctx = (int64_t)(left / (double)cli_kv_bytes_per_token(c, int8)) / FIT_KV_BLOCK * FIT_KV_BLOCK;
    return ctx > c->max_position ? c->max_position : ctx;
}

static void fit_resident(const zse_file *f, bool gpu, double memory, fit_result *r)
{
    const zse_config *c = zse_file_config(f);
    memset(r, 0, sizeof *r);
    r->mode = "resident";
    for (size_t i = 0; i < zse_file_n_tensors(f); i++) {
        const zse_tensor_info *t = zse_file_tensor_at(f, i);
        bool host = gpu && !c->tie_embeddings && strcmp(t->name, "token_embd.weight") == 0;
        *(host ? &r->host_bytes : &r->device_bytes) += t->size;
    }
    double room = memory - (double)r->device_bytes - (double)activation_bytes(c) - (gpu ? GPU_LIBRARIES : 0);
    for (int k = 0; k < 2; k++)
        r->max_ctx[k] = room > 0 ? ctx_that_fits(c, room, k == 1) : 0;
    r->fits = r->max_ctx[0] > 0 || r->max_ctx[1] > 0;
}

/* the placement zse_model_load would choose on `memory` bytes at ctx (one sequence) */
static int fit_gpu_at(const zse_file *f, double memory, int64_t ctx, bool int8, zse_fit *out)
{
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.ctx_size = (int)ctx;
    lp.kv_type = int8 ? ZSE_KV_INT8 : ZSE_KV_F16;
    const bool embed_on_host = !zse_file_config(f)->tie_embeddings;
    return zse_model_fit(f, &lp, memory > 0 ? (uint64_t)memory : 0, "the GPU's free memory is", embed_on_host, out);
}

/* A GPU: the placement at a typical context, and per KV type the longest context that runs
 * in any placement (found by bisection: a longer context only needs more) */
static void fit_gpu(const zse_file *f, double memory, fit_result *r)
{
    const zse_config *c = zse_file_config(f);
    memset(r, 0, sizeof *r);
    zse_fit probe;
    for (int k = 0; k < 2; k++) {
        int64_t lo = 0, hi = c->max_position / FIT_KV_BLOCK; /* in blocks: lo runs (0: nothing yet) */
        while (lo < hi) {
            const int64_t mid = (lo + hi + 1) / 2;
            if (fit_gpu_at(f, memory, mid * FIT_KV_BLOCK, k == 1, &probe) == 0) {
                zse_fit_free(&probe);
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        r->max_ctx[k] = lo * FIT_KV_BLOCK;
    }
    /* the placement at a typical context, or at the longest that runs when that is shorter */
    const int64_t typical = c->max_position < FIT_TYPICAL_CTX ? c->max_position : FIT_TYPICAL_CTX;
    const int64_t longest = r->max_ctx[0] ? r->max_ctx[0] : r->max_ctx[1];
    const int64_t ctx = typical <= longest ? typical : longest > 0 ? longest : FIT_KV_BLOCK;
    r->fits = fit_gpu_at(f, memory, ctx, r->max_ctx[0] == 0, &r->fit) == 0;
    r->minimum = r->fit.minimum; /* also after a failure: the least memory that runs it */
    r->mode = r->fits ? zse_fit_mode_name(r->fit.mode) : "no";
    r->device_bytes = r->fit.device_weights;
    r->host_bytes = r->fit.host_weights;
    zse_fit_free(&r->fit); /* its counts stay; the layer map is not printed */
}

static double host_available(double *total)
{
    double avail = 0;
    *total = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    FILE *fp = fopen("/proc/meminfo", "r");
    char line[256];
    while (fp && fgets(line, sizeof line, fp)) {
        unsigned long long kb;
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
            avail = (double)kb * 1024.0;
    }
    if (fp)
        fclose(fp);
    return avail > 0 ? avail : *total;
}

static void ctx_text(const fit_result *r, int k, const zse_config *c, char *buf, size_t n)
{
    if (r->max_ctx[k] <= 0)
        snprintf(buf, n, "does not fit");
    else
        snprintf(buf, n, "%lld%s", (long long)r->max_ctx[k], r->max_ctx[k] == c->max_position ? " (full)" : "");
}

/* one line saying what a placement keeps where (zse info --gpu-memory, zse hardware --fit) */
void cli_print_placement(const zse_fit *fit, const char *indent)
{
    char b1[32], b2[32];
    switch (fit->mode) {
    case ZSE_FIT_STREAM:
        printf("%s%d of %d layers resident, %d streamed from host memory (%s) through %d buffers of %s\n", indent,
               fit->n_layers - fit->layers_streamed, fit->n_layers, fit->layers_streamed,
               cli_human_bytes(fit->host_weights, b1), fit->stream_buffers,
               cli_human_bytes(fit->layer_buffer_bytes, b2));
        break;
    case ZSE_FIT_EXPERTS:
        printf("%sexperts in host memory (%s), %d of %d cached on the GPU (%s); every other weight resident\n", indent,
               cli_human_bytes(fit->host_weights, b1), fit->expert_slots, fit->experts_total,
               cli_human_bytes(fit->slab_bytes, b2));
        break;
    default:
        printf("%severy weight resident\n", indent);
        break;
    }
}

static json_t *fit_device(const zse_file *f, const char *where, const char *name, bool gpu, double memory,
                          const char *memory_what, bool as_json)
{
    const zse_config *c = zse_file_config(f);
    fit_result r = {0};
    if (gpu)
        fit_gpu(f, memory - GPU_LIBRARIES, &r);
    else
        fit_resident(f, false, memory, &r);
    if (as_json) {
        json_t *o = json_pack("{s:s, s:s, s:I, s:s, s:b, s:s, s:I, s:I, s:I, s:I}", "device", where, "name", name,
                              "memory_bytes", (json_int_t)memory, "memory", memory_what, "fits", r.fits, "mode",
                              r.fits ? r.mode : "none", "device_weight_bytes", (json_int_t)r.device_bytes,
                              "host_weight_bytes", (json_int_t)r.host_bytes, "max_ctx_kv_f16",
                              (json_int_t)r.max_ctx[0], "max_ctx_kv_int8", (json_int_t)r.max_ctx[1]);
        if (gpu && r.fits)
            json_object_set_new(o, "placement", json_pack("{s:i, s:i, s:i, s:i, s:i}", "ctx",
                (int)(c->max_position < FIT_TYPICAL_CTX ? c->max_position : FIT_TYPICAL_CTX), "layers_streamed",
                r.fit.layers_streamed, "stream_buffers", r.fit.stream_buffers, "experts_cached", r.fit.expert_slots,
                "experts_total", r.fit.experts_total));
        if (r.minimum)
            json_object_set_new(o, "minimum_bytes", json_integer((json_int_t)r.minimum));
        return o;
    }
    char f16[48], i8[48];
    ctx_text(&r, 0, c, f16, sizeof f16);
    ctx_text(&r, 1, c, i8, sizeof i8);
    printf("%-8s %-28.28s %7.1f GiB %-9s  %-9s %-16s %-16s\n", where, name, memory / GIB, memory_what,
           r.fits ? r.mode : "no", f16, i8);
    if (!r.fits && gpu && r.minimum)
        printf("         needs at least %.2f GiB (weights in host memory where they can be); %.2f GiB %s\n",
               (double)r.minimum / GIB, memory / GIB, memory_what);
    else if (!r.fits)
        printf("         weights need %.2f GiB; %.2f GiB %s (a smaller --quant, e.g. int4, needs less)\n",
               (double)r.device_bytes / GIB, memory / GIB, memory_what);
    else if (gpu && r.fit.mode != ZSE_FIT_RESIDENT)
        cli_print_placement(&r.fit, "         ");
    else if (gpu && r.host_bytes)
        printf("         the embedding table stays in host memory\n");
    return NULL;
}

int cli_print_fit(const char *model_path, bool as_json)
{
    zse_file *f = zse_file_open(model_path);
    if (!f)
        return cli_error("fit");
    const zse_config *c = zse_file_config(f);
    uint64_t weights = 0;
    for (size_t i = 0; i < zse_file_n_tensors(f); i++)
        weights += zse_file_tensor_at(f, i)->size;
    json_t *devices = as_json ? json_array() : NULL;
    if (!as_json) {
        bool big = weights >= GIB;
        printf("%s: %s, %d layers, weights %.2f %s, KV %.1f KiB (f16) / %.1f KiB (int8) per token, context up to "
               "%d\n", model_path, c->arch, c->n_layers, (double)weights / (big ? GIB : MIB), big ? "GiB" : "MiB",
               (double)cli_kv_bytes_per_token(c, false) / 1024, (double)cli_kv_bytes_per_token(c, true) / 1024,
               c->max_position);
        printf("%-8s %-28s %11s %-9s  %-9s %-16s %-16s\n", "device", "name", "memory", "", "fits",
               "context, f16 KV", "context, int8 KV");
    }
    int n = zse_backend_gpu_count();
    for (int i = 0; i < n; i++) {
        zse_gpu_info g;
        if (zse_backend_gpu_info(i, &g) != 0)
            continue;
        char where[16];
        snprintf(where, sizeof where, "cuda:%d", i);
        double mem = g.free_known ? (double)g.free_bytes : (double)g.total_bytes - GPU_CONTEXT;
        json_t *d = fit_device(f, where, g.name, true, mem, g.free_known ? "free" : "est. free", as_json);
        if (d)
            json_array_append_new(devices, d);
    }
    double total, avail = host_available(&total);
    json_t *d = fit_device(f, "cpu", "host memory", false, avail, "available", as_json);
    if (d)
        json_array_append_new(devices, d);
    if (as_json) {
        json_t *o = json_pack("{s:s, s:I, s:i, s:o}", "model", model_path, "weight_bytes", (json_int_t)weights,
                              "max_position", c->max_position, "devices", devices);
        char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        if (s)
            printf("%s\n", s);
        free(s);
        json_decref(o);
    } else if (n == 0) {
        printf("no GPU: %s\n", zse_backend_gpu_absence());
    }
    zse_file_close(f);
    return 0;
}
