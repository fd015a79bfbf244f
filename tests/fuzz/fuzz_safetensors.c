/* libFuzzer target: the safetensors reader on arbitrary bytes. */
#include "format/format.h"

#include <stdio.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/tmp/fuzz-st-%d.safetensors", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f)
        return 0;
    fwrite(data, 1, size, f);
    fclose(f);
    zse_safetensors st;
    if (zse_st_open(&st, path) == 0) {
        for (size_t i = 0; i < st.n_tensors; i++) {
            float v[16];
            size_t n = st.tensors[i].size / 4 < 16 ? st.tensors[i].size / 4 : 16;
            zse_st_read_f32(&st.tensors[i], 0, n, v);
        }
        zse_st_close(&st);
    }
    unlink(path);
    return 0;
}
