/* zse.h — the public C API: load a .zse model, tokenize, and generate sequences.
 *
 * Conventions: functions returning int give 0 on success and -1 on failure; pointer
 * returns are NULL on failure. After a failure zse_last_error() says what went wrong
 * (thread-local). Strings and arrays returned to the caller are freed with zse_free(). */
#ifndef ZSE_H
#define ZSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

const char *zse_last_error(void);
const char *zse_version(void);
void zse_free(void *p);

/* ---- models --------------------------------------------------------------- */
typedef struct zse_model zse_model;

typedef enum { ZSE_KV_F16 = 0, ZSE_KV_INT8 = 1 } zse_kv_type;

typedef struct {
    const char *device;         /* "cpu", "cuda", "cuda:N"; NULL = cuda when present, else cpu */
    int threads;                /* CPU threads; 0 = physical cores */
    zse_kv_type kv_type;
    int ctx_size;               /* max tokens of one sequence; 0 = the model's maximum */
    uint64_t kv_cache_bytes;    /* KV cache budget; 0 = enough for max_seqs full contexts, capped */
    int max_seqs;               /* sequences alive at once (each gets ctx_size of KV); 0 = 1 */
    uint64_t gpu_memory;        /* --gpu-memory budget in bytes; 0 = all free memory. A model larger
                                 * than it keeps experts (MoE) or layers (dense) in host memory;
                                 * nothing to budget on the CPU (a warning) */
    bool no_prefix_cache;       /* true: no KV block is shared between sequences (every
                                 * prompt is computed whole); default false: full 16-token
                                 * blocks of earlier prompts and answers are reused */
    /* LoRA adapters (zse_adapter_*): slots on the device (in memory on the CPU backend) for
     * adapters that run at once, set aside before the KV cache is sized; 0 = no adapters */
    int max_loras;
    int max_cpu_loras;          /* adapters kept loaded in host memory (pinned on a GPU)
                                 * besides the slots' (0 = as many as max_loras); others are
                                 * read from disk again when needed */
    int max_lora_rank;          /* a slot holds an adapter of this rank on all seven
                                 * projections (or of a higher rank on fewer); 0 = 16 */
} zse_load_params;

void zse_load_params_default(zse_load_params *p);
zse_model *zse_model_load(const char *path, const zse_load_params *p);
void zse_model_free(zse_model *m);

typedef struct {
    const char *arch;
    const char *name;           /* file name without .zse, used as the API model id */
    int n_layers, n_heads, n_kv_heads, head_dim, hidden_size, vocab_size;
    int ctx_size;               /* the effective maximum sequence length */
    int bos_id;                 /* -1 when none */
    bool add_bos;               /* the tokenizer adds BOS by default */
    const int32_t *eos_ids;
    int n_eos;
    const char *quant;          /* "int4", "int8", ... (the recipe) */
    bool has_chat_template;
    const char *device;         /* what the model runs on */
} zse_model_info;
void zse_model_get_info(const zse_model *m, zse_model_info *out);

/* What a loaded model holds, in bytes. On the CPU the weights are the file's tensors, used
 * in place from the mapping; on a GPU they are the device copies. A model larger than its
 * device's budget keeps part of its weights in pinned host memory: a mixture-of-experts
 * model its experts, with a device cache of the recently routed ones ("experts offloaded");
 * a dense model the layers that do not fit, streamed through device layer buffers
 * ("streamed"). */
typedef struct {
    uint64_t weights;           /* resident on the device (buffers and caches below not included) */
    uint64_t kv_cache;
    uint64_t activations;
    uint64_t workspace;         /* scratch kept between steps */
    uint64_t stream_buffers;    /* the device layer buffers streamed layers pass through */
    uint64_t expert_cache;      /* the device cache of experts kept in host memory */
    uint64_t host_pinned;       /* host memory pinned for copies to the device */
    const char *placement;      /* "resident", "experts offloaded", "streamed" */
    int layers_resident, layers_streamed;
    int experts_cached, experts_total;  /* the cache's slots; every expert of every MoE layer */
    uint64_t adapters;          /* LoRA adapter slots */
    bool on_device;             /* the three below are filled */
    uint64_t device_used;       /* the whole device's memory in use, as nvidia-smi counts it */
    uint64_t device_other;      /* device_used minus zse's own allocations: CUDA context, cuBLAS, other processes */
    uint64_t device_total;
} zse_memory_info;
void zse_model_get_memory(zse_model *m, zse_memory_info *out);

