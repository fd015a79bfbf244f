/* Sliding-window rate limits: a key may be admitted at most `limit` times in any window of
 * `window_s` seconds. The window keeps the admission times themselves (a ring of `limit`
 * entries), so the count is exact rather than the two-bucket estimate; a limit of 600/min
 * costs 4.8 KB per key. */
#include "server/server.h"

#include <math.h>
#include <string.h>

int srv_window_init(srv_window *w, int limit)
{
    memset(w, 0, sizeof *w);
    if (limit <= 0)
        return zse_fail("rate limit must be positive, not %d", limit);
    w->times = zse_calloc((size_t)limit, sizeof *w->times);
    if (!w->times)
        return -1;
    w->limit = limit;
    return 0;
}

void srv_window_free(srv_window *w)
{
    free(w->times);
    memset(w, 0, sizeof *w);
}

static double oldest(const srv_window *w)
{
    return w->times[w->head];
}

static double newest(const srv_window *w)
{
    return w->times[(w->head + w->count - 1) % w->limit];
}

/* drops admissions that have left the window */
static void expire(srv_window *w, double now, double window_s)
{
    while (w->count > 0 && oldest(w) <= now - window_s) {
        w->head = (w->head + 1) % w->limit;
        w->count--;
    }
}

static int ceil_seconds(double s)
{
    return s <= 0 ? 0 : (int)ceil(s);
}

srv_rate srv_window_admit(srv_window *w, double now, double window_s)
{
    srv_rate r = {0};
    r.limit = w->limit;
    expire(w, now, window_s);
    if (w->count < w->limit) {
        w->times[(w->head + w->count) % w->limit] = now;
        w->count++;
        r.allowed = true;
    } else {
        r.retry_after_s = ceil_seconds(oldest(w) + window_s - now);
        if (r.retry_after_s < 1)
            r.retry_after_s = 1;
    }
    r.remaining = w->limit - w->count;
    r.reset_s = w->count ? ceil_seconds(newest(w) + window_s - now) : 0;
    return r;
}
