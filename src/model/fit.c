/* What fits a device budget, before anything is loaded: resident, experts offloaded to host
 * memory, or layers streamed (model.h, zse_llm_fit). Arithmetic over the file's directory
 * alone, so `zse info --gpu-memory` and `zse hardware --fit` say what `zse run` would do.
 *
 * The bytes follow what the loaders allocate on a GPU: each tensor as stored (a vector also
 * as f32 beside it), the embedding table nowhere when it stays in host memory, the
 * activations of zse_llm_act_bytes, slabs of slots rounded to 256 bytes, and the KV cache
 * with the reserve the engine keeps after everything else (5% of what is left, at least 256
 * MiB: room(kv) below is what must be left for kv to survive it). */
#include "model/internal.h"

#include <stdio.h>
#include <string.h>

#define MIB (1024.0 * 1024.0)
#define RESERVE_FLOOR (256ull << 20)

/* the room that leaves `kv` bytes of KV cache once the engine takes its reserve out of it */
static uint64_t room_for(uint64_t kv)
{
    const uint64_t by_share = (kv * 20 + 18) / 19;
    return by_share > kv + RESERVE_FLOOR ? by_share : kv + RESERVE_FLOOR;
}

static uint64_t align256(uint64_t n) { return (n + 255) & ~(uint64_t)255; }

/* the file's bytes by where they can live */
typedef struct {
    uint64_t global;            /* outside the layers, on the device */
    uint64_t *fixed;            /* [n_layers] stays resident in any mode (vectors, router, shared expert) */
    uint64_t *mats;             /* [n_layers] the streamable matrices (q, k, v, o, gate, up, down) */
    uint64_t *span;             /* [n_layers] from the first of them to the end of the last */
    uint64_t *experts;          /* [n_layers] the expert bank */
    uint64_t expert_slot;       /* one expert's slot */
    uint64_t expert_tables;     /* each MoE layer's table of expert addresses */
    int experts_total;
    bool streamable;            /* every layer has its seven matrices */
} file_bytes;

static void file_bytes_free(file_bytes *b)
{
    free(b->fixed);
    free(b->mats);
    free(b->span);
    free(b->experts);
}

static bool is_stream_matrix(const char *what)
{
    static const char *const mats[] = {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                                       "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"};
    for (size_t i = 0; i < sizeof mats / sizeof mats[0]; i++)
        if (strcmp(what, mats[i]) == 0)
            return true;
    return false;
}

static int count_bytes(const zse_file *f, bool embed_on_host, file_bytes *b)
{
    const zse_config *c = zse_file_config(f);
    const size_t L = (size_t)c->n_layers;
    memset(b, 0, sizeof *b);
    b->fixed = zse_calloc(L, sizeof *b->fixed);
    b->mats = zse_calloc(L, sizeof *b->mats);
    b->span = zse_calloc(L, sizeof *b->span);
    b->experts = zse_calloc(L, sizeof *b->experts);
    uint64_t *lo = zse_calloc(L, sizeof *lo), *hi = zse_calloc(L, sizeof *hi);
    int *n_mats = zse_calloc(L, sizeof *n_mats);
    if (!b->fixed || !b->mats || !b->span || !b->experts || !lo || !hi || !n_mats) {
        free(lo);
        free(hi);
        free(n_mats);
        file_bytes_free(b);
        return -1;
    }
    for (size_t i = 0; i < zse_file_n_tensors(f); i++) {
        const zse_tensor_info *t = zse_file_tensor_at(f, i);
        /* a vector also lives as f32 beside its packed row */
        const uint64_t dev = t->size + (t->q.rows == 1 ? (uint64_t)((t->q.cols + 3) / 4 * 4) * 4 : 0);
        int l = -1, used = 0;
        if (sscanf(t->name, "blk.%d.%n", &l, &used) != 1 || used == 0 || l < 0 || (size_t)l >= L) {
            if (!(embed_on_host && strcmp(t->name, "token_embd.weight") == 0))
                b->global += dev;
            continue;
        }
        if (!is_stream_matrix(t->name + used)) {
            b->fixed[l] += dev;
            continue;
        }
        b->mats[l] += t->size;
        if (n_mats[l]++ == 0 || t->offset < lo[l])
            lo[l] = t->offset;
        hi[l] = t->offset + t->size > hi[l] ? t->offset + t->size : hi[l];
    }
    b->streamable = true;
    for (size_t l = 0; l < L; l++) {
        b->span[l] = hi[l] - lo[l];
        b->streamable = b->streamable && n_mats[l] == 7;
    }
    for (size_t i = 0; i < zse_file_n_expert_banks(f); i++) {
        const zse_expert_bank *k = zse_file_expert_bank_at(f, i);
        b->experts[k->layer] = (uint64_t)k->count * k->size;
        b->expert_slot = align256(k->size) > b->expert_slot ? align256(k->size) : b->expert_slot;
        b->expert_tables += (uint64_t)k->count * 8;
        b->experts_total += k->count;
    }
    free(lo);
    free(hi);
    free(n_mats);
    return 0;
}

