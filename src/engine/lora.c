/* LoRA adapters: the registry of names and the three tiers an adapter moves through.
 *
 *   disk   a PEFT directory or a .zsa file, read (and checked against the model) by the
 *          loader thread, or by the caller on the synchronous paths (registration, zse_seq)
 *   host   max_cpu_loras host slots (pinned on a GPU) holding slot images ready to copy
 *   slot   the backend's max_loras slots, where a step reads adapters; a host -> slot copy
 *          is started by the engine between steps and polled, never waited for
 *
 * An adapter moves up when a sequence asks for it (zse_lora_pin; not read ahead for a
 * sequence that may not take a slot: with every slot in use, reads for many waiting adapters
 * would only evict each other from the host slots) and is evicted least recently used
 * first, from a tier only where nothing needs it there: a slot that a sequence pins, or a
 * host image a copy is reading, is never taken. A sequence pins its
 * adapter's slot from the step it is first admitted to the one it ends in.
 *
 * A slot image is the backend's layout (backend.h: a table of n_layers x 7 entries, then
 * the f16 parts, 64-byte aligned) with the adapter's scale times the user's in each entry;
 * its XXH3 is the adapter's identity, the salt of its prefix-cache blocks. A file that
 * changes on disk between two reads of one adapter is refused rather than mixed in. */
#include "engine/engine.h"

#include "format/format.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

struct zse_adapter {
    zse_lora_cache *c;
    char *name;                 /* NULL: zse_adapter_open's */
    char *path;
    float scale;                /* the user's, times each part's own */
    int refs;                   /* handles: the registry's, sequences', callers', the loader's */
    bool listed;                /* in the registry */
    /* known once loaded */
    uint64_t id;
    uint32_t modules;
    uint64_t bytes;             /* its slot image */
    /* tiers (under the cache's mu) */
    int host, slot;             /* -1: not in that tier */
    bool loading;               /* queued for or being read by the loader */
    int pins;                   /* sequences using its slot */
    uint64_t failures;
    char error[512];
};

typedef struct {
    zse_adapter *owner;
    double used;
    bool copying;               /* a host -> slot copy is in flight */
    int from;                   /* the host slot it copies from */
    double copy_start;
} dev_slot;

typedef struct {
    void *mem;                  /* slot_bytes, allocated on first use */
    zse_adapter *owner;
    double used;
    int busy;                   /* copies reading it, or a load writing it */
} host_slot;

struct zse_lora_cache {
    zse_model *m;
    zse_lora_pool *pool;
    zse_lora_shape shape;
    pthread_mutex_t mu;
    pthread_cond_t cv;          /* the loader's queue, host slots coming free */
    zse_adapter **named;
    size_t n_named, cap_named;
    char *dir;
    dev_slot *dev;
    host_slot *host;
    int n_host;
    pthread_t thread;
    bool thread_started, quit;
    zse_adapter **queued;
    size_t n_queued, cap_queued;
    void (*wake)(void *);
    void *wake_arg;
    int waking;                 /* loader calls of wake in progress */
    zse_adapter_stats st;
};

static uint64_t align64(uint64_t x) { return (x + 63) & ~(uint64_t)63; }

static uint64_t table_bytes(const zse_lora_shape *s)
{
    return align64((uint64_t)s->n_layers * ZSE_LORA_MODULES * sizeof(zse_lora_entry));
}

/* a slot holds an adapter of `rank` on every projection of every layer */
static uint64_t slot_bytes_for(const zse_lora_shape *s, const zse_config *cfg, int rank)
{
    uint64_t b = table_bytes(s);
    for (int l = 0; l < s->n_layers; l++)
        for (int m = 0; m < ZSE_LORA_MODULES; m++) {
            int64_t in, out;
            if (zse_lora_base_dims(cfg, l, m, &in, &out))
                b += align64((uint64_t)rank * (uint64_t)in * 2) + align64((uint64_t)rank * (uint64_t)out * 2);
        }
    return b;
}

/* ---- the cache ------------------------------------------------------------------------------- */

