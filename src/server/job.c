/* Generation jobs: the sequences of one HTTP request (prompts × n choices) and the life of
 * each — handed to the engine one by one by the fair admission queue (admit.c), their
 * events copied in from the engine thread, consumed by the connection's side, which
 * renders them (render.c).
 *
 * Threads: the engine thread calls on_event(), which only copies the event into the job's
 * queue and, if the consumer is waiting, wakes it; the consumer (an HTTP worker pulling
 * stream bytes, or a server worker building a whole answer) takes the queue and renders.
 * Every choice ends with exactly one final event: the engine's, or one the job makes for a
 * choice that never reached the engine (the client left while it waited, or the engine
 * refused it). The job lives until the HTTP side, the admission queue and every submitted
 * sequence have let go of it (reference count). Engine functions are never called with
 * the job's lock held: the engine may hold its own lock while it calls back. */
#include "server/server.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* what the engine thread's callback gets as `user`: the job and which choice */
typedef struct {
    srv_job *job;
    int index;
} seq_ref;

typedef struct {
    uint64_t engine_id;
    bool submitted;         /* the engine has it */
    bool ended;             /* its final event arrived (or was made) */
    bool paused;            /* the engine was told to pause it (under pause_mu) */
} seq_state;

struct srv_job {
    pthread_mutex_t mu;
    int refs;
    srv_request req;
    char id[48];
    char *model_id;
    char *fingerprint;
    seq_state *seqs;
    seq_ref *refs_for_engine;
    int n_choices;
    int ctx_size;
    /* pausing a stream whose client does not read: the engine calls are made under
     * pause_mu (never under mu), so the last one made is always for the last wish */
    pthread_mutex_t pause_mu;
    srv_engine engine;      /* the generator its choices went to (under mu) */
    bool have_engine;
    /* under mu */
    srv_event *head, *tail;
    int n_unread;           /* events in the queue */
    bool pause_wanted;      /* a stream with SRV_UNREAD_PAUSE events unread */
    int n_ended;
    bool waiting;           /* the consumer is suspended until events (stream) or the end (whole) */
    bool gone;              /* the client left */
    bool overloaded;        /* the engine refused a sequence */
    char overload_reason[160];
    srv_wake_fn wake;
    void *wake_arg;
    void (*seq_end)(void *arg);
    void *seq_end_arg;
    /* consumer side */
    srv_render rd;
    bool started;           /* the first stream bytes (roles, echo) went out */
    bool tail_sent;
};

/* ---- life ---------------------------------------------------------------------------- */

static void random_hex(char *out, size_t n_chars)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char raw[32];
    size_t n = (n_chars + 1) / 2;
    if (n > sizeof raw)
        n = sizeof raw;
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f ? fread(raw, 1, n, f) : 0;
    if (f)
        fclose(f);
    uint64_t x = (uint64_t)(zse_now() * 1e9);
    for (size_t i = got; i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        raw[i] = (unsigned char)(x >> 56);
    }
    for (size_t i = 0; i < n_chars; i++)
        out[i] = hex[(raw[i / 2] >> (i % 2 ? 0 : 4)) & 15];
    out[n_chars] = '\0';
}

static const char *id_prefix(srv_api api)
{
    return api == SRV_API_CHAT ? "chatcmpl-" : api == SRV_API_COMPLETION ? "cmpl-" : "gen-";
}

