/* engine — models, sequences, the paged KV cache, the sampler and the batching scheduler
 * behind include/zse.h. docs/ARCHITECTURE.md describes how they fit together.
 *
 * Ownership: a zse_model owns the file mapping, tokenizer, backend, weights, the KV
 * storage and its block pool. Sequences (zse_seq) and the engine's requests borrow
 * blocks from the pool and give them back when they end. The model's run lock serializes
 * everything that touches the backend or the pool, so single sequences and a running
 * engine may share one model. */
#ifndef ZSE_ENGINE_H
#define ZSE_ENGINE_H

#include "zse.h"

#include "backend/backend.h"
#include "grammar/grammar.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "util/util.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* ---- paged KV block allocator with a prefix cache ------------------------------------------
 * Fixed 16-token blocks. A block is referenced by the sequences whose block tables hold it.
 * With the prefix cache on, a full block whose K/V are computed is published under a key
 * chained over every token before it (and a salt: which adapter computed it), so a later
 * sequence with the same prefix takes a reference to it instead of computing it again.
 * Only full blocks are ever shared, and a sequence never writes a position below its
 * n_cached, so nobody writes a shared block and no copy-on-write is needed (a sequence
 * recomputes at most the 15 tokens of its partial tail block). A published block that no
 * sequence references stays cached, in LRU order, and is taken back only when the free
 * list is empty. */
#define ZSE_KV_BLOCK 16

typedef struct {
    int32_t *free_list;     /* stack of free (never published or evicted) block ids */
    int32_t *ref;           /* [n_blocks] sequences holding the block; 0: free or cached-idle */
    int n_free;
    int n_blocks;
    /* the prefix cache (NULL arrays when off) */
    uint64_t *key;          /* [n_blocks] a published block's key */
    uint64_t *parent;       /* [n_blocks] the key of the block before it (0 for the first) */
    int32_t *tokens;        /* [n_blocks][16] its tokens, checked on every hit */
    int32_t *slot_of;       /* [table_cap] open-addressing table: key -> block, -1 empty, -2 deleted */
    size_t table_cap, n_tombs;
    int32_t *lru_prev, *lru_next;   /* [n_blocks] the idle published blocks, oldest at lru_head */
    int32_t lru_head, lru_tail;
    int n_idle;             /* published blocks no sequence references */
    int n_published;
    uint64_t hit_tokens, query_tokens, evictions;
} zse_block_pool;

/* cache: whether full blocks are published for reuse (the prefix cache) */
int zse_block_pool_init(zse_block_pool *p, int n_blocks, bool cache);
void zse_block_pool_free(zse_block_pool *p);
/* a block for one sequence (ref 1): a free one, else the least recently used idle cached
 * one (unpublished then); -1 when every block is referenced */
int32_t zse_block_alloc(zse_block_pool *p);
/* drops one reference; -1 (and nothing changes) for a block nobody references */
int zse_block_release(zse_block_pool *p, int32_t block);
/* blocks referenced by some sequence */
int zse_block_pool_used(const zse_block_pool *p);
/* blocks an allocation can have: free plus idle cached */
static inline int zse_block_pool_available(const zse_block_pool *p) { return p->n_free + p->n_idle; }
/* the key of a full block of `tokens` (ZSE_KV_BLOCK ids) after the block keyed `parent` (0:
 * the first block), computed by a model variant `salt` (0: the base model) */
uint64_t zse_block_key(uint64_t parent, const int32_t *tokens, uint64_t salt);
/* the published block with this key, parent and tokens, or -1 */
int32_t zse_block_find(const zse_block_pool *p, uint64_t key, uint64_t parent, const int32_t *tokens);
/* takes a reference to a published block (found by zse_block_find) */
void zse_block_acquire(zse_block_pool *p, int32_t block);
/* publishes a referenced full block whose K/V are computed; nothing when the cache is off
 * or the key is already published (by another sequence that computed the same prefix) */
void zse_block_publish(zse_block_pool *p, int32_t block, uint64_t key, uint64_t parent, const int32_t *tokens);

/* One sequence's block table: blocks[i] holds positions [16 i, 16 i + 16). */
typedef struct {
    int32_t *blocks;
    int n_blocks;
    int max_blocks;         /* the context's worth */
} zse_kv_table;