int zse_lora_cache_new(zse_model *m, const zse_load_params *p)
{
    if (p->max_loras <= 0)
        return 0;
    const zse_backend_ops *o = m->be->ops;
    if (!o->lora_pool_new || !o->lora_apply)
        return zse_fail("the %s backend cannot run LoRA adapters", o->name);
    int rank = p->max_lora_rank > 0 ? p->max_lora_rank : 16;
    if (p->max_loras > 4096 || p->max_cpu_loras < 0 || p->max_cpu_loras > 65536 || rank > ZSE_LORA_MAX_RANK)
        return zse_fail("adapter limits out of range: %d slots (1-4096), %d in host memory (0-65536), rank %d "
                        "(1-%d)", p->max_loras, p->max_cpu_loras, rank, ZSE_LORA_MAX_RANK);
    const zse_config *cfg = zse_file_config(m->file);
    zse_lora_cache *c = zse_calloc(1, sizeof *c);
    if (!c)
        return -1;
    c->m = m;
    c->shape.n_layers = cfg->n_layers;
    c->shape.n_slots = p->max_loras;
    for (int mod = 0; mod < ZSE_LORA_MODULES; mod++) {
        int64_t in = 0, out = 0;
        for (int l = 0; l < cfg->n_layers && !zse_lora_base_dims(cfg, l, mod, &in, &out); l++)
            ;
        c->shape.in[mod] = in ? in : cfg->hidden_size;
        c->shape.out[mod] = out ? out : cfg->hidden_size;
    }
    c->shape.slot_bytes = slot_bytes_for(&c->shape, cfg, rank);
    c->n_host = p->max_cpu_loras > 0 ? p->max_cpu_loras : p->max_loras;
    c->dev = zse_calloc((size_t)c->shape.n_slots, sizeof *c->dev);
    c->host = zse_calloc((size_t)c->n_host, sizeof *c->host);
    if (!c->dev || !c->host || !(c->pool = o->lora_pool_new(m->be, &c->shape))) {
        zse_error_prefix("adapter slots (%d of %.1f MiB: rank %d on every projection)", p->max_loras,
                         (double)c->shape.slot_bytes / 1048576.0, rank);
        free(c->dev);
        free(c->host);
        free(c);
        return -1;
    }
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    c->st.slots = c->shape.n_slots;
    c->st.host_slots = c->n_host;
    m->lora = c;
    zse_llm_set_lora(m->llm, c->pool);
    return 0;
}

static void adapter_free(zse_adapter *a)
{
    free(a->name);
    free(a->path);
    free(a);
}

/* a's tiers are no longer its (cache mu held); a copy in flight finishes into a slot nobody owns */
static void detach(zse_lora_cache *c, zse_adapter *a)
{
    if (a->slot >= 0)
        c->dev[a->slot].owner = NULL;
    if (a->host >= 0)
        c->host[a->host].owner = NULL;
    a->slot = a->host = -1;
}

void zse_lora_cache_free(zse_lora_cache *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->mu);
    c->quit = true;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    if (c->thread_started)
        pthread_join(c->thread, NULL);
    for (size_t i = 0; i < c->n_queued; i++)
        if (--c->queued[i]->refs == 0 && !c->queued[i]->listed)
            adapter_free(c->queued[i]);
    for (size_t i = 0; i < c->n_named; i++) {
        detach(c, c->named[i]);
        adapter_free(c->named[i]);
    }
    /* copies in flight read host memory: let them land before it goes */
    const zse_backend_ops *o = c->m->be->ops;
    if (o->sync)
        o->sync(c->m->be);
    for (int i = 0; i < c->n_host; i++)
        if (c->host[i].mem)
            o->lora_host_free(c->m->be, c->host[i].mem);
    o->lora_pool_free(c->m->be, c->pool);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c->named);
    free(c->queued);
    free(c->dev);
    free(c->host);
    free(c->dir);
    free(c);
}

void zse_lora_set_waker(zse_lora_cache *c, void (*wake)(void *), void *arg)
{
    pthread_mutex_lock(&c->mu);
    c->wake = wake;
    c->wake_arg = arg;
    while (c->waking) /* a call of the old one may still run: its target may go after this */
        pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
}

