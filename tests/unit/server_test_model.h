/* The server tests' model: tests/fixtures/tiny-qwen2 converted with the zse command into
 * a temporary folder (a fraction of a second), loaded through the public API. Tests skip
 * (77) when the command or the fixture is missing. */
#ifndef ZSE_SERVER_TEST_MODEL_H
#define ZSE_SERVER_TEST_MODEL_H

#include "test.h"

#include "zse.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static char server_test_dir[] = "/tmp/zse-server-test-XXXXXX";

static void server_test_cleanup(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", server_test_dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", server_test_dir);
}

/* converts and loads the fixture; exits 77 when it cannot be had */
static zse_model *server_test_model(const char *quant, int max_seqs)
{
    const char *bin = test_env("ZSE_BIN");
    const char *data = test_env("ZSE_TEST_DATA");
    if (!bin || !data) {
        fprintf(stderr, "skip: ZSE_BIN and ZSE_TEST_DATA must be set\n");
        exit(77);
    }
    char src[1024];
    snprintf(src, sizeof src, "%s/tiny-qwen2/model.safetensors", data);
    if (access(src, R_OK) != 0) {
        fprintf(stderr, "skip: %s is missing\n", src);
        exit(77);
    }
    if (!mkdtemp(server_test_dir)) {
        perror("mkdtemp");
        exit(1);
    }
    atexit(server_test_cleanup);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "'%s' convert '%s/tiny-qwen2' -o '%s/tiny-qwen2.zse' --quant %s >/dev/null 2>&1", bin, data,
             server_test_dir, quant);
    if (system(cmd) != 0) {
        fprintf(stderr, "cannot convert the fixture: %s\n", cmd);
        exit(1);
    }
    snprintf(src, sizeof src, "%s/tiny-qwen2.zse", server_test_dir);
    zse_load_params p;
    zse_load_params_default(&p);
    p.device = "cpu";
    p.threads = 1;
    p.max_seqs = max_seqs;
    zse_model *m = zse_model_load(src, &p);
    if (!m) {
        fprintf(stderr, "cannot load %s: %s\n", src, zse_last_error());
        exit(1);
    }
    return m;
}

#endif