int zse_kv_table_init(zse_kv_table *t, int max_blocks);
void zse_kv_table_free(zse_kv_table *t, zse_block_pool *p);     /* releases its blocks */
/* blocks for positions [0, n_tokens); all or nothing: on failure (pool exhausted, -1 with
 * an error) the table is as it was */
int zse_kv_table_reserve(zse_kv_table *t, zse_block_pool *p, size_t n_tokens);
/* keeps the blocks of positions [0, n_tokens) and releases the rest */
void zse_kv_table_truncate(zse_kv_table *t, zse_block_pool *p, size_t n_tokens);
/* blocks that reserving up to n_tokens would take from the pool */
int zse_kv_table_blocks_needed(const zse_kv_table *t, size_t n_tokens);
static inline int32_t zse_kv_slot(const zse_kv_table *t, size_t pos)
{
    return t->blocks[pos / ZSE_KV_BLOCK] * ZSE_KV_BLOCK + (int32_t)(pos % ZSE_KV_BLOCK);
}

/* ---- sampler ------------------------------------------------------------------------------ */
typedef struct {
    uint64_t s[4];
} zse_rng;

void zse_rng_seed(zse_rng *r, uint64_t seed);
double zse_rng_uniform(zse_rng *r);                   /* [0, 1), xoshiro256** */

typedef struct {
    const int32_t *prompt;
    size_t n_prompt;
    const int32_t *generated;
    size_t n_generated;
} zse_history;

/* Picks the next token from logits (modified in place): logit bias, repetition penalty
 * (over prompt and generated tokens, as Hugging Face applies it), presence / frequency
 * penalties (over generated tokens, as OpenAI defines them), then greedy, or temperature
 * followed by top-k, min-p and top-p, and a draw from rng. `work_p` holds vocab floats and
 * `work_i` vocab ints of scratch; work_i must be all zero on entry and is left so. */
int32_t zse_sample(const zse_sampling *s, float *logits, int vocab, const zse_history *h, zse_rng *rng,
                   float *work_p, int32_t *work_i);
/* The distribution zse_sample draws from, in two steps, for callers that need it whole
 * (speculative decoding's verification). zse_sample_dist applies the penalties (logits
 * change in place), then temperature and truncation: the candidates are every id in id order
 * (all) or idx[0..n) most likely first, weighing p[id] of total. */
typedef struct {
    bool greedy;            /* temperature 0 / top-k 1: the token is argmax (after penalties) */
    bool all;
    int32_t argmax;
    int n;
    double total;
    int written;            /* idx entries to zero again (zse_dist_release) */
} zse_dist;
void zse_sample_dist(const zse_sampling *s, float *logits, int vocab, const zse_history *h, float *p, int32_t *idx,
                     zse_dist *d);
/* the candidate at u in [0, 1) of the cumulative weight (zse_sample's draw) */
int32_t zse_dist_draw(const zse_dist *d, const float *p, const int32_t *idx, double u);
/* Speculative verification of a draft x proposed with certainty: greedy accepts x when it
 * is the argmax and otherwise gives the argmax; sampling accepts x with probability p(x)
 * and otherwise draws from p without x (the Leviathan et al. / Chen et al. rule for a
 * point-mass proposal, which leaves the output distributed exactly as p) */
int32_t zse_dist_verify(const zse_dist *d, const float *p, const int32_t *idx, int32_t x, zse_rng *rng,
                        bool *accepted);
void zse_dist_release(zse_dist *d, int32_t *idx);

/* greedy with nothing that changes logits first and no logprobs: the token zse_sample picks
 * is the logits' argmax (lowest id on ties), which a backend can take where they are (a
 * constraint's mask, when set, must be applied there first: zse_step_out_mode) */
bool zse_sampling_plain_greedy(const zse_sampling *s);
/* nothing but temperature, top-k, top-p and min-p (no penalties, bias, min_tokens or
 * logprobs): a backend's sample_rows can draw the token where the logits are (after the
 * constraint's mask) */
bool zse_sampling_on_device(const zse_sampling *s);

/* zse_logprobs and ZSE_MAX_TOP_LOGPROBS are public (zse.h) */

/* log-softmax of the model's logits (before penalties and temperature) for `token` and the
 * n_top most likely ids */
