/* Thread-local error message and stderr logging. */
#include "util/util.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

static _Thread_local char error_text[ZSE_ERROR_MAX];

int zse_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_text, sizeof error_text, fmt, ap);
    va_end(ap);
    return -1;
}

/* "prefix: old message" — lets each layer say where the error happened */
void zse_error_prefix(const char *fmt, ...)
{
    char prefix[ZSE_ERROR_MAX];
    char old[ZSE_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, error_text, sizeof old);
    /* built piecewise: the combined text is cut at ZSE_ERROR_MAX on purpose */
    size_t n = strnlen(prefix, sizeof error_text - 1);
    memcpy(error_text, prefix, n);
    if (old[0] && n + 2 < sizeof error_text) {
        memcpy(error_text + n, ": ", 2);
        n += 2;
        size_t m = strnlen(old, sizeof error_text - 1 - n);
        memcpy(error_text + n, old, m);
        n += m;
    }
    error_text[n] = '\0';
}

const char *zse_error_message(void)
{
    return error_text[0] ? error_text : "unknown error";
}

void zse_error_clear(void)
{
    error_text[0] = '\0';
}

static enum zse_log_level log_threshold = ZSE_LOG_INFO;

void zse_log_set_level(enum zse_log_level level)
{
    log_threshold = level;
}

void zse_log(enum zse_log_level level, const char *fmt, ...)
{
    static const char *names[] = {"debug", "info", "warn", "error"};
    if (level < log_threshold)
        return;
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    /* one write per line so concurrent threads do not interleave */
    fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %s\n", tm.tm_year + 1900,
            tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
            ts.tv_nsec / 1000000, names[level], line);
}