static uint64_t sum(const uint64_t *v, int n)
{
    uint64_t s = 0;
    for (int i = 0; i < n; i++)
        s += v[i];
    return s;
}

/* k of n layers spread evenly (so the copies of streamed layers overlap resident layers'
 * compute): layer l streams when floor((l + 1) k / n) > floor(l k / n) */
static void spread(uint8_t *streamed, int n, int k)
{
    for (int l = 0; l < n; l++)
        streamed[l] = (uint8_t)(((int64_t)(l + 1) * k) / n > ((int64_t)l * k) / n);
}

const char *zse_fit_mode_name(zse_fit_mode mode)
{
    return mode == ZSE_FIT_EXPERTS ? "experts offloaded" : mode == ZSE_FIT_STREAM ? "streamed" : "resident";
}

void zse_fit_free(zse_fit *fit)
{
    free(fit->streamed);
    fit->streamed = NULL;
}

void zse_fit_placement(const zse_fit *fit, zse_placement *pl)
{
    memset(pl, 0, sizeof *pl);
    if (fit->mode == ZSE_FIT_EXPERTS)
        pl->expert_slots = fit->expert_slots;
    if (fit->mode == ZSE_FIT_STREAM) {
        pl->streamed = fit->streamed;
        pl->stream_buffers = fit->stream_buffers;
    }
}

/* the KV the engine will find room for after `held`: what is left less its reserve,
 * capped at what was asked */
static uint64_t kv_after(uint64_t budget, uint64_t held, uint64_t want)
{
    if (held >= budget)
        return 0;
    const uint64_t room = budget - held;
    const uint64_t reserve = room / 20 > RESERVE_FLOOR ? room / 20 : RESERVE_FLOOR;
    const uint64_t fit = room > reserve ? room - reserve : 0;
    return fit < want ? fit : want;
}

static int fit_experts(const zse_file *f, const zse_fit_in *in, const file_bytes *b, zse_fit *out)
{
    const zse_config *c = zse_file_config(f);
    const int L = c->n_layers;
    /* the step's predicted routing for the next layer's prefetch: its logits and arrays */
    const uint64_t pred = (uint64_t)in->max_tokens * (uint64_t)((c->n_experts + 3) / 4 * 4) * 4 +
                          (uint64_t)in->max_tokens * (uint64_t)c->n_experts_used * 16 + 1024;
    const uint64_t fixed = b->global + sum(b->fixed, L) + sum(b->mats, L) + b->expert_tables + out->act_bytes + pred;
    const uint64_t least = (uint64_t)c->n_experts * b->expert_slot;
    out->mode = ZSE_FIT_EXPERTS;
    out->minimum = fixed + least + room_for(in->kv_min);
    out->experts_total = b->experts_total;
    out->expert_slot_bytes = b->expert_slot;
    out->host_weights = sum(b->experts, L);
    out->device_weights = b->global + sum(b->fixed, L) + sum(b->mats, L);
    if (out->minimum > in->budget)
        return zse_fail("the model needs at least %.0f MiB of GPU memory with its experts in host memory (weights "
                        "outside the experts %.0f MiB, a cache for one layer's %d experts %.0f MiB, activations "
                        "%.0f MiB, the KV cache of one context %.0f MiB and a reserve); %s %.0f MiB: give more "
                        "--gpu-memory, a shorter --ctx or --kv-cache int8",
                        (double)out->minimum / MIB, (double)out->device_weights / MIB, c->n_experts,
                        (double)least / MIB, (double)(out->act_bytes + pred) / MIB, (double)in->kv_min / MIB,
                        in->budget_what ? in->budget_what : "the budget is", (double)in->budget / MIB);
    const uint64_t kv = fixed + least + room_for(in->kv_want) <= in->budget ? in->kv_want : in->kv_min;
    uint64_t slots = (in->budget - fixed - room_for(kv)) / b->expert_slot;
    if (slots > (uint64_t)b->experts_total)
        slots = (uint64_t)b->experts_total;
    if (in->force_expert_slots > 0 && slots > (uint64_t)in->force_expert_slots)
        slots = (uint64_t)in->force_expert_slots;
    if (slots < (uint64_t)c->n_experts)
        return zse_fail("an expert cache of %llu experts cannot hold one layer's %d (ZSE_EXPERT_CACHE)",
                        (unsigned long long)slots, c->n_experts);
    out->expert_slots = (int)slots;
    out->slab_bytes = slots * b->expert_slot;
    out->kv_bytes = kv_after(in->budget, fixed + out->slab_bytes, in->kv_want);
    return 0;
}

/* the device bytes with k layers streamed (spread) through min(buffers, k) buffers */
static uint64_t stream_need(const file_bytes *b, int L, int k, int buffers, uint64_t base, uint8_t *streamed,
                            uint64_t *slot)
{
    spread(streamed, L, k);
    uint64_t resident = 0, span = 0;
    for (int l = 0; l < L; l++) {
        if (streamed[l])
            span = align256(b->span[l]) > span ? align256(b->span[l]) : span;
        else
            resident += b->mats[l];
    }
    *slot = span;
    return base + resident + (uint64_t)(buffers < k ? buffers : k) * span;
}