void zse_compute_logprobs(const float *logits, int vocab, int32_t token, int n_top, zse_logprobs *out);

/* the longest suffix of text[0..n) that is a proper prefix of some stop string: text that
 * must be held back because a stop string might complete with the next token */
size_t zse_stop_holdback(const char *text, size_t n, const char *const *stop, int n_stop);
/* the earliest occurrence of any stop string in text[0..n), or NULL */
const char *zse_stop_find(const char *text, size_t n, const char *const *stop, int n_stop);

/* ---- generation state: what turns sampled tokens into text and a finish reason -------------
 * Shared by zse_seq and the engine's requests. Owns deep copies of the sampling settings'
 * arrays, the RNG, the streaming detokenizer and the text held back for stop strings. */
typedef struct {
    zse_sampling s;
    char **stop;            /* owned; s.stop points here */
    zse_rng rng;
    zse_tokenizer_stream *detok;
    zse_buf pending;        /* decoded text not yet released (may start a stop string) */
    int generated;          /* tokens accepted */
    /* special tokens whose text the output keeps (the model's tool-call markers, which a
     * tool-call parser must see); other special tokens add no text. Not owned. */
    const int32_t *keep_ids;
    const char *const *keep_texts;
    int n_keep;
} zse_gen;

int zse_gen_init(zse_gen *g, const zse_sampling *s, const zse_tokenizer *tok);
void zse_gen_free(zse_gen *g);
/* starts over for a new prompt (chat turns): counts, held text, detokenizer */
int zse_gen_restart(zse_gen *g, const zse_tokenizer *tok);
/* Takes the sampled token t. Appends the text that can be shown now to *out and sets
 * *finish: STOP for an eos/stop id (`is_eos`: one of the model's) or a completed stop
 * string (text from it on is dropped), LENGTH when max_tokens is reached or `ctx_full`
 * (text held back is released then). */
int zse_gen_accept(zse_gen *g, int32_t t, bool is_eos, bool ctx_full, zse_buf *out, zse_finish *finish);

/* ---- models -------------------------------------------------------------------------------- */
/* tokens per forward pass of a single sequence's prefill. A GPU's int4 prefill dequantizes
 * every weight once a chunk for cuBLAS, so 512 against 256 halves that work: 7B-shaped
 * prefill 12.2k -> 19.3k tok/s on an H200, for 58 MB more activations (docs/BENCHMARKS.md;
 * -DZSE_PREFILL_CHUNK=256 builds the other) */
#ifndef ZSE_PREFILL_CHUNK
#define ZSE_PREFILL_CHUNK 512
#endif

/* ---- LoRA adapters: the registry and the tiers (lora.c) -----------------------------------
 * A model loaded with adapter slots has one cache: named adapters, the backend's slot pool,
 * host slots (pinned where the backend copies from), and a loader thread that reads adapters
 * from disk for the engine while it runs other sequences. Lock order: the model's run_lock,
 * then the engine's mu, then the cache's mu (the loader and the HTTP threads take only the
 * last). */
typedef struct zse_lora_cache zse_lora_cache;

int zse_lora_cache_new(zse_model *m, const zse_load_params *p);
void zse_lora_cache_free(zse_lora_cache *c);
/* called (without locks) when a disk load finishes, so a waiting engine runs its next step */
void zse_lora_set_waker(zse_lora_cache *c, void (*wake)(void *), void *arg);
/* a device copy is under way (the engine polls sooner) */
bool zse_lora_copying(zse_lora_cache *c);

/* What pinning answered: the slot is the sequence's (PINNED), its adapter is on its way
 * (WAIT; STARVED when it needs a slot and every slot is in use), or loading it failed. */
typedef enum { ZSE_LORA_FAILED = -1, ZSE_LORA_WAIT = 0, ZSE_LORA_PINNED = 1, ZSE_LORA_STARVED = 2 } zse_lora_pin_state;

/* (run_lock held) PINNED with *slot when a's slot holds it (its pin count goes up);
 * otherwise the next move toward a slot: a host -> slot copy into a free or least recently
 * used unpinned slot, or a disk read on the loader thread (neither when may_take_slot is
 * false). FAILED when a load failed since *failures was taken (0 on the first call: the
 * current count is taken); first: count where the adapter was found (stats). */
