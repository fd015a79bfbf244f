/* Progress bar and strict parsing helpers. */
#include "util/util.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void zse_progress_begin(zse_progress *p, uint64_t total_bytes)
{
    p->enabled = isatty(STDERR_FILENO);
    p->start = zse_now();
    p->last_draw = 0;
    p->total_bytes = total_bytes;
}

void zse_progress_update(zse_progress *p, const char *what, uint64_t done)
{
    if (!p->enabled)
        return;
    double now = zse_now();
    if (now - p->last_draw < 0.1 && done < p->total_bytes)
        return;
    p->last_draw = now;
    double el = now - p->start;
    double rate = el > 0 ? (double)done / el : 0;
    double frac = p->total_bytes ? (double)done / (double)p->total_bytes : 1.0;
    if (frac > 1)
        frac = 1;
    double eta = rate > 0 ? (double)(p->total_bytes - (done < p->total_bytes ? done : p->total_bytes)) / rate : 0;
    char bar[31];
    int fill = (int)(frac * 30);
    for (int i = 0; i < 30; i++)
        bar[i] = i < fill ? '#' : '.';
    bar[30] = '\0';
    fprintf(stderr, "\r[%s] %5.1f%% %8.1f/%.1f MB %7.1f MB/s ETA %4.0fs %-40.40s", bar,
            frac * 100, (double)done / 1e6, (double)p->total_bytes / 1e6, rate / 1e6, eta,
            what ? what : "");
    fflush(stderr);
}

void zse_progress_end(zse_progress *p)
{
    if (p->enabled) {
        fprintf(stderr, "\n");
        fflush(stderr);
    }
}

bool zse_parse_i64(const char *s, int64_t *out)
{
    if (!s || !*s)
        return false;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end)
        return false;
    *out = v;
    return true;
}

bool zse_parse_hex64(const char *s, uint64_t *out)
{
    if (!s || strlen(s) != 16)
        return false;
    uint64_t x = 0;
    for (int i = 0; i < 16; i++) {
        const char c = s[i];
        const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0)
            return false;
        x = x << 4 | (uint64_t)d;
    }
    *out = x;
    return true;
}

uint64_t zse_load_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

bool zse_parse_f64(const char *s, double *out)
{
    if (!s || !*s)
        return false;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v))
        return false;
    *out = v;
    return true;
}

bool zse_parse_size(const char *s, uint64_t *out)
{
    if (!s || !*s)
        return false;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || v < 0 || !isfinite(v))
        return false;
    double mul = 1;
    switch (*end) {
    case 'k': case 'K': mul = 1024.0; end++; break;
    case 'm': case 'M': mul = 1024.0 * 1024; end++; break;
    case 'g': case 'G': mul = 1024.0 * 1024 * 1024; end++; break;
    case 't': case 'T': mul = 1024.0 * 1024 * 1024 * 1024; end++; break;
    default: break;
    }
    if (*end == 'i' || *end == 'I')
        end++;
    if (*end == 'b' || *end == 'B')
        end++;
    if (*end)
        return false;
    double bytes = v * mul;
    if (bytes >= 18446744073709551615.0)
        return false;
    *out = (uint64_t)bytes;
    return true;
}

bool zse_glob_match(const char *pat, const char *text)
{
    /* iterative matcher with single-star backtracking: linear in practice */
    const char *star = NULL, *resume = NULL;
    while (*text) {
        if (*pat == '*') {
            star = pat++;
            resume = text;
        } else if (*pat == '?' || *pat == *text) {
            pat++;
            text++;
        } else if (star) {
            pat = star + 1;
            text = ++resume;
        } else {
            return false;
        }
    }
    while (*pat == '*')
        pat++;
    return *pat == '\0';
}

int64_t zse_argmax_f32(const float *v, int64_t n)
{
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (isnan(v[best]) ? !isnan(v[i]) : v[i] > v[best])
            best = i;
    return best;
}