bool zse_lora_copying(zse_lora_cache *c)
{
    pthread_mutex_lock(&c->mu);
    bool any = false;
    for (int s = 0; s < c->shape.n_slots && !any; s++)
        any = c->dev[s].copying;
    pthread_mutex_unlock(&c->mu);
    return any;
}

/* ---- slot images ------------------------------------------------------------------------------- */

/* the image's size, or an error when a slot cannot hold it */
static int image_size(const zse_lora_cache *c, const zse_lora_file *f, uint64_t *bytes)
{
    uint64_t at = table_bytes(&c->shape);
    for (int i = 0; i < f->n_layers * ZSE_LORA_MODULES; i++) {
        const zse_lora_part *p = &f->parts[i];
        if (p->rank)
            at = align64(at) + align64((uint64_t)p->rank * (uint64_t)p->in * 2) +
                 align64((uint64_t)p->rank * (uint64_t)p->out * 2);
    }
    *bytes = at;
    if (at > c->shape.slot_bytes) {
        char mods[64] = "";
        for (int m = 0; m < ZSE_LORA_MODULES; m++)
            if (f->modules >> m & 1)
                snprintf(mods + strlen(mods), sizeof mods - strlen(mods), "%s%s", *mods ? "," : "",
                         zse_lora_hf_module(m));
        return zse_fail("%s needs %.1f MiB (rank up to %d on %s), more than an adapter slot's %.1f MiB; load the "
                        "model with a higher --max-lora-rank (%d or more)", f->path, (double)at / 1048576.0,
                        f->max_rank, mods, (double)c->shape.slot_bytes / 1048576.0, f->max_rank);
    }
    return 0;
}

static void image_write(const zse_lora_cache *c, const zse_lora_file *f, float scale, uint8_t *dst)
{
    const uint64_t tb = table_bytes(&c->shape);
    memset(dst, 0, tb);
    uint64_t at = tb;
    for (int i = 0; i < f->n_layers * ZSE_LORA_MODULES; i++) {
        const zse_lora_part *p = &f->parts[i];
        if (!p->rank)
            continue;
        const uint64_t as = (uint64_t)p->rank * (uint64_t)p->in * 2, bs = (uint64_t)p->rank * (uint64_t)p->out * 2;
        zse_lora_entry e = {p->rank, p->scale * scale, (int64_t)align64(at), (int64_t)(align64(at) + align64(as))};
        memcpy(dst + (size_t)i * sizeof e, &e, sizeof e);
        memcpy(dst + e.a, p->a, as);
        memset(dst + e.a + as, 0, align64(as) - as);
        memcpy(dst + e.bt, p->bt, bs);
        memset(dst + e.bt + bs, 0, align64(bs) - bs);
        at = (uint64_t)e.bt + align64(bs);
    }
}

/* ---- the host tier ------------------------------------------------------------------------------ */

/* a host slot for a new image (mu held): a free one, else the least recently used one no
 * copy reads (its adapter goes back to disk); -1 when every one is being read */
static int take_host_slot(zse_lora_cache *c)
{
    int best = -1;
    for (int i = 0; i < c->n_host; i++) {
        host_slot *h = &c->host[i];
        if (h->busy)
            continue;
        if (!h->owner)
            return i;
        if (best < 0 || h->used < c->host[best].used)
            best = i;
    }
    if (best >= 0) {
        c->host[best].owner->host = -1;
        c->host[best].owner = NULL;
        c->st.evictions_host++;
    }
    return best;
}