static int fit_stream(const zse_file *f, const zse_fit_in *in, const file_bytes *b, zse_fit *out)
{
    const zse_config *c = zse_file_config(f);
    const int L = c->n_layers;
    const int B = in->stream_buffers > 0 ? in->stream_buffers : 2;
    const uint64_t base = b->global + sum(b->fixed, L) + out->act_bytes;
    if (!(out->streamed = zse_calloc((size_t)L, 1)))
        return -1;
    out->mode = ZSE_FIT_STREAM;
    uint64_t slot;
    out->minimum = stream_need(b, L, L, B, base, out->streamed, &slot) + room_for(in->kv_min);
    if (out->minimum > in->budget)
        return zse_fail("the model needs at least %.0f MiB of GPU memory with every layer streamed from host "
                        "memory (weights outside the layers' matrices %.0f MiB, %d layer buffers of %.0f MiB, "
                        "activations %.0f MiB, the KV cache of one context %.0f MiB and a reserve); %s %.0f MiB: "
                        "give more --gpu-memory, a shorter --ctx or --kv-cache int8",
                        (double)out->minimum / MIB, (double)(b->global + sum(b->fixed, L)) / MIB, B < L ? B : L,
                        (double)slot / MIB, (double)out->act_bytes / MIB, (double)in->kv_min / MIB,
                        in->budget_what ? in->budget_what : "the budget is", (double)in->budget / MIB);
    const uint64_t kv = stream_need(b, L, L, B, base, out->streamed, &slot) + room_for(in->kv_want) <= in->budget
                            ? in->kv_want
                            : in->kv_min;
    /* the fewest streamed layers that fit, from a first guess by the average layer */
    const uint64_t all = base + sum(b->mats, L) + room_for(kv);
    const uint64_t avg = sum(b->mats, L) / (uint64_t)L + 1;
    int k = all > in->budget ? (int)((all - in->budget) / avg) : 0;
    k = k < 1 ? 1 : k > L ? L : k;
    if (k < in->force_streamed)
        k = in->force_streamed < L ? in->force_streamed : L;
    while (k > 1 && stream_need(b, L, k - 1, B, base, out->streamed, &slot) + room_for(kv) <= in->budget &&
           k - 1 >= in->force_streamed)
        k--;
    while (k < L && stream_need(b, L, k, B, base, out->streamed, &slot) + room_for(kv) > in->budget)
        k++;
    const uint64_t need = stream_need(b, L, k, B, base, out->streamed, &slot);
    out->layers_streamed = k;
    out->stream_buffers = B < k ? B : k;
    out->layer_buffer_bytes = slot;
    out->slab_bytes = (uint64_t)out->stream_buffers * slot;
    out->host_weights = 0;
    for (int l = 0; l < L; l++)
        out->host_weights += out->streamed[l] ? b->mats[l] : 0;
    out->device_weights = need - out->act_bytes - out->slab_bytes;
    out->kv_bytes = kv_after(in->budget, need, in->kv_want);
    return 0;
}

int zse_llm_fit(const zse_file *f, const zse_fit_in *in, zse_fit *out)
{
    const zse_config *c = zse_file_config(f);
    memset(out, 0, sizeof *out);
    out->n_layers = c->n_layers;
    file_bytes b;
    if (count_bytes(f, in->embed_on_host, &b) != 0)
        return -1;
    out->act_bytes = zse_llm_act_bytes(c, in->max_tokens, in->max_out);
    const int L = c->n_layers;
    const uint64_t weights = b.global + sum(b.fixed, L) + sum(b.mats, L) + sum(b.experts, L) + b.expert_tables;
    const uint64_t resident = weights + out->act_bytes + room_for(in->kv_min);
    const bool forced = (c->n_experts > 0 && in->force_expert_slots > 0) || (c->n_experts == 0 && in->force_streamed > 0);
    int rc = 0;
    if (resident <= in->budget && !forced) {
        out->mode = ZSE_FIT_RESIDENT;
        out->device_weights = weights;
        out->minimum = resident;
        out->kv_bytes = kv_after(in->budget, weights + out->act_bytes, in->kv_want);
    } else if (c->n_experts > 0) {
        rc = fit_experts(f, in, &b, out);
    } else if (!b.streamable) {
        rc = zse_fail("the model needs %.0f MiB of GPU memory resident and its layers cannot be streamed; %s %.0f MiB",
                      (double)resident / MIB, in->budget_what ? in->budget_what : "the budget is",
                      (double)in->budget / MIB);
    } else {
        rc = fit_stream(f, in, &b, out);
    }
    file_bytes_free(&b);
    if (out->kv_bytes < in->kv_min && rc == 0)
        rc = zse_fail("internal: the fit left %.0f MiB for the KV cache, less than one context's %.0f MiB",
                      (double)out->kv_bytes / MIB, (double)in->kv_min / MIB);
    if (rc == 0) {
        const uint64_t held = out->device_weights + out->slab_bytes + out->act_bytes + out->kv_bytes;
        out->reserve = in->budget > held ? in->budget - held : 0;
    } else {
        zse_fit_free(out); /* the counts stay: minimum says what would run */
    }
    return rc;
}
