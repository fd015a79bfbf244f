/* A tiny test harness: CHECK records failures and keeps going; test_main_end() prints
 * "N passed, N failed" and returns the exit code. Header-only so every test is one file. */
#ifndef ZSE_TEST_H
#define ZSE_TEST_H

#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int test_passed, test_failed;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (cond) {                                                                  \
            test_passed++;                                                           \
        } else {                                                                     \
            test_failed++;                                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

#define CHECK_MSG(cond, ...)                                                         \
    do {                                                                             \
        if (cond) {                                                                  \
            test_passed++;                                                           \
        } else {                                                                     \
            test_failed++;                                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                            \
            fprintf(stderr, "\n");                                                   \
        }                                                                            \
    } while (0)

#define CHECK_EQ_INT(a, b) CHECK_MSG((long long)(a) == (long long)(b), "%lld != %lld", (long long)(a), (long long)(b))
#define CHECK_EQ_STR(a, b) CHECK_MSG(strcmp((a), (b)) == 0, "\"%s\" != \"%s\"", (a), (b))
#define CHECK_NEAR(a, b, tol) CHECK_MSG(fabs((double)(a) - (double)(b)) <= (tol), "%g vs %g (tol %g)", (double)(a), (double)(b), (double)(tol))

/* the directory of an environment variable, or NULL (tests needing it skip) */
static inline const char *test_env(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

/* The engine tests' wait: their callbacks raise *count under mu and signal cv; this takes
 * mu and waits until *count >= n, for at most 300 s (false then: a hang is a failure, not a
 * stuck test). reset: *count goes back to 0 for the next round. */
static inline bool test_wait_count(pthread_mutex_t *mu, pthread_cond_t *cv, int *count, int n, bool reset)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    bool ok = true;
    pthread_mutex_lock(mu);
    while (*count < n && ok) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(cv, mu, &ts);
        clock_gettime(CLOCK_MONOTONIC, &now);
        ok = now.tv_sec - start.tv_sec < 300;
    }
    if (reset)
        *count = 0;
    pthread_mutex_unlock(mu);
    return ok;
}

static inline int test_main_end(void)
{
    printf("%d passed, %d failed\n", test_passed, test_failed);
    return test_failed ? 1 : 0;
}

#endif