/* reads a from disk into a host slot (mu not held); the error says why it failed */
static int load_host(zse_lora_cache *c, zse_adapter *a)
{
    const double t0 = zse_now();
    zse_lora_file f;
    if (zse_lora_open(&f, a->path) != 0)
        return -1;
    uint64_t bytes;
    int rc = zse_lora_check_base(&f, zse_file_config(c->m->file));
    if (rc == 0)
        rc = image_size(c, &f, &bytes);
    int hs = -1;
    pthread_mutex_lock(&c->mu);
    while (rc == 0 && (hs = take_host_slot(c)) < 0 && !c->quit) {
        struct timespec ts; /* every host slot is feeding a copy; they land within a step */
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 2000000;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    }
    if (rc == 0 && hs < 0)
        rc = zse_fail("shutting down");
    if (rc == 0)
        c->host[hs].busy++;
    pthread_mutex_unlock(&c->mu);
    if (rc == 0 && !c->host[hs].mem && !(c->host[hs].mem = c->m->be->ops->lora_host_alloc(c->m->be, c->shape.slot_bytes)))
        rc = -1;
    uint64_t id = 0;
    if (rc == 0) {
        image_write(c, &f, a->scale, c->host[hs].mem);
        id = zse_hash64(c->host[hs].mem, (size_t)bytes);
        id = id ? id : 1; /* 0 is the base model's salt */
    }
    pthread_mutex_lock(&c->mu);
    if (rc == 0 && a->id && a->id != id)
        rc = zse_fail("%s changed on disk since it was first loaded as adapter '%s'; register it again to use the "
                      "new weights", a->path, a->name ? a->name : a->path);
    if (rc == 0) {
        a->id = id;
        a->modules = f.modules;
        a->bytes = bytes;
        a->host = hs;
        c->host[hs].owner = a;
        c->host[hs].used = zse_now();
        c->st.loads_host++;
        c->st.load_host_seconds += zse_now() - t0;
    }
    if (hs >= 0)
        c->host[hs].busy--;
    pthread_mutex_unlock(&c->mu);
    zse_lora_close(&f);
    return rc;
}

/* records a failed load on a (mu held): every sequence waiting for it hears of it */
static void note_failure(zse_lora_cache *c, zse_adapter *a, const char *why)
{
    a->failures++;
    c->st.failures++;
    snprintf(a->error, sizeof a->error, "adapter '%s': %s", a->name ? a->name : a->path, why);
    zse_log(ZSE_LOG_WARN, "%s", a->error);
}

static void *loader_main(void *arg)
{
    zse_lora_cache *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->quit && c->n_queued == 0)
            pthread_cond_wait(&c->cv, &c->mu);
        if (c->quit)
            break;
        zse_adapter *a = c->queued[0];
        memmove(c->queued, c->queued + 1, (c->n_queued - 1) * sizeof *c->queued);
        c->n_queued--;
        pthread_mutex_unlock(&c->mu);
        int rc = load_host(c, a);
        pthread_mutex_lock(&c->mu);
        if (rc != 0)
            note_failure(c, a, zse_error_message());
        a->loading = false;
        void (*wake)(void *) = c->wake;
        void *wake_arg = c->wake_arg;
        c->waking += wake != NULL;
        bool gone = --a->refs == 0 && !a->listed;
        if (gone)
            detach(c, a);
        pthread_mutex_unlock(&c->mu);
        if (gone)
            adapter_free(a);
        if (wake)
            wake(wake_arg);
        pthread_mutex_lock(&c->mu);
        if (wake) {
            c->waking--;
            pthread_cond_broadcast(&c->cv);
        }
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* queues a for the loader (mu held) */
static int queue_load(zse_lora_cache *c, zse_adapter *a)
{
    if (!c->thread_started) {
        if (pthread_create(&c->thread, NULL, loader_main, c) != 0)
            return zse_fail("cannot start the adapter loader thread");
        c->thread_started = true;
    }
    if (c->n_queued == c->cap_queued) {
        size_t cap = c->cap_queued ? c->cap_queued * 2 : 16;
        zse_adapter **t = zse_realloc(c->queued, cap * sizeof *t);
        if (!t)
            return -1;
        c->queued = t;
        c->cap_queued = cap;
    }
    c->queued[c->n_queued++] = a;
    a->refs++;
    a->loading = true;
    pthread_cond_broadcast(&c->cv);
    return 0;
}