srv_job *srv_job_new(srv_request *req, const zse_model *m, const char *model_id, const char *fingerprint,
                     double t_arrival)
{
    srv_job *j = zse_calloc(1, sizeof *j);
    if (!j)
        return NULL;
    pthread_mutex_init(&j->mu, NULL);
    pthread_mutex_init(&j->pause_mu, NULL);
    j->refs = 1;
    j->req = *req;
    memset(req, 0, sizeof *req);
    size_t pre = strlen(id_prefix(j->req.api));
    memcpy(j->id, id_prefix(j->req.api), pre);
    random_hex(j->id + pre, 24);
    j->n_choices = (int)j->req.n_prompts * j->req.n;
    zse_model_info info;
    zse_model_get_info(m, &info);
    j->ctx_size = info.ctx_size;
    j->model_id = zse_strdup(model_id);
    j->fingerprint = zse_strdup(fingerprint);
    j->seqs = zse_calloc((size_t)j->n_choices, sizeof *j->seqs);
    j->refs_for_engine = zse_calloc((size_t)j->n_choices, sizeof *j->refs_for_engine);
    if (!j->model_id || !j->fingerprint || !j->seqs || !j->refs_for_engine ||
        srv_render_init(&j->rd, &j->req, m, j->n_choices) != 0) {
        srv_job_unref(j);
        return NULL;
    }
    j->rd.id = j->id;
    j->rd.model_id = j->model_id;
    j->rd.fingerprint = j->fingerprint;
    j->rd.created = (long long)time(NULL);
    j->rd.t_arrival = t_arrival;
    for (int i = 0; i < j->n_choices; i++) {
        j->refs_for_engine[i].job = j;
        j->refs_for_engine[i].index = i;
    }
    return j;
}

static void free_event(srv_event *ev)
{
    free(ev->prompt_lp);
    free(ev->text);
    free(ev->top_ids);
    free(ev->top_logprobs);
    free(ev);
}

static void free_job(srv_job *j)
{
    for (srv_event *ev = j->head, *next; ev; ev = next) {
        next = ev->next;
        free_event(ev);
    }
    if (j->rd.req)
        srv_render_free(&j->rd);
    free(j->seqs);
    free(j->refs_for_engine);
    free(j->model_id);
    free(j->fingerprint);
    srv_request_free(&j->req);
    pthread_mutex_destroy(&j->mu);
    pthread_mutex_destroy(&j->pause_mu);
    free(j);
}

void srv_job_ref(srv_job *j)
{
    pthread_mutex_lock(&j->mu);
    j->refs++;
    pthread_mutex_unlock(&j->mu);
}

void srv_job_unref(srv_job *j)
{
    if (!j)
        return;
    pthread_mutex_lock(&j->mu);
    bool last = --j->refs == 0;
    pthread_mutex_unlock(&j->mu);
    if (last)
        free_job(j);
}

void srv_job_set_waker(srv_job *j, srv_wake_fn wake, void *arg)
{
    pthread_mutex_lock(&j->mu);
    j->wake = wake;
    j->wake_arg = arg;
    pthread_mutex_unlock(&j->mu);
}

void srv_job_set_seq_end(srv_job *j, void (*fn)(void *arg), void *arg)
{
    pthread_mutex_lock(&j->mu);
    j->seq_end = fn;
    j->seq_end_arg = arg;
    pthread_mutex_unlock(&j->mu);
}

const char *srv_job_id(const srv_job *j) { return j->id; }
const char *srv_job_user(const srv_job *j) { return j->req.user; }
bool srv_job_streaming(const srv_job *j) { return j->req.stream; }
int srv_job_choices(const srv_job *j) { return j->n_choices; }
int srv_job_priority(const srv_job *j) { return j->req.priority; }

int64_t srv_job_choice_cost(const srv_job *j, int i)
{
    const srv_prompt *p = &j->req.prompts[i / j->req.n];
    if (j->req.max_tokens == ZSE_MAX_TOKENS_NONE) /* scoring only */
        return (int64_t)p->n_ids;
    /* without max_tokens a chat sequence may run to the end of the context */
    return j->req.max_tokens > 0 ? (int64_t)p->n_ids + j->req.max_tokens : (int64_t)j->ctx_size;
}

bool srv_job_gone(srv_job *j)
{
    pthread_mutex_lock(&j->mu);
    bool gone = j->gone;
    pthread_mutex_unlock(&j->mu);
    return gone;
}