zse_lora_pin_state zse_lora_pin(zse_lora_cache *c, zse_adapter *a, bool may_take_slot, bool first, int *slot,
                                uint64_t *failures);
void zse_lora_unpin(zse_lora_cache *c, zse_adapter *a);
/* reads a into host memory on the calling thread unless it is there or on its way (the
 * synchronous path of zse_seq); -1 with the error when it cannot be read */
int zse_lora_load_now(zse_lora_cache *c, zse_adapter *a);
void zse_lora_note_wait(zse_lora_cache *c, double seconds);
/* the content hash that keys the adapter's prefix-cache blocks (0 until first loaded) and
 * the projections it adapts */
uint64_t zse_adapter_id(const zse_adapter *a);
uint32_t zse_adapter_modules(const zse_adapter *a);
zse_adapter *zse_adapter_ref(zse_adapter *a);
zse_lora_cache *zse_adapter_cache(const zse_adapter *a);

/* mask_stats.c: the histogram behind zse_mask_stats, added to from any thread */
typedef struct {
    _Atomic uint64_t count[ZSE_MASK_BUCKETS];
    _Atomic uint64_t total_ns;
} zse_mask_timing;

struct zse_model {
    zse_file *file;
    zse_tokenizer *tok;
    zse_backend *be;
    zse_llm *llm;
    zse_kv *kv;
    zse_block_pool blocks;
    pthread_mutex_t run_lock;   /* held around forward passes and block pool changes */
    zse_load_params params;
    char *name;
    int ctx_size;
    int vocab;
    int32_t eos[ZSE_MAX_EOS + 1];
    int n_eos;
    bool add_bos;
    const char *quant;
    /* where the weights are (zse_model_fit): the placement and its counts */
    zse_fit_mode placement;
    int layers_streamed, expert_slots, experts_total;
    zse_lora_cache *lora;       /* NULL: loaded without adapter slots */
    /* constrained decoding (constraint.c): the vocabulary as a grammar sees it, built on
     * first use: plain, and with the tool-call format's special tokens allowed */
    pthread_mutex_t grammar_lock;
    zse_grammar_vocab *gvocab, *gvocab_tools;
    zse_mask_timing *mask_timing; /* mask_stats.c: every mask's compute time */
    /* the tool-call format's marker tokens that are special (e.g. Mistral's [TOOL_CALLS]):
     * generated text keeps their text (constraint.c) */
    int32_t tool_marker_ids[4];
    const char *tool_marker_texts[4];
    int n_tool_markers;
    char *chat_template;        /* zse_model_set_chat_template's, replacing the file's; NULL: the file's */
    /* the backend's memory counters as last read between steps: what zse_model_get_memory
     * answers while a step runs, so /metrics never waits for a long prefill */
    pthread_mutex_t mem_lock;
    zse_backend_memory mem_seen;
    double mem_seen_at;
};

/* (run_lock held) re-reads the backend's memory counters if the last reading is older than a
 * second: the engine calls it after each step */
void zse_model_note_memory(zse_model *m);

/* fills m's tool_marker_ids from its chat template's tool-call format (constraint.c) */
void zse_model_find_tool_markers(zse_model *m);

/* fills a mask as zse_matcher_fill_mask does and counts its time in m's mask statistics */
int zse_mask_fill_timed(const zse_model *m, zse_matcher *matcher, uint32_t *mask);

bool zse_model_is_eos(const zse_model *m, int32_t t);

/* The placement zse_model_load gives f's weights for these load parameters on a device of
 * `budget` bytes (the --gpu-memory budget, or the device's free memory: budget_what names it
 * in the error), with an untied embedding table in host memory when embed_on_host; the
 * environment's ZSE_EXPERT_CACHE / ZSE_STREAM_LAYERS / ZSE_STREAM_BUFFERS apply. 0, or -1
 * with an error that states the smallest budget that runs the model. `zse info --gpu-memory`
 * and `zse hardware --fit` print it. */
int zse_model_fit(const zse_file *f, const zse_load_params *p, uint64_t budget, const char *budget_what,
                  bool embed_on_host, zse_fit *out);