int zse_lora_load_now(zse_lora_cache *c, zse_adapter *a)
{
    pthread_mutex_lock(&c->mu);
    bool needed = a->host < 0 && a->slot < 0 && !a->loading;
    if (needed) {
        a->loading = true;
        a->refs++;
    }
    pthread_mutex_unlock(&c->mu);
    if (!needed)
        return 0;
    int rc = load_host(c, a);
    pthread_mutex_lock(&c->mu);
    if (rc != 0)
        note_failure(c, a, zse_error_message());
    a->loading = false;
    a->refs--;
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* ---- the slot tier (run_lock held: these call the backend) --------------------------------------- */

/* copies that have landed become slots in use (mu held) */
static void poll_copies(zse_lora_cache *c)
{
    const zse_backend_ops *o = c->m->be->ops;
    for (int s = 0; s < c->shape.n_slots; s++) {
        dev_slot *d = &c->dev[s];
        if (!d->copying)
            continue;
        int r = o->lora_slot_ready(c->m->be, c->pool, s);
        if (r == 0)
            continue;
        d->copying = false;
        c->host[d->from].busy--;
        pthread_cond_broadcast(&c->cv);
        if (r > 0) {
            c->st.loads_slot++;
            c->st.load_slot_seconds += zse_now() - d->copy_start;
        } else if (d->owner) {
            note_failure(c, d->owner, zse_error_message());
            d->owner->slot = -1;
            d->owner = NULL;
        }
    }
}

/* a slot to copy into (mu held): a free one, else the least recently used one no sequence
 * pins (its adapter stays in host memory or on disk); -1 when every slot is in use */
static int take_slot(zse_lora_cache *c)
{
    int best = -1;
    for (int s = 0; s < c->shape.n_slots; s++) {
        const dev_slot *d = &c->dev[s];
        if (d->copying)
            continue;
        if (!d->owner)
            return s;
        if (d->owner->pins == 0 && (best < 0 || d->used < c->dev[best].used))
            best = s;
    }
    if (best >= 0) {
        c->dev[best].owner->slot = -1;
        c->dev[best].owner = NULL;
        c->st.evictions_slot++;
    }
    return best;
}

zse_lora_pin_state zse_lora_pin(zse_lora_cache *c, zse_adapter *a, bool may_take_slot, bool first, int *slot,
                                uint64_t *failures)
{
    pthread_mutex_lock(&c->mu);
    poll_copies(c);
    zse_lora_pin_state st = ZSE_LORA_WAIT;
    if (first) {
        *failures = a->failures;
        if (a->slot >= 0 && !c->dev[a->slot].copying)
            c->st.hits_slot++;
        else if (a->host >= 0 || a->slot >= 0)
            c->st.hits_host++;
        else
            c->st.hits_disk++;
    }
    if (a->failures > *failures) {
        zse_fail("%s", a->error);
        st = ZSE_LORA_FAILED;
    } else if (a->slot >= 0 && !c->dev[a->slot].copying) {
        a->pins++;
        c->dev[a->slot].used = zse_now();
        *slot = a->slot;
        st = ZSE_LORA_PINNED;
    } else if (a->slot < 0 && a->host >= 0 && may_take_slot) {
        int s = take_slot(c);
        if (s < 0) {
            st = ZSE_LORA_STARVED;
        } else if (c->m->be->ops->lora_slot_load(c->m->be, c->pool, s, c->host[a->host].mem, (size_t)a->bytes) != 0) {
            note_failure(c, a, zse_error_message());
            zse_fail("%s", a->error);
            st = ZSE_LORA_FAILED;
        } else {
            c->dev[s] = (dev_slot){a, zse_now(), true, a->host, zse_now()};
            c->host[a->host].busy++;
            c->host[a->host].used = zse_now();
            a->slot = s;
            poll_copies(c); /* a backend that copies at once (CPU) has it now */
            if (!c->dev[s].copying && a->slot == s) {
                a->pins++;
                *slot = s;
                st = ZSE_LORA_PINNED;
            }
        }
    } else if (a->slot < 0 && a->host < 0 && !a->loading && may_take_slot && queue_load(c, a) != 0) {
        note_failure(c, a, zse_error_message());
        zse_fail("%s", a->error);
        st = ZSE_LORA_FAILED;
    }
    pthread_mutex_unlock(&c->mu);
    return st;
}

void zse_lora_unpin(zse_lora_cache *c, zse_adapter *a)
{
    pthread_mutex_lock(&c->mu);
    if (a->pins > 0)
        a->pins--;
    if (a->slot >= 0)
        c->dev[a->slot].used = zse_now();
    pthread_mutex_unlock(&c->mu);
}

void zse_lora_note_wait(zse_lora_cache *c, double seconds)
{
    pthread_mutex_lock(&c->mu);
    c->st.waits++;
    c->st.wait_seconds += seconds;
    pthread_mutex_unlock(&c->mu);
}

uint64_t zse_adapter_id(const zse_adapter *a) { return a->id; }
zse_lora_cache *zse_adapter_cache(const zse_adapter *a) { return a->c; }
uint32_t zse_adapter_modules(const zse_adapter *a) { return a->modules; }
const char *zse_adapter_name(const zse_adapter *a) { return a ? a->name : NULL; }

zse_adapter *zse_adapter_ref(zse_adapter *a)
{
    pthread_mutex_lock(&a->c->mu);
    a->refs++;
    pthread_mutex_unlock(&a->c->mu);
    return a;
}

void zse_adapter_release(zse_adapter *a)
{
    if (!a)
        return;
    zse_lora_cache *c = a->c;
    pthread_mutex_lock(&c->mu);
    bool gone = --a->refs == 0 && !a->listed;
    if (gone)
        detach(c, a);
    pthread_mutex_unlock(&c->mu);
    if (gone)
        adapter_free(a);
}

/* ---- the registry ------------------------------------------------------------------------------ */

static zse_lora_cache *cache_of(zse_model *m)
{
    if (!m->lora)
        zse_fail("%s was loaded without adapter slots: LoRA adapters need --max-gpu-loras N (max_loras) of 1 or more",
                 m->name);
    return m->lora;
}

static zse_adapter *adapter_new(zse_lora_cache *c, const char *name, const char *path, float scale)
{
    if (!(scale > -1e6f && scale < 1e6f)) {
        zse_fail("adapter scale %g is out of range", (double)scale);
        return NULL;
    }
    zse_adapter *a = zse_calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->c = c;
    a->scale = scale;
    a->host = a->slot = -1;
    a->refs = 1;
    if ((name && !(a->name = zse_strdup(name))) || !(a->path = zse_strdup(path))) {
        adapter_free(a);
        return NULL;
    }
    return a;
}

static zse_adapter *find_named(const zse_lora_cache *c, const char *name)
{
    for (size_t i = 0; i < c->n_named; i++)
        if (strcmp(c->named[i]->name, name) == 0)
            return c->named[i];
    return NULL;
}

/* adds a to the registry (mu held); the registry's reference is a's first */
static int list_adapter(zse_lora_cache *c, zse_adapter *a)
{
    if (find_named(c, a->name))
        return zse_fail("an adapter named '%s' is already loaded", a->name);
    if (c->n_named == c->cap_named) {
        size_t cap = c->cap_named ? c->cap_named * 2 : 16;
        zse_adapter **n = zse_realloc(c->named, cap * sizeof *n);
        if (!n)
            return -1;
        c->named = n;
        c->cap_named = cap;
    }
    c->named[c->n_named++] = a;
    a->listed = true;
    return 0;
}

static int check_name(const char *name)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > 256)
        return zse_fail("an adapter name must have 1 to 256 characters");
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)name[i] < 0x20 || name[i] == 0x7f)
            return zse_fail("an adapter name may not hold control characters");
    return 0;
}

