/* The model the server's fuzz targets run against: tests/fixtures/tiny-llama (or the
 * folder ZSE_FUZZ_TOKENIZER names), converted once into a temporary file and loaded on the
 * CPU. A misconfigured run aborts: it is not a pass. */
#ifndef ZSE_FUZZ_MODEL_H
#define ZSE_FUZZ_MODEL_H

#include "format/format.h"
#include "zse.h"

#include <stdbool.h>

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static zse_model *fuzz_load_model(const char *target)
{
    const char *dir = getenv("ZSE_FUZZ_TOKENIZER");
    if (!dir)
        dir = "tests/fixtures/tiny-llama";
    static char tmp[] = "/tmp/zse-fuzz-model-XXXXXX";
    if (!mkdtemp(tmp))
        abort();
    char path[256];
    snprintf(path, sizeof path, "%s/model.zse", tmp);
    zse_convert_opts o = {.scheme = ZSE_SCHEME_Q8, .group_size = 128, .embed_scheme = -1, .lm_head_scheme = -1,
                          .force = true, .threads = 1};
    zse_load_params p;
    zse_load_params_default(&p);
    p.device = "cpu";
    p.threads = 1;
    zse_model *m = zse_convert(dir, path, &o) == 0 ? zse_model_load(path, &p) : NULL;
    unlink(path);
    rmdir(tmp);
    if (!m) {
        fprintf(stderr, "%s: cannot make the model: %s\n", target, zse_last_error());
        abort();
    }
    return m;
}

#endif