/* What the weights kept in host memory did since the model loaded (all zero when resident).
 * Per forward pass ("step"): expert_hits / steps routed experts were on the device, and so on. */
typedef struct {
    uint64_t steps;                 /* forward passes */
    uint64_t expert_hits;           /* routed experts found in the device cache */
    uint64_t expert_fetches;        /* routed experts copied to the device when a step needed them */
    uint64_t expert_prefetches;     /* experts copied ahead for the next layer's predicted routing */
    uint64_t expert_prefetch_hits;  /* of those, routed to before they were evicted */
    uint64_t expert_host;           /* routed experts computed on the host instead */
    uint64_t layers_streamed;       /* streamed layers computed */
    uint64_t bytes_to_device;       /* bytes copied from host memory (experts and streamed layers) */
} zse_offload_stats;
void zse_model_get_offload_stats(zse_model *m, zse_offload_stats *out);

/* ---- LoRA adapters ------------------------------------------------------------------
 * Fine-tunes of the model as PEFT LoRA adapters (a directory with adapter_config.json and
 * adapter_model.safetensors) or .zsa files (zse convert-adapter). A sequence runs with one
 * adapter or none (zse_sampling.adapter); sequences of many adapters share a step. An
 * adapter is in one of three tiers: a slot (max_loras; where steps read it), host memory
 * (max_cpu_loras), or only on disk; it moves up when a sequence needs it — the engine
 * fetches it while other sequences run, its requests waiting meanwhile — and an adapter a
 * sequence uses is never evicted. Needs a model loaded with max_loras > 0. */
typedef struct zse_adapter zse_adapter;
/* registers an adapter under a name and loads it into host memory, checked against the model
 * (shapes, layers, targets); scale multiplies its own (1 = as trained). Fails when the name
 * is taken. */
int zse_adapter_register(zse_model *m, const char *name, const char *path, float scale);
/* adapters found on first use in dir: a subfolder NAME (PEFT) or a file NAME.zsa */
int zse_adapter_set_dir(zse_model *m, const char *dir);
/* drops a name; sequences that hold the adapter keep it until they end */
int zse_adapter_unregister(zse_model *m, const char *name);
/* a reference to the adapter of that name (registered, or found in the adapter directory
 * and registered now); NULL with an error when there is none */
zse_adapter *zse_adapter_get(zse_model *m, const char *name);
/* an adapter of its own, not registered (zse run --lora), loaded and checked now */
zse_adapter *zse_adapter_open(zse_model *m, const char *path, float scale);
void zse_adapter_release(zse_adapter *a);
const char *zse_adapter_name(const zse_adapter *a);     /* NULL for zse_adapter_open's */
/* every adapter name a request may use: registered ones and the adapter directory's,
 * sorted; an array of heap strings (zse_free each, then the array) */
char **zse_adapter_list(zse_model *m, size_t *n);
/* the largest rank the adapter at path uses (its config alone is read) */
int zse_adapter_probe(const char *path, int *max_rank);

typedef struct {
    int slots, host_slots;          /* max_loras, max_cpu_loras */
    int registered;
    int in_slots, in_host;          /* adapters each tier holds now */
    int pinned;                     /* adapters sequences are using (never evicted) */
    /* where a sequence found its adapter when it first asked: in a slot, in host memory,
     * or on disk only */
    uint64_t hits_slot, hits_host, hits_disk;
    uint64_t loads_host, loads_slot;        /* disk -> host reads, host -> slot copies */
    double load_host_seconds, load_slot_seconds;
    uint64_t evictions_slot, evictions_host;
    uint64_t failures;              /* loads that failed (missing or bad files) */
    uint64_t waits;                 /* sequences that waited for their adapter */
    double wait_seconds;            /* and how long, in all */
} zse_adapter_stats;
void zse_adapter_get_stats(zse_model *m, zse_adapter_stats *out);

