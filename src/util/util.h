/* util — errors, logging, checked allocation, file mapping, hashing, thread pool,
 * progress bar, small JSON helpers. Everything above this folder may call it; it calls
 * nothing of zse. */
#ifndef ZSE_UTIL_H
#define ZSE_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

/* ---- errors ---------------------------------------------------------------
 * A failing function records one message (what, where, what to do) in a thread-local
 * buffer and returns an error value (-1 / NULL / false). The caller either adds context
 * with zse_error_prefix() or reports zse_error_message() to the user. */
#define ZSE_ERROR_MAX 1024
int zse_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));  /* returns -1 */
void zse_error_prefix(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
const char *zse_error_message(void);
void zse_error_clear(void);

/* ---- logging (stderr) ----------------------------------------------------- */
enum zse_log_level { ZSE_LOG_DEBUG, ZSE_LOG_INFO, ZSE_LOG_WARN, ZSE_LOG_ERROR };
void zse_log_set_level(enum zse_log_level level);
void zse_log(enum zse_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- checked allocation: NULL plus a recorded error on failure ------------- */
void *zse_malloc(size_t n);
void *zse_calloc(size_t count, size_t size);
void *zse_realloc(void *p, size_t n);
char *zse_strdup(const char *s);
char *zse_strndup(const char *s, size_t n);
void *zse_aligned_alloc(size_t alignment, size_t n); /* free with free() */
/* a * b without overflow; false when it would overflow */
bool zse_mul_ok(size_t a, size_t b, size_t *out);
bool zse_add_ok(size_t a, size_t b, size_t *out);
/* makes room for `need` elements of `elem` bytes in the array *p of *cap (doubling, at least
 * `first`); 0, or -1 with *p and *cap unchanged (still the caller's to free) */
int zse_grow(void **p, size_t *cap, size_t need, size_t elem, size_t first);

/* ---- growable byte buffer ------------------------------------------------- */
typedef struct {
    char *data;     /* always NUL-terminated when len > 0 or after zse_buf_str() */
    size_t len;
    size_t cap;
} zse_buf;
int zse_buf_reserve(zse_buf *b, size_t extra);
int zse_buf_append(zse_buf *b, const void *p, size_t n);
int zse_buf_puts(zse_buf *b, const char *s);
int zse_buf_printf(zse_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *zse_buf_str(zse_buf *b); /* "" for an empty buffer */
void zse_buf_free(zse_buf *b);

/* ---- read-only file mapping ----------------------------------------------- */
typedef struct {
    const uint8_t *data;
    size_t size;
    char *path;
} zse_map;
int zse_map_open(zse_map *m, const char *path);   /* empty files map to size 0, data NULL */
void zse_map_close(zse_map *m);
/* the whole file into a NUL-terminated heap buffer (small files: JSON, templates) */
char *zse_read_file(const char *path, size_t *size_out);
bool zse_file_exists(const char *path);
char *zse_path_join(const char *dir, const char *name);

/* ---- hashing -------------------------------------------------------------- */
uint64_t zse_hash64(const void *p, size_t n);           /* XXH3-64 */
typedef struct zse_hash_state zse_hash_state;
zse_hash_state *zse_hash_new(void);
void zse_hash_update(zse_hash_state *s, const void *p, size_t n);
uint64_t zse_hash_digest(zse_hash_state *s);
void zse_hash_free(zse_hash_state *s);
/* SHA-256 of a file as 64 hex characters + NUL */
int zse_sha256_file(const char *path, char out_hex[65]);

/* ---- time ----------------------------------------------------------------- */
double zse_now(void); /* monotonic seconds */

/* ---- thread pool -----------------------------------------------------------
 * zse_pool_run(pool, fn, arg) calls fn(arg, i, n) for i in 0..n-1 on n threads
 * (the caller is thread 0) and returns when all are done. */
typedef struct zse_pool zse_pool;
typedef void (*zse_pool_fn)(void *arg, int ith, int nth);
zse_pool *zse_pool_create(int n_threads);
int zse_pool_size(const zse_pool *pool);
void zse_pool_run(zse_pool *pool, zse_pool_fn fn, void *arg);
void zse_pool_free(zse_pool *pool);
int zse_physical_cores(void);

/* ---- progress bar (drawn only when stderr is a terminal) ------------------ */
typedef struct {
    bool enabled;
    double start;
    double last_draw;
    uint64_t total_bytes;
} zse_progress;
void zse_progress_begin(zse_progress *p, uint64_t total_bytes);
void zse_progress_update(zse_progress *p, const char *what, uint64_t done_bytes);
void zse_progress_end(zse_progress *p);

/* ---- small parsing helpers ------------------------------------------------ */
/* strict integer / float parsing of a whole string; false on junk or overflow */
bool zse_parse_i64(const char *s, int64_t *out);
bool zse_parse_f64(const char *s, double *out);
/* "4G", "512M", "100000" -> bytes */
bool zse_parse_size(const char *s, uint64_t *out);
/* exactly 16 lowercase hex digits (how .zse and .zsa headers write a checksum) */
bool zse_parse_hex64(const char *s, uint64_t *out);
/* the little-endian u64 at p (any alignment): file headers */
uint64_t zse_load_le64(const uint8_t *p);
/* ---- vectors ---------------------------------------------------------------- */
/* the index of the largest of v[0..n), the lowest on ties; NaNs never win (0 when all are
 * NaN). The one greedy rule: the host sampler, the CPU backend and the CUDA argmax kernel
 * (src/backend/cuda/sample.cu) pick the same id from the same logits. */
int64_t zse_argmax_f32(const float *v, int64_t n);

/* shell-style glob match ("*" and "?"), used for --keep-fp16 PATTERN */
bool zse_glob_match(const char *pattern, const char *text);

#endif
