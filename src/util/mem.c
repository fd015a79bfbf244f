/* Checked allocation and the growable buffer. */
#include "util/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *zse_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        zse_fail("out of memory allocating %zu bytes", n);
    return p;
}

void *zse_calloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        zse_fail("out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

void *zse_realloc(void *old, size_t n)
{
    void *p = realloc(old, n ? n : 1);
    if (!p)
        zse_fail("out of memory growing a buffer to %zu bytes", n);
    return p;
}

char *zse_strndup(const char *s, size_t n)
{
    char *p = zse_malloc(n + 1);
    if (!p)
        return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

char *zse_strdup(const char *s)
{
    return zse_strndup(s, strlen(s));
}

void *zse_aligned_alloc(size_t alignment, size_t n)
{
    void *p = NULL;
    if (posix_memalign(&p, alignment, n ? n : alignment) != 0) {
        zse_fail("out of memory allocating %zu aligned bytes", n);
        return NULL;
    }
    return p;
}

int zse_grow(void **p, size_t *cap, size_t need, size_t elem, size_t first)
{
    if (need <= *cap)
        return 0;
    size_t ncap = *cap ? *cap : (first ? first : 1), bytes;
    while (ncap < need)
        if (!zse_mul_ok(ncap, 2, &ncap))
            return zse_fail("an array of %zu elements is too large", need);
    if (!zse_mul_ok(ncap, elem, &bytes))
        return zse_fail("an array of %zu elements of %zu bytes is too large", ncap, elem);
    void *np = zse_realloc(*p, bytes);
    if (!np)
        return -1;
    *p = np;
    *cap = ncap;
    return 0;
}

bool zse_mul_ok(size_t a, size_t b, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

bool zse_add_ok(size_t a, size_t b, size_t *out)
{
    return !__builtin_add_overflow(a, b, out);
}

int zse_buf_reserve(zse_buf *b, size_t extra)
{
    size_t need;
    if (!zse_add_ok(b->len, extra + 1, &need))
        return zse_fail("buffer size overflow");
    if (need <= b->cap) {
        b->data[b->len] = '\0';
        return 0;
    }
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *p = zse_realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    b->data[b->len] = '\0'; /* reserve(b, 0) gives a valid empty string */
    return 0;
}

int zse_buf_append(zse_buf *b, const void *p, size_t n)
{
    if (zse_buf_reserve(b, n) != 0)
        return -1;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int zse_buf_puts(zse_buf *b, const char *s)
{
    return zse_buf_append(b, s, strlen(s));
}

int zse_buf_printf(zse_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return zse_fail("formatting failed");
    if (zse_buf_reserve(b, (size_t)n) != 0)
        return -1;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

const char *zse_buf_str(zse_buf *b)
{
    return b->data ? b->data : "";
}

void zse_buf_free(zse_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
