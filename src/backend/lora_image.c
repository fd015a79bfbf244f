/* The one check of a LoRA slot image that every backend's lora_slot_load makes before it
 * copies one (backend.h §LoRA adapter slots): kept apart from backend.c so that the device
 * tests (tests/gpu/backend_test.c) link it without the rest of the library. */
#include "backend/backend.h"

#include <string.h>

static const char *const module_names[ZSE_LORA_MODULES] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                                           "ffn_gate", "ffn_up", "ffn_down"};

/* every entry of an image points inside it, at parts of the widths the pool was made for */
int zse_lora_image_check(const zse_lora_shape *s, const void *image_, size_t bytes)
{
    const uint8_t *image = image_;
    const size_t table = (size_t)s->n_layers * ZSE_LORA_MODULES * sizeof(zse_lora_entry);
    if (bytes < table || bytes > s->slot_bytes)
        return zse_fail("LoRA slot image of %zu bytes (a slot holds %llu, its table %zu)", bytes,
                        (unsigned long long)s->slot_bytes, table);
    for (int i = 0; i < s->n_layers * ZSE_LORA_MODULES; i++) {
        zse_lora_entry e;
        memcpy(&e, image + (size_t)i * sizeof e, sizeof e);
        if (e.rank == 0)
            continue;
        const int m = i % ZSE_LORA_MODULES;
        const int64_t as = (int64_t)e.rank * s->in[m] * 2, bs = (int64_t)e.rank * s->out[m] * 2;
        if (e.rank < 0 || e.rank > ZSE_LORA_MAX_RANK || e.a < (int64_t)table || e.bt < (int64_t)table ||
            e.a % 64 || e.bt % 64 || e.a > (int64_t)bytes - as || e.bt > (int64_t)bytes - bs)
            return zse_fail("LoRA slot image: layer %d's %s entry is out of bounds", i / ZSE_LORA_MODULES,
                            module_names[m]);
    }
    return 0;
}