/* ---- tokens ----------------------------------------------------------------- */
enum {
    ZSE_TOK_ADD_SPECIAL = 1,    /* add BOS/EOS as the tokenizer's post-processor would */
    ZSE_TOK_PARSE_SPECIAL = 2,  /* "<|im_start|>" in text becomes its special id */
};
int zse_tokenize(const zse_model *m, const char *text, size_t len, int flags, int32_t **ids,
                 size_t *n_ids);
char *zse_detokenize(const zse_model *m, const int32_t *ids, size_t n, bool skip_special);
/* the bytes token `id` adds to decoded text when it follows other tokens, before any UTF-8
 * check (a byte-level or <0xNN> token holding part of a character gives that byte): *len
 * bytes, heap (zse_free); NULL for an id outside the vocabulary */
uint8_t *zse_token_bytes(const zse_model *m, int32_t id, size_t *len);

/* ---- embeddings ---------------------------------------------------------------------
 * The model's final hidden state (after its last norm) pooled over the tokens — their mean,
 * or the last token's — and scaled to unit length: out[hidden_size]. The tokens run through
 * the model in chunks between other work on it; nothing is kept. */
typedef enum { ZSE_POOL_MEAN = 0, ZSE_POOL_LAST = 1 } zse_pooling;
int zse_embed(zse_model *m, const int32_t *ids, size_t n, zse_pooling pooling, float *out);

/* ---- chat templates ------------------------------------------------------------
 * The model's chat template applied as transformers' apply_chat_template does.
 * messages_json: a JSON array of {"role", "content", ...}; extra_json: NULL or a JSON
 * object of further template variables (tools, date_string, ...). Heap string. */
char *zse_chat_render(const zse_model *m, const char *messages_json, const char *extra_json,
                      bool add_generation_prompt);

/* the template zse_chat_render uses: zse_model_set_chat_template's, else the file's; NULL
 * when there is none */
const char *zse_model_chat_template(const zse_model *m);
/* replaces the file's template for this loaded model (zse serve --chat-template); NULL goes
 * back to the file's. Set it before requests run. */
int zse_model_set_chat_template(zse_model *m, const char *src);
/* tokenizer_config.json as the file stores it (compact JSON, heap), NULL when it had none */
char *zse_model_tokenizer_config(const zse_model *m);

/* ---- sampling --------------------------------------------------------------- */
typedef struct {
    int32_t id;
    float bias;
} zse_logit_bias;

#define ZSE_MAX_TOP_LOGPROBS 20
/* a token's log-probability under the model's distribution (before penalties and
 * temperature), its rank in it, and the most likely alternatives */
typedef struct {
    float logprob;
    int rank;                               /* 1: the most likely token */
    int n_top;
    int32_t top_ids[ZSE_MAX_TOP_LOGPROBS];  /* most likely first */
    float top_logprobs[ZSE_MAX_TOP_LOGPROBS];
} zse_logprobs;

/* ---- constrained decoding ----------------------------------------------------------
 * A constraint is a grammar compiled against a model's vocabulary: a sequence sampling with
 * it produces only text the grammar accepts (and ends when the grammar is complete). One
 * constraint may serve many sequences at once; each sequence keeps a reference; free every
 * constraint before its model (it uses the model's vocabulary). Compile
 * errors name what is not supported (a JSON Schema keyword and its path, a regex construct
 * and its offset): docs/GRAMMAR.md lists what is. */
typedef struct zse_constraint zse_constraint;
/* a JSON value valid against a JSON Schema; strict: OpenAI's strict mode (every object
 * closed, every property required) */