/* the model's offload counters in the public form (the caller holds the run lock) */
void zse_offload_stats_of(const zse_llm *llm, zse_offload_stats *out);
/* the context a model of this config gets for these load parameters */
int zse_model_ctx_size(const zse_config *c, const zse_load_params *p);

/* ---- one sequence: the core that zse_seq (api.c) and the engine's requests (scheduler.c)
 * are both built on (seq.c). It owns the tokens (prompt, then generated), the count of them
 * whose K/V are stored, the block table and the generation state. The functions that touch
 * the block pool expect the model's run_lock held; the others touch the sequence alone. */
typedef struct zse_sequence {
    int32_t *tokens;
    size_t n_tokens, cap_tokens;
    size_t n_prompt;        /* tokens before generation began: penalties count what follows */
    size_t n_cached;        /* leading tokens whose K/V are stored */
    int sampled;            /* tokens sampled since the prompt */
    zse_kv_table kv;
    zse_gen gen;
    /* the prefix cache */
    uint64_t salt;          /* what computes its K/V besides the base model (an adapter); 0: none */
    uint64_t *keys;         /* [n_keys] the keys of its first full blocks of tokens */
    int n_keys, cap_keys;
    int n_published;        /* leading blocks published (or found already published) */
    /* its LoRA adapter (a reference), or NULL; lora_slot is the slot it pins (-1: none yet) */
    zse_adapter *adapter;
    int lora_slot;
    uint64_t lora_failures; /* the adapter's load failures when it began to wait for it */
    double lora_wait_since; /* 0: never waited */
    /* constrained decoding: the matcher of gen.s.constraint (it holds a reference to the
     * grammar), and a mask's scratch */
    zse_matcher *matcher;
    uint32_t *mask;
    /* speculative decoding */
    int n_draft;            /* draft tokens at the end of tokens, not yet verified */
    struct zse_sequence *draft; /* its mirror in the draft model (spec.c), or NULL */
    zse_model *draft_model;
} zse_sequence;

/* scratch for sampling one row on the host: raw keeps the logits before penalties
 * (logprobs), work_p / work_i are the sampler's (work_i zeroed) */
typedef struct {
    float *raw;
    float *work_p;
    int32_t *work_i;
} zse_sample_work;

int zse_sample_work_init(zse_sample_work *w, int vocab);
void zse_sample_work_free(zse_sample_work *w);

int zse_sequence_init(zse_sequence *q, const zse_model *m, const zse_sampling *s);
/* frees the sequence; its blocks go back to the pool (takes the run_lock itself) */
void zse_sequence_free(zse_sequence *q, zse_model *m);
/* appends tokens that have not been run yet */
int zse_sequence_append(zse_sequence *q, const int32_t *ids, size_t n);
/* Makes the sequence's adapter usable by a step (run_lock held): PINNED once its slot holds
 * it (the salt keys its prefix-cache blocks by the adapter), else the fetch is started and
 * it WAITs — without taking a slot when may_take_slot is false (a better-ranked sequence is
 * waiting for one: fairness) — or it FAILED (the error says why). PINNED at once without
 * an adapter. */
zse_lora_pin_state zse_sequence_pin_adapter(zse_sequence *q, zse_model *m, bool may_take_slot);
/* lets its adapter's slot go (a sequence that has ended: the slot may be evicted) */
void zse_sequence_unpin_adapter(zse_sequence *q, zse_model *m);
/* the same, waiting for the adapter (zse_seq: nothing else to run); takes run_lock itself */
int zse_sequence_pin_adapter_wait(zse_sequence *q, zse_model *m);
/* tokens waiting to be run */
static inline size_t zse_sequence_pending(const zse_sequence *q) { return q->n_tokens - q->n_cached; }
/* blocks for positions [0, n_tokens) from the pool (run_lock held); all or nothing, an error
 * when the pool cannot give them */
int zse_sequence_reserve(zse_sequence *q, zse_model *m, size_t n_tokens);
/* blocks needed from the pool to hold positions [0, n_tokens) */
int zse_sequence_blocks_needed(const zse_sequence *q, size_t n_tokens);
/* keeps the K/V of the first n tokens and gives the rest of its blocks back (run_lock held);
 * n_cached drops to at most n */