int zse_adapter_register(zse_model *m, const char *name, const char *path, float scale)
{
    zse_lora_cache *c = cache_of(m);
    if (!c || check_name(name) != 0)
        return -1;
    pthread_mutex_lock(&c->mu);
    bool taken = find_named(c, name) != NULL;
    pthread_mutex_unlock(&c->mu);
    if (taken)
        return zse_fail("an adapter named '%s' is already loaded", name);
    zse_adapter *a = adapter_new(c, name, path, scale);
    if (!a)
        return -1;
    a->loading = true;
    int rc = load_host(c, a);
    pthread_mutex_lock(&c->mu);
    a->loading = false;
    if (rc == 0)
        rc = list_adapter(c, a);
    if (rc != 0)
        detach(c, a);
    pthread_mutex_unlock(&c->mu);
    if (rc != 0) {
        zse_error_prefix("adapter '%s'", name);
        adapter_free(a);
    }
    return rc;
}

int zse_adapter_set_dir(zse_model *m, const char *dir)
{
    zse_lora_cache *c = cache_of(m);
    if (!c)
        return -1;
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return zse_fail("adapter directory %s: %s", dir, errno ? strerror(errno) : "not a directory");
    char *d = realpath(dir, NULL);
    if (!d)
        return zse_fail("adapter directory %s: %s", dir, strerror(errno));
    pthread_mutex_lock(&c->mu);
    free(c->dir);
    c->dir = d;
    pthread_mutex_unlock(&c->mu);
    return 0;
}