/* ---- the engine side ----------------------------------------------------------------- */

static srv_event *copy_event(int choice_index, const zse_token_event *ev)
{
    srv_event *e = zse_calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->choice = choice_index;
    e->token = ev->token;
    e->logprob = ev->logprob;
    e->finish = ev->finish;
    e->prompt_tokens = ev->prompt_tokens;
    e->completion_tokens = ev->completion_tokens;
    e->time = zse_now();
    e->text = zse_strdup(ev->text ? ev->text : "");
    if (ev->n_top > 0 && ev->top_ids && ev->top_logprobs) {
        e->n_top = ev->n_top;
        e->top_ids = zse_malloc((size_t)ev->n_top * sizeof *e->top_ids);
        e->top_logprobs = zse_malloc((size_t)ev->n_top * sizeof *e->top_logprobs);
        if (e->top_ids && e->top_logprobs) {
            memcpy(e->top_ids, ev->top_ids, (size_t)ev->n_top * sizeof *e->top_ids);
            memcpy(e->top_logprobs, ev->top_logprobs, (size_t)ev->n_top * sizeof *e->top_logprobs);
        }
    }
    if (ev->prompt_logprobs && ev->prompt_tokens > 0) { /* the first event of a scored prompt */
        e->prompt_lp = zse_malloc((size_t)ev->prompt_tokens * sizeof *e->prompt_lp);
        if (e->prompt_lp) {
            memcpy(e->prompt_lp, ev->prompt_logprobs, (size_t)ev->prompt_tokens * sizeof *e->prompt_lp);
            e->n_prompt_lp = ev->prompt_tokens;
        }
    }
    if (!e->text || (e->n_top && (!e->top_ids || !e->top_logprobs)) || (ev->prompt_logprobs && ev->prompt_tokens > 0 && !e->prompt_lp)) {
        free_event(e);
        return NULL;
    }
    return e;
}

/* Queues e (may be NULL: out of memory) for choice i; a final one ends the choice. Wakes
 * a waiting consumer: a stream at every event, a whole answer when every choice ended.
 * Under j->mu. Returns whether the client still wants events. */
static bool deliver_locked(srv_job *j, int i, srv_event *e, bool final)
{
    bool keep_going = !j->gone && e != NULL;
    if (e && !j->gone) {
        if (j->tail)
            j->tail->next = e;
        else
            j->head = e;
        j->tail = e;
        if (++j->n_unread >= SRV_UNREAD_PAUSE && j->req.stream)
            j->pause_wanted = true;
    } else if (e) {
        free_event(e);
    } else if (!j->gone) {
        j->rd.failed = true; /* out of memory copying: the answer says generation failed */
    }
    if (final && !j->seqs[i].ended) {
        j->seqs[i].ended = true;
        j->n_ended++;
    }
    if (j->waiting && (j->req.stream || j->n_ended == j->n_choices)) {
        j->waiting = false;
        if (j->wake)
            j->wake(j->wake_arg);
    }
    return keep_going;
}

/* Brings the engine in line with what the job wants: its running choices paused while the
 * stream's client leaves SRV_UNREAD_PAUSE events unread, resumed once it has taken them.
 * Called without j->mu after anything that may change the wish (an event, a pull, a
 * submission); pause_mu orders the calls, so the engine ends with the latest wish. */
static void sync_pause(srv_job *j)
{
    pthread_mutex_lock(&j->pause_mu);
    pthread_mutex_lock(&j->mu);
    bool want = j->pause_wanted && !j->gone;
    srv_engine engine = j->engine;
    bool can = j->have_engine && engine.pause;
    uint64_t ids[64];
    int idx[64], n = 0;
    for (int i = 0; can && i < j->n_choices && n < 64; i++)
        if (j->seqs[i].submitted && !j->seqs[i].ended && j->seqs[i].paused != want) {
            ids[n] = j->seqs[i].engine_id;
            idx[n++] = i;
        }
    pthread_mutex_unlock(&j->mu);
    for (int k = 0; k < n; k++) {
        engine.pause(engine.ctx, ids[k], want);
        j->seqs[idx[k]].paused = want;
    }
    pthread_mutex_unlock(&j->pause_mu);
}