zse_constraint *zse_constraint_json_schema(zse_model *m, const char *schema, size_t len, bool strict);
zse_constraint *zse_constraint_json_object(zse_model *m);                       /* any JSON object */
zse_constraint *zse_constraint_regex(zse_model *m, const char *pattern, size_t len); /* the whole output */
zse_constraint *zse_constraint_choice(zse_model *m, const char *const *choices, int n);
/* Tool calls in the model's format (format: "hermes", "llama3", "mistral", "json"; NULL: the
 * one its chat template writes). tools_json: an OpenAI `tools` array. choice: "required"
 * (a call of any tool; several with parallel), "auto" (free text, then a valid call once the
 * model starts one: formats with a call marker only), or a function's name (that call). */
zse_constraint *zse_constraint_tools(zse_model *m, const char *tools_json, const char *choice, bool parallel,
                                     const char *format);
/* the tool-call format the model's chat template writes ("hermes", "llama3", "mistral"; "json"
 * when it shows none): the format a server parses tool calls with unless told otherwise */
const char *zse_model_tool_format(const zse_model *m);
zse_constraint *zse_constraint_retain(zse_constraint *c);
/* What constrained decoding costs: the time each token's mask took to compute (the grammar
 * matcher filling the allowed-token bitmask, before it is applied to the logits), over every
 * sequence of the model since it was loaded, in log-spaced buckets (four an octave from
 * 100 ns; the last holds everything slower). */
#define ZSE_MASK_BUCKETS 64
typedef struct {
    uint64_t count[ZSE_MASK_BUCKETS];
    uint64_t n;                 /* masks computed */
    double total_s;
} zse_mask_stats;
void zse_model_get_mask_stats(const zse_model *m, zse_mask_stats *out);
double zse_mask_bucket_le(int i);  /* bucket i's upper bound in seconds (INFINITY for the last) */
/* the q-quantile (0..1) in seconds, as the upper bound of its bucket; 0 with no masks */
double zse_mask_stats_quantile(const zse_mask_stats *s, double q);
void zse_mask_stats_sub(zse_mask_stats *s, const zse_mask_stats *before); /* s -= before */
void zse_constraint_free(zse_constraint *c);   /* drops a reference; NULL is a no-op */

/* max_tokens: generate nothing (with prompt_logprobs: score the prompt) */
#define ZSE_MAX_TOKENS_NONE (-1)

typedef struct {
    float temperature;          /* 0 = greedy */
    int top_k;                  /* 0 = off */
    float top_p;                /* 1 = off */
    float min_p;                /* 0 = off */
    float repetition_penalty;   /* 1 = off */
    float presence_penalty;     /* 0 = off */
    float frequency_penalty;    /* 0 = off */
    uint64_t seed;              /* same seed, same output */
    int max_tokens;             /* 0 = until EOS or the context is full; ZSE_MAX_TOKENS_NONE = none */
    int min_tokens;             /* EOS, stop ids and stop strings end nothing before this many */
    const char *const *stop;    /* stop strings (may span tokens); not included in the output */
    int n_stop;
    const int32_t *stop_ids;
    int n_stop_ids;
    const zse_logit_bias *logit_bias;
    int n_logit_bias;
    bool ignore_eos;
    int top_logprobs;           /* 0..20: report this many alternatives per token */
    bool logprobs;              /* report the chosen token's logprob */
    const zse_constraint *constraint; /* NULL: none; else the output follows it (the sequence
                                       * takes its own reference) */
    bool prompt_logprobs;       /* the engine reports every prompt token's logprob (the prompt
                                 * is then computed whole, never taken from the prefix cache) */
    int prompt_top_logprobs;    /* 0..20 alternatives for each of them */
    zse_adapter *adapter;       /* the LoRA adapter the sequence runs with (it takes its own
                                 * reference); NULL: the base model */
} zse_sampling;
void zse_sampling_default(zse_sampling *s);

typedef enum {
    ZSE_FINISH_NONE = 0,
    ZSE_FINISH_STOP,            /* EOS or a stop string / id */
    ZSE_FINISH_LENGTH,          /* max_tokens or the context limit */
    ZSE_FINISH_CANCELLED,
    ZSE_FINISH_ERROR,
} zse_finish;

