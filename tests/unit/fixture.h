/* The engine tests' model: a fixture folder converted to f32 in /tmp (a fraction of a
 * second), and paths of other fixture files. Header-only, like test.h. */
#ifndef ZSE_TEST_FIXTURE_H
#define ZSE_TEST_FIXTURE_H

#include "test.h"

#include "format/format.h"
#include "zse.h"

#include <stdio.h>
#include <unistd.h>

/* `name` below $ZSE_TEST_DATA (else tests/fixtures) into out */
static inline void test_fixture_path(const char *name, char *out, size_t cap)
{
    const char *data = test_env("ZSE_TEST_DATA");
    snprintf(out, cap, "%s/%s", data ? data : "tests/fixtures", name);
}

/* converts fixture folder `name` to f32 at /tmp/zse-test-TAG-PID.zse (into path); 0, or -1
 * after saying why. The caller removes the file. */
static inline int test_convert_fixture(const char *name, const char *tag, char *path, size_t cap)
{
    char dir[512];
    test_fixture_path(name, dir, sizeof dir);
    snprintf(path, cap, "/tmp/zse-test-%s-%d.zse", tag, (int)getpid());
    zse_convert_opts o = {.scheme = ZSE_SCHEME_F32, .embed_scheme = -1, .lm_head_scheme = -1, .force = true};
    if (zse_convert(dir, path, &o) != 0) {
        fprintf(stderr, "cannot convert %s: %s\n", dir, zse_last_error());
        return -1;
    }
    return 0;
}

#endif