static bool on_event(void *user, const zse_token_event *ev)
{
    seq_ref *ref = user;
    srv_job *j = ref->job;
    bool final = ev->finish != ZSE_FINISH_NONE;
    srv_event *e = copy_event(ref->index, ev);
    pthread_mutex_lock(&j->mu);
    if (ev->finish == ZSE_FINISH_ERROR && ev->error && !j->rd.error[0])
        snprintf(j->rd.error, sizeof j->rd.error, "%s", ev->error);
    bool keep_going = deliver_locked(j, ref->index, e, final);
    void (*seq_end)(void *) = j->seq_end;
    void *seq_end_arg = j->seq_end_arg;
    bool pause = j->pause_wanted && !final;
    pthread_mutex_unlock(&j->mu);
    if (pause)
        sync_pause(j);
    if (final) {
        if (seq_end)
            seq_end(seq_end_arg); /* the engine's slot is free again */
        srv_job_unref(j);         /* the sequence's reference */
    }
    return keep_going;
}

void srv_job_end_choice(srv_job *j, int i, zse_finish why)
{
    srv_event *e = zse_calloc(1, sizeof *e);
    if (e && !(e->text = zse_strdup(""))) {
        free(e);
        e = NULL;
    }
    if (e) {
        e->choice = i;
        e->token = -1;
        e->finish = why;
        e->time = zse_now();
    }
    pthread_mutex_lock(&j->mu);
    deliver_locked(j, i, e, true);
    pthread_mutex_unlock(&j->mu);
}

int srv_job_submit_choice(srv_job *j, int i, const srv_engine *engine, const char *tenant)
{
    const srv_prompt *p = &j->req.prompts[i / j->req.n];
    zse_sampling s = j->req.sampling;
    s.seed += (uint64_t)(i % j->req.n); /* choices of one prompt differ, reproducibly */
    srv_job_ref(j);                     /* the sequence's, dropped at its final event */
    uint64_t id = 0;
    if (engine->submit(engine->ctx, tenant, p->ids, p->n_ids, &s, j->req.priority, on_event,
                       &j->refs_for_engine[i], &id) != 0) {
        pthread_mutex_lock(&j->mu);
        j->overloaded = j->rd.overloaded = true;
        snprintf(j->overload_reason, sizeof j->overload_reason, "%s", zse_last_error());
        j->rd.overload_reason = j->overload_reason;
        pthread_mutex_unlock(&j->mu);
        srv_job_end_choice(j, i, ZSE_FINISH_ERROR);
        srv_job_unref(j);
        return -1;
    }
    pthread_mutex_lock(&j->mu);
    bool ended = j->seqs[i].ended; /* a fast engine may have finished it already */
    j->seqs[i].engine_id = id;
    j->seqs[i].submitted = !ended;
    j->engine = *engine;
    j->have_engine = true;
    bool cancel = j->gone && !ended; /* the client left while it was being submitted */
    bool pause = j->pause_wanted && !ended;
    pthread_mutex_unlock(&j->mu);
    if (cancel)
        engine->cancel(engine->ctx, id);
    else if (pause) /* the stream's client is not reading: this choice waits too */
        sync_pause(j);
    return 0;
}

void srv_job_abandon(srv_job *j, const srv_engine *engine)
{
    uint64_t ids[64];
    int n = 0;
    pthread_mutex_lock(&j->mu);
    j->gone = true;
    for (int i = 0; i < j->n_choices && n < 64; i++)
        if (j->seqs[i].submitted && !j->seqs[i].ended)
            ids[n++] = j->seqs[i].engine_id;
    pthread_mutex_unlock(&j->mu);
    /* outside the lock: the engine may hold its own lock while it calls on_event */
    for (int i = 0; i < n; i++)
        engine->cancel(engine->ctx, ids[i]);
}