/* ---- speculative decoding ----------------------------------------------------------
 * Each step proposes up to `tokens` draft tokens after a sequence's last token and checks
 * them all in one forward pass of the model: greedy output is exactly what decoding without
 * drafts gives, and sampled output keeps the model's distribution (a draft x is accepted with
 * probability p(x), else a token is drawn from p without x). Drafts come from the sequence
 * itself (NGRAM: the tokens that followed the latest earlier occurrence of its last 1-4
 * tokens, as prompt lookup decoding) or from a smaller model with the same tokenizer
 * (DRAFT: its greedy continuation). */
typedef enum { ZSE_SPEC_OFF = 0, ZSE_SPEC_NGRAM = 1, ZSE_SPEC_DRAFT = 2 } zse_spec_mode;

#define ZSE_SPEC_MAX_TOKENS 16
typedef struct {
    zse_spec_mode mode;
    int tokens;                 /* draft tokens per step, 1..ZSE_SPEC_MAX_TOKENS */
    zse_model *draft;           /* DRAFT: the draft model (not owned; outlives its users) */
} zse_spec_params;

/* 0, or -1 with an error naming what is wrong: tokens out of range, no draft model, a draft
 * whose tokenizer differs from the target's */
int zse_spec_check(const zse_model *target, const zse_spec_params *p);

typedef struct {
    uint64_t drafted;           /* draft tokens proposed and checked */
    uint64_t accepted;          /* of those, accepted */
    uint64_t passes;            /* a sequence's verification passes */
    uint64_t emitted;           /* tokens those passes produced (accepted + one each) */
} zse_spec_stats;

/* ---- one sequence at a time (run, chat, perplexity, bench) ------------------------ */
typedef struct zse_seq zse_seq;
zse_seq *zse_seq_new(zse_model *m, const zse_sampling *s);
void zse_seq_free(zse_seq *q);
/* append tokens to the sequence and run them through the model (prefill) */
int zse_seq_feed(zse_seq *q, const int32_t *ids, size_t n);
/* logits of the last fed position (vocab_size floats, valid until the next call) */
const float *zse_seq_logits(zse_seq *q);
/* like zse_seq_feed, and writes the logits of every fed position to logits [n][vocab]
 * (perplexity, scoring) */
int zse_seq_feed_logits(zse_seq *q, const int32_t *ids, size_t n, float *logits);
/* sample the next token from the current logits with the sequence's sampling settings,
 * feed it, and report the text it completes; *finish is set when generation must end */
int zse_seq_next(zse_seq *q, int32_t *token, char **text_piece, zse_finish *finish);
size_t zse_seq_length(const zse_seq *q);
/* the tokens in the sequence's cache (valid until the next call on it) */
const int32_t *zse_seq_tokens(const zse_seq *q);
/* keep the first `length` tokens and their KV (0 starts over); the next feed is a new
 * prompt (max_tokens and stop strings count from it) */
int zse_seq_truncate(zse_seq *q, size_t length);
/* speculative decoding for this sequence's zse_seq_next from now on (p NULL or mode OFF:
 * none); checked as zse_spec_check does */
int zse_seq_set_spec(zse_seq *q, const zse_spec_params *p);
void zse_seq_get_spec_stats(const zse_seq *q, zse_spec_stats *out);

/* ---- many sequences: the batching engine (serve) --------------------------------- */
typedef struct zse_engine zse_engine;

typedef struct {
    int max_seqs;               /* running sequences at most */
    int max_batch_tokens;       /* tokens per step: long prompts are prefilled in chunks */
    int max_queue;              /* waiting requests at most (submit fails beyond) */
    zse_spec_params spec;       /* speculative decoding for every request (mode OFF: none) */
    double priority_aging_s;    /* a waiting request's priority improves by one level every
                                 * this many seconds (0: 1 s; negative: never) */
    double ctx_cost;            /* fair sharing between tenants: what attending one token of
                                 * context costs, relative to the rest of a token's work
                                 * (0: measured from the steps' times as the engine runs) */
    bool no_compute_share;      /* never hold a tenant's sequences back for compute: every running
                                 * sequence runs every step (a GPU's batch is nearly free); slots
                                 * still go to the tenant running the fewest */
} zse_engine_params;