int zse_adapter_unregister(zse_model *m, const char *name)
{
    zse_lora_cache *c = cache_of(m);
    if (!c)
        return -1;
    pthread_mutex_lock(&c->mu);
    zse_adapter *a = NULL;
    for (size_t i = 0; i < c->n_named && !a; i++)
        if (strcmp(c->named[i]->name, name) == 0) {
            a = c->named[i];
            memmove(c->named + i, c->named + i + 1, (c->n_named - i - 1) * sizeof *c->named);
            c->n_named--;
        }
    bool gone = false;
    if (a) {
        a->listed = false;
        gone = --a->refs == 0;
        if (gone)
            detach(c, a);
    }
    pthread_mutex_unlock(&c->mu);
    if (gone)
        adapter_free(a);
    return a ? 0 : zse_fail("no adapter named '%s' is loaded", name);
}

/* the adapter directory's entry for name: a subfolder name/ or a file name.zsa (heap path),
 * or NULL. A name that could leave the directory never matches. */
static char *dir_entry(const char *dir, const char *name)
{
    if (!dir || !*name || name[0] == '.' || strchr(name, '/'))
        return NULL;
    char *p = zse_path_join(dir, name);
    struct stat st;
    if (p && stat(p, &st) == 0 && S_ISDIR(st.st_mode))
        return p;
    free(p);
    zse_buf b = {0};
    if (zse_buf_printf(&b, "%s/%s.zsa", dir, name) != 0)
        return NULL;
    if (zse_file_exists(b.data))
        return b.data;
    zse_buf_free(&b);
    return NULL;
}

/* a client may name an adapter of the directory by its path (LoRAX's adapter_source
 * "local"): the path's last part, when the path lies directly in the directory */
static const char *name_in_dir(const char *dir, const char *name, char **owned)
{
    *owned = NULL;
    if (!dir || !strchr(name, '/'))
        return name;
    char *rp = realpath(name, NULL);
    if (!rp)
        return name;
    char *slash = strrchr(rp, '/');
    size_t dl = strlen(dir);
    if (slash && (size_t)(slash - rp) == dl && strncmp(rp, dir, dl) == 0) {
        *owned = zse_strdup(slash + 1);
        size_t n = *owned ? strlen(*owned) : 0;
        if (n > 4 && strcmp(*owned + n - 4, ".zsa") == 0)
            (*owned)[n - 4] = '\0';
    }
    free(rp);
    return *owned ? *owned : name;
}

zse_adapter *zse_adapter_get(zse_model *m, const char *name)
{
    zse_lora_cache *c = cache_of(m);
    if (!c || check_name(name) != 0)
        return NULL;
    pthread_mutex_lock(&c->mu);
    char *owned;
    const char *key = name_in_dir(c->dir, name, &owned);
    zse_adapter *a = find_named(c, key);
    if (a)
        a->refs++;
    char *path = a ? NULL : dir_entry(c->dir, key);
    pthread_mutex_unlock(&c->mu);
    if (!a && path) {
        /* found on first use: its config is checked now (a clear error for the request that
         * names it), its weights are read when a sequence needs them */
        int r;
        if (zse_lora_probe(path, &r) == 0 && (a = adapter_new(c, key, path, 1.0f))) {
            pthread_mutex_lock(&c->mu);
            zse_adapter *raced = find_named(c, key);
            if (raced) {
                adapter_free(a);
                a = raced;
            } else if (list_adapter(c, a) != 0) {
                adapter_free(a);
                a = NULL;
            }
            if (a)
                a->refs++;
            pthread_mutex_unlock(&c->mu);
        } else if (!a) {
            zse_error_prefix("adapter '%s'", key);
        }
    } else if (!a) {
        zse_fail("no adapter named '%s' is loaded", key);
    }
    free(path);
    free(owned);
    return a;
}