void zse_sequence_forget(zse_sequence *q, zse_model *m, size_t n);
/* keeps the first n tokens (and their K/V) and drops the rest (run_lock held) */
void zse_sequence_truncate(zse_sequence *q, zse_model *m, size_t n);
/* Full blocks of the prefix cache that hold this sequence's next tokens: from n_cached (a
 * block boundary, with no partial block held) up to the block before the one that holds its
 * last token, which is always computed (its logits are wanted). Returns how many (0 with
 * the cache off); *idle says how many of them no sequence references (taking them uses up
 * that many available blocks). run_lock held. */
int zse_sequence_cached_prefix(zse_sequence *q, zse_model *m, int *idle);
/* takes those blocks: n_cached moves past them; the pool counts the hit and the query */
void zse_sequence_attach_prefix(zse_sequence *q, zse_model *m);
/* publishes its full blocks whose K/V are computed, for later sequences (after a pass) */
void zse_sequence_publish(zse_sequence *q, zse_model *m);
/* the last position of the context is taken once this sequence holds ctx_size - 1 tokens and
 * samples one more */
bool zse_sequence_ctx_full(const zse_sequence *q, const zse_model *m);
/* samples the next token on the host from its logits row (changed in place), with the
 * sequence's settings and history; lp (may be NULL) gets the logprobs it asks for */
int32_t zse_sequence_sample(zse_sequence *q, const zse_model *m, float *logits, zse_sample_work *w,
                            zse_logprobs *lp);
/* what the sequence's settings rule out of a logits row before sampling, for a token that
 * would be its generated-th: the end-of-sequence and stop ids before min_tokens, and every
 * token its constraint's matcher (in its present state) does not allow. -1 on an error of
 * the matcher. */
int zse_sequence_constrain(zse_sequence *q, const zse_model *m, float *logits, int generated);
/* the model's vocabulary for grammars (constraint.c): tools selects the one that lets the
 * tool-call format's special tokens through; NULL with an error */
const zse_grammar_vocab *zse_model_grammar_vocab(zse_model *m, bool tools);
/* the history a token at position `upto` is sampled against: the prompt, then what was
 * generated before it */
zse_history zse_sequence_history(const zse_sequence *q, size_t upto);
/* Takes the sampled token t: the text it completes goes to *text, *finish says whether
 * generation ends, and the token joins the sequence (to be run next) unless it stopped
 * generation or the context has no room for it. */
int zse_sequence_accept(zse_sequence *q, const zse_model *m, int32_t t, zse_buf *text, zse_finish *finish);

/* ---- one forward pass over several sequences (step.c): shared by zse_seq and the engine ---- */
typedef struct {
    zse_sequence *q;
    int take;               /* tokens from n_cached on that this pass runs */
    int n_out;              /* logit rows wanted: its last n_out tokens of the pass (0: none) */
    int out;                /* set by zse_batcher_pack: its first row among the pass's outputs */
    bool logits;            /* its rows must come back as logits (prompt scoring) */
} zse_step_seq;

/* the flattened arrays of a step, grown as needed */
typedef struct {
    int32_t *tokens, *pos, *seq, *slots, *rows;
    size_t tok_cap;
    int32_t *lens, *adapters;
    size_t seq_cap;
    int32_t *table;
    size_t table_cap;
    int32_t *mask_rows;     /* a pass's constrained rows and their token masks */
    uint32_t *mask_bits;
    size_t mask_cap, mask_bits_cap;
} zse_batcher;

void zse_batcher_free(zse_batcher *b);
/* flattens the entries into *out (pointing into b): positions from each n_cached on, slots
 * from its block table (which must cover them: zse_sequence_reserve first) */
int zse_batcher_pack(zse_batcher *b, zse_step_seq *e, int n, zse_batch *out);

/* what a pass hands back for its output rows */
typedef enum {
    ZSE_OUT_LOGITS,         /* every row's logits, to the host */
    ZSE_OUT_ARGMAX,         /* the argmax of each row, taken where the logits are */
    ZSE_OUT_SAMPLED,        /* a token drawn where the logits are (backend sample_rows) */
} zse_out_mode;

/* the cheapest output that still lets every entry with output rows sample as its settings
 * say: ARGMAX when all are plain greedy, SAMPLED when the backend can draw for all of them
 * (and allow_sampled), else LOGITS */