typedef struct {
    int32_t token;
    const char *text;           /* complete UTF-8 text this token adds (may be "") */
    float logprob;
    int n_top;
    const int32_t *top_ids;
    const float *top_logprobs;
    zse_finish finish;          /* set on the last event of a request */
    int prompt_tokens;
    int completion_tokens;
    /* on the first event of a request that asked (zse_sampling.prompt_logprobs):
     * [prompt_tokens] entries, the first all zero (nothing comes before it). With
     * max_tokens ZSE_MAX_TOKENS_NONE that first event is also the last, with token -1. */
    const zse_logprobs *prompt_logprobs;
    const char *error;          /* with ZSE_FINISH_ERROR: what went wrong (NULL: unknown) */
} zse_token_event;

/* Called on the engine thread. Return false to cancel the request (client gone). The
 * event with finish != ZSE_FINISH_NONE is the last one for the request. */
typedef bool (*zse_token_cb)(void *user, const zse_token_event *ev);

zse_engine *zse_engine_start(zse_model *m, const zse_engine_params *p);
/* 0 and *request_id on success; -1 with an error when the queue is full or the prompt
 * is longer than the context (zse_last_error() says both numbers). priority: lower runs
 * first (vLLM's convention); with every slot taken, a request of a strictly better priority
 * preempts the worst-ranked running one within a step. */
int zse_engine_submit(zse_engine *e, const int32_t *prompt, size_t n, const zse_sampling *s,
                      int priority, zse_token_cb cb, void *user, uint64_t *request_id);
/* As zse_engine_submit, for a tenant (whose request it is: an API key, a client; NULL or ""
 * is the one default tenant that zse_engine_submit uses). Within a priority, tenants share
 * the engine fairly: a free slot goes to the tenant running the fewest sequences, a tenant
 * with at least two fewer running than another takes one of that tenant's slots (the
 * sequence goes back to the queue), and when several tenants have sequences to run, each
 * step shares the compute between them by deficit round robin over an estimated cost (a
 * token's work plus attention over its context): sequences of a tenant past its share sit
 * out the step (keeping their KV) and catch up when others are idle. With one tenant,
 * nothing changes. */
int zse_engine_submit_for(zse_engine *e, const char *tenant, const int32_t *prompt, size_t n,
                          const zse_sampling *s, int priority, zse_token_cb cb, void *user,
                          uint64_t *request_id);
void zse_engine_cancel(zse_engine *e, uint64_t request_id);
/* A paused request runs no step (it keeps its slot and KV, and is not admitted while it
 * waits) until it is resumed: backpressure from a caller whose consumer does not keep up
 * (a streaming client that stops reading). Unknown or ended ids are ignored. */
void zse_engine_pause(zse_engine *e, uint64_t request_id, bool paused);

typedef struct {
    int queued;
    int running;
    int kv_blocks_used;
    int kv_blocks_total;
    uint64_t preemptions;
    uint64_t prefix_hit_tokens;     /* prompt tokens found in the prefix cache (not computed) */
    uint64_t prefix_query_tokens;   /* prompt tokens looked up there */
    int prefix_cached_blocks;       /* full blocks published in the cache (held or idle) */
    zse_spec_stats spec;            /* speculative decoding, over every request so far */
    zse_offload_stats offload;      /* weights in host memory (the model's, since it loaded) */
    uint64_t steps;                 /* forward passes run */
    uint64_t fair_waits;            /* sequence-steps sat out for fair sharing between tenants */
    int tenants;                    /* tenants with requests queued or running */
    int paused;                     /* requests paused (zse_engine_pause) */
    double ctx_cost;                /* the cost of a token of context fair sharing uses now */
} zse_engine_stats;
void zse_engine_get_stats(zse_engine *e, zse_engine_stats *out);
/* stop accepting, finish or cancel running requests within timeout seconds, join */
void zse_engine_stop(zse_engine *e, double timeout_s);

#ifdef __cplusplus
}
#endif
#endif