bool srv_job_probe_waiting(srv_job *j, bool (*probe)(void *arg), void *arg)
{
    pthread_mutex_lock(&j->mu);
    bool hung_up = j->waiting && !j->gone && probe(arg);
    if (hung_up)
        j->gone = true;
    pthread_mutex_unlock(&j->mu);
    return hung_up;
}

void srv_job_get_usage(srv_job *j, srv_job_usage *u)
{
    srv_render_usage(&j->rd, u);
}

/* ---- the consumer side --------------------------------------------------------------- */

/* renders the events taken off the queue */
static void apply_events(srv_job *j, srv_event *evs, zse_buf *out)
{
    for (srv_event *ev = evs, *next; ev; ev = next) {
        next = ev->next;
        if (srv_render_event(&j->rd, ev, out) != 0)
            j->rd.failed = true;
        free_event(ev);
    }
}

/* choices whose end never reached the consumer (dropped when memory ran out) end as
 * errors so the answer can still close */
static void end_if_all_ended(srv_job *j, bool all_ended)
{
    if (all_ended && j->rd.n_finished < j->rd.n_choices)
        srv_render_end_missing(&j->rd);
}

srv_pull srv_job_pull(srv_job *j, zse_buf *out, int *status, srv_wake_fn suspend, void *arg)
{
    *status = 200;
    if (j->req.stream && !j->started) {
        j->started = true;
        if (srv_render_start(&j->rd, out) != 0)
            j->rd.failed = true;
    }
    for (;;) {
        if (j->tail_sent)
            return out->len ? SRV_PULL_DATA : SRV_PULL_DONE;
        pthread_mutex_lock(&j->mu);
        srv_event *evs = j->head;
        j->head = j->tail = NULL;
        j->n_unread = 0;
        bool resume = j->pause_wanted; /* then evs holds what was waiting */
        j->pause_wanted = false;
        bool all_ended = j->n_ended == j->n_choices;
        if (!evs && !all_ended && out->len == 0) {
            j->waiting = true;
            suspend(arg); /* under the lock: a wake cannot come before the suspension */
            pthread_mutex_unlock(&j->mu);
            return SRV_PULL_WAIT;
        }
        pthread_mutex_unlock(&j->mu);
        if (resume) /* the client took everything: its sequences go on */
            sync_pause(j);
        apply_events(j, evs, out);
        if (!evs)
            end_if_all_ended(j, all_ended);
        if (j->rd.n_finished == j->rd.n_choices) {
            if (srv_render_tail(&j->rd, out) != 0)
                j->rd.failed = true;
            j->tail_sent = true;
        }
        if (out->len)
            return SRV_PULL_DATA;
    }
}

bool srv_job_wait_whole(srv_job *j, srv_wake_fn suspend, void *arg)
{
    pthread_mutex_lock(&j->mu);
    bool done = j->n_ended == j->n_choices;
    if (!done) {
        j->waiting = true;
        suspend(arg); /* under the lock: the wake for the last end cannot come first */
    }
    pthread_mutex_unlock(&j->mu);
    return done;
}

int srv_job_whole(srv_job *j, zse_buf *out, int *status, int *retry_after)
{
    pthread_mutex_lock(&j->mu);
    srv_event *evs = j->head;
    j->head = j->tail = NULL;
    bool all_ended = j->n_ended == j->n_choices;
    pthread_mutex_unlock(&j->mu);
    apply_events(j, evs, out);
    end_if_all_ended(j, all_ended);
    if (!all_ended) {
        *status = 500;
        *retry_after = 0;
        return zse_fail("the answer was asked for before every sequence ended");
    }
    return srv_render_whole(&j->rd, out, status, retry_after);
}