zse_out_mode zse_step_out_mode(const zse_model *m, const zse_step_seq *e, int n, bool allow_sampled);
/* for an ARGMAX or SAMPLED pass: the token mask of each constrained sequence's out row,
 * filled from its matcher (after zse_batcher_pack); *out points into b. -1 on an error. */
int zse_batcher_masks(const zse_model *m, zse_batcher *b, const zse_step_seq *e, int n, zse_row_masks *out);

/* ---- speculative decoding (spec.c) ----------------------------------------------------------
 * One drafter per engine or zse_seq. A step: zse_spec_propose appends each sequence's
 * drafts (n_draft) after its pending token; one pass runs the pending token and the drafts
 * with logits rows (or argmax ids) for all of them; zse_spec_verify decides what is kept,
 * drops the drafts from the sequence and gives the tokens to accept in order (the first
 * ones' K/V are stored already: zse_spec_accept_all moves n_cached past them). */
typedef struct {
    zse_spec_params p;
    zse_batcher batcher;        /* the draft model's passes */
    zse_step_seq *entries;      /* a pass's mirrors */
    int *who;                   /* the sequence each entry drafts for */
    bool *stopped;              /* [sequence] drafts nothing more this step */
    int32_t *ids;
    int cap;
    zse_spec_stats stats;
} zse_spec;

int zse_spec_init(zse_spec *sp, const zse_spec_params *p);
void zse_spec_free(zse_spec *sp);
static inline bool zse_spec_on(const zse_spec *sp) { return sp->p.mode != ZSE_SPEC_OFF; }
/* how many drafts a sequence in its decode phase may take now: the configured count, fewer
 * near max_tokens or the end of the context, none while it is still reading its prompt */
int zse_spec_room(const zse_spec *sp, const zse_sequence *q, const zse_model *m);
/* appends up to want[i] drafts to each sequence (each must have exactly one pending token);
 * the draft model's passes run under its own run_lock. Sequences may end up with fewer
 * (nothing matched, the draft model's KV is full); -1 only on an error of the draft model */
int zse_spec_propose(zse_spec *sp, const zse_model *target, zse_sequence **qs, const int *want, int n);
/* removes a sequence's unverified drafts */
void zse_spec_drop(zse_sequence *q);
/* Verification after a pass over the pending token and n_draft drafts with 1 + n_draft out
 * rows: `logits` [rows][vocab] (changed in place) or, for plain-greedy sequences, `ids`
 * [rows]. Fills out[] with the tokens to accept (accepted drafts, then one drawn from the
 * row after the last accepted), lps[] with their logprobs when the sequence asks and logits
 * are given; returns how many. The drafts leave the sequence: only the pending token's K/V
 * is counted stored (n_cached + 1). */
int zse_spec_verify(zse_spec *sp, zse_sequence *q, const zse_model *m, float *logits, const int32_t *ids,
                    zse_sample_work *w, int32_t *out, zse_logprobs *lps);

/* ---- what a step costs (fair.c): fair sharing between tenants charges each sequence the
 * work it adds to a step, `tokens + ctx_cost × context tokens attended`, in units of a
 * token's work apart from attention. The ratio is fitted to the steps' measured times
 * (time ≈ fixed + per_token × tokens + per_context × context), recent steps weighing more,
 * and followed slowly; until enough varied steps have run, the model's shape gives it
 * (attention's multiply-adds per token of context over the weights' per token), and an
 * unsound fit (a negative term) leaves it as it was. */
typedef struct {
    double s[3][3], b[3];       /* the fit's normal equations, exponentially weighted */
    int n;                      /* steps observed */
    double prior;               /* the shape's ratio */
    double ctx_cost;            /* the ratio in use */
    double theta[3];            /* the last sound fit (seconds for the scaled regressors) */
    bool valid;                 /* theta holds one */
} zse_step_fit;

void zse_step_fit_init(zse_step_fit *f, const zse_model *m);
/* a step of `tokens` tokens attending `context` tokens of context in all took `seconds` */
void zse_step_fit_add(zse_step_fit *f, double tokens, double context, double seconds);
/* tokens attending `context` tokens before them (each sees the ones before it too) */
static inline double zse_step_context(size_t before, int tokens)
{
    return (double)tokens * (double)before + (double)tokens * (tokens + 1) / 2.0;
}

#endif