zse_adapter *zse_adapter_open(zse_model *m, const char *path, float scale)
{
    zse_lora_cache *c = cache_of(m);
    zse_adapter *a = c ? adapter_new(c, NULL, path, scale) : NULL;
    if (a && zse_lora_load_now(c, a) != 0) {
        zse_adapter_release(a);
        return NULL;
    }
    return a;
}

int zse_adapter_probe(const char *path, int *max_rank) { return zse_lora_probe(path, max_rank); }

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int push_name(char ***v, size_t *n, size_t *cap, const char *s)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 16;
        char **p = zse_realloc(*v, nc * sizeof *p);
        if (!p)
            return -1;
        *v = p;
        *cap = nc;
    }
    if (!((*v)[*n] = zse_strdup(s)))
        return -1;
    (*n)++;
    return 0;
}

/* the adapter directory's names: subfolders with an adapter_config.json, NAME.zsa files */
static int list_dir(const char *dir, char ***v, size_t *n, size_t *cap)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int rc = 0;
    for (struct dirent *e; rc == 0 && (e = readdir(d));) {
        if (e->d_name[0] == '.')
            continue;
        size_t len = strlen(e->d_name);
        char *p = zse_path_join(dir, e->d_name), *cfg = p ? zse_path_join(p, "adapter_config.json") : NULL;
        if (cfg && zse_file_exists(cfg)) {
            rc = push_name(v, n, cap, e->d_name);
        } else if (p && len > 4 && strcmp(e->d_name + len - 4, ".zsa") == 0 && zse_file_exists(p)) {
            char name[NAME_MAX + 1];
            snprintf(name, sizeof name, "%.*s", (int)(len - 4), e->d_name);
            rc = push_name(v, n, cap, name);
        }
        free(cfg);
        free(p);
    }
    closedir(d);
    return rc;
}

char **zse_adapter_list(zse_model *m, size_t *n_out)
{
    *n_out = 0;
    if (!m->lora)
        return zse_calloc(1, sizeof(char *));
    zse_lora_cache *c = m->lora;
    char **v = NULL, *dir = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; rc == 0 && i < c->n_named; i++)
        rc = push_name(&v, &n, &cap, c->named[i]->name);
    if (c->dir && !(dir = zse_strdup(c->dir)))
        rc = -1;
    pthread_mutex_unlock(&c->mu);
    if (rc == 0 && dir)
        rc = list_dir(dir, &v, &n, &cap);
    free(dir);
    if (rc == 0 && n) {
        qsort(v, n, sizeof *v, cmp_str);
        size_t u = 0;
        for (size_t i = 0; i < n; i++) {
            if (u && strcmp(v[u - 1], v[i]) == 0)
                free(v[i]);
            else
                v[u++] = v[i];
        }
        n = u;
    }
    if (rc == 0 && push_name(&v, &n, &cap, "") == 0) { /* room for the terminating NULL */
        free(v[n - 1]);
        v[--n] = NULL;
        *n_out = n;
        return v;
    }
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
    return NULL;
}

void zse_adapter_get_stats(zse_model *m, zse_adapter_stats *out)
{
    memset(out, 0, sizeof *out);
    zse_lora_cache *c = m->lora;
    if (!c)
        return;
    pthread_mutex_lock(&c->mu);
    *out = c->st;
    out->registered = (int)c->n_named;
    for (int s = 0; s < c->shape.n_slots; s++)
        if (c->dev[s].owner && !c->dev[s].copying) {
            out->in_slots++;
            out->pinned += c->dev[s].owner->pins > 0;
        }
    for (int h = 0; h < c->n_host; h++)
        out->in_host += c->host[h].owner != NULL;
    pthread_mutex_unlock(&c->mu);
}
