/* libFuzzer target: the .zse reader must reject any malformed file cleanly, and anything
 * it accepts must be safe to walk (every tensor's bytes inside the mapping). */
#include "format/format.h"

#include <stdio.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/tmp/fuzz-zse-%d.zse", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f)
        return 0;
    fwrite(data, 1, size, f);
    fclose(f);
    zse_file *z = zse_file_open(path);
    if (z) {
        int bad;
        zse_file_verify(z, &bad);
        for (size_t i = 0; i < zse_file_n_tensors(z); i++) {
            const zse_tensor_info *t = zse_file_tensor_at(z, i);
            float row[64];
            if (t->q.cols <= 64)
                zse_dequantize_row(&t->q, t->data, t->q.rows - 1, row);
        }
        zse_file_close(z);
    }
    unlink(path);
    return 0;
}
