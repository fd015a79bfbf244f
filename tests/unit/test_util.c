/* util: buffers, parsing, glob, hashing, thread pool, errors. */
#include "test.h"

#include "util/util.h"

#include <stdatomic.h>

static atomic_int pool_hits;

static void count_thread(void *arg, int ith, int nth)
{
    int *slots = arg;
    slots[ith] = nth;
    atomic_fetch_add(&pool_hits, 1);
}

int main(void)
{
    zse_buf b = {0};
    CHECK_EQ_STR(zse_buf_str(&b), "");
    for (int i = 0; i < 1000; i++)
        CHECK(zse_buf_printf(&b, "%d,", i) == 0);
    CHECK(b.len == 3890);
    CHECK(strncmp(b.data, "0,1,2,", 6) == 0);
    zse_buf_free(&b);

    int64_t i64;
    CHECK(zse_parse_i64("42", &i64) && i64 == 42);
    CHECK(!zse_parse_i64("42x", &i64));
    CHECK(!zse_parse_i64("", &i64));
    CHECK(!zse_parse_i64("99999999999999999999999", &i64));
    double d;
    CHECK(zse_parse_f64("0.5", &d) && d == 0.5);
    CHECK(!zse_parse_f64("nan", &d));
    uint64_t sz;
    CHECK(zse_parse_size("4G", &sz) && sz == 4ull << 30);
    CHECK(zse_parse_size("512MiB", &sz) && sz == 512ull << 20);
    CHECK(!zse_parse_size("-1", &sz));
    CHECK(!zse_parse_size("12Q", &sz));
    uint64_t h = 0;
    CHECK(zse_parse_hex64("0123456789abcdef", &h) && h == 0x0123456789abcdefull);
    CHECK(!zse_parse_hex64("0123456789ABCDEF", &h)); /* the files write lowercase */
    CHECK(!zse_parse_hex64("0123456789abcde", &h) && !zse_parse_hex64("0123456789abcdef0", &h));
    CHECK(!zse_parse_hex64("0123456789abcdeg", &h) && !zse_parse_hex64(NULL, &h));
    const uint8_t le[8] = {0xef, 0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01};
    CHECK(zse_load_le64(le) == 0x0123456789abcdefull);

    CHECK(zse_glob_match("*embed*", "model.embed_tokens.weight"));
    CHECK(zse_glob_match("blk.?.attn_q*", "blk.3.attn_q.weight"));
    CHECK(!zse_glob_match("blk.?.attn_q*", "blk.13.attn_q.weight"));
    CHECK(zse_glob_match("*", ""));
    CHECK(!zse_glob_match("a*b", "acd"));

    CHECK(zse_hash64("abc", 3) == zse_hash64("abc", 3));
    CHECK(zse_hash64("abc", 3) != zse_hash64("abd", 3));
    zse_hash_state *hs = zse_hash_new();
    CHECK(hs != NULL);
    zse_hash_update(hs, "ab", 2);
    zse_hash_update(hs, "c", 1);
    CHECK(zse_hash_digest(hs) == zse_hash64("abc", 3));
    zse_hash_free(hs);

    CHECK(zse_fail("value %d is bad", 7) == -1);
    zse_error_prefix("in %s", "file.zse");
    CHECK_EQ_STR(zse_error_message(), "in file.zse: value 7 is bad");

    size_t out;
    CHECK(!zse_mul_ok(SIZE_MAX / 2, 3, &out));
    CHECK(zse_mul_ok(1000, 1000, &out) && out == 1000000);

    /* zse_grow: doubling from `first`, room for what is asked, the array kept on failure */
    int *arr = NULL;
    size_t cap = 0;
    CHECK(zse_grow((void **)&arr, &cap, 1, sizeof *arr, 16) == 0 && arr && cap == 16);
    for (int i = 0; i < 16; i++)
        arr[i] = i;
    CHECK(zse_grow((void **)&arr, &cap, 16, sizeof *arr, 16) == 0 && cap == 16); /* room already */
    CHECK(zse_grow((void **)&arr, &cap, 17, sizeof *arr, 16) == 0 && cap == 32 && arr[15] == 15);
    CHECK(zse_grow((void **)&arr, &cap, 100, sizeof *arr, 16) == 0 && cap == 128 && arr[7] == 7);
    int *kept = arr;
    CHECK(zse_grow((void **)&arr, &cap, SIZE_MAX / 2, sizeof *arr, 16) == -1 && arr == kept && cap == 128);
    CHECK(strstr(zse_error_message(), "too large") != NULL);
    free(arr);

    zse_pool *pool = zse_pool_create(3);
    CHECK(pool != NULL);
    int slots[3] = {0};
    for (int round = 0; round < 200; round++)
        zse_pool_run(pool, count_thread, slots);
    CHECK(atomic_load(&pool_hits) == 600);
    CHECK(slots[0] == 3 && slots[1] == 3 && slots[2] == 3);
    zse_pool_free(pool);
    CHECK(zse_physical_cores() >= 1);

    zse_map m;
    CHECK(zse_map_open(&m, "/nonexistent/file") == -1);
    CHECK(strstr(zse_error_message(), "/nonexistent/file") != NULL);
    return test_main_end();
}
