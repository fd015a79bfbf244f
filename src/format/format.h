/* format — the .zse file (reader and writer), safetensors, Hugging Face directory
 * normalization and GGUF files as a conversion source. docs/FORMAT.md is the
 * specification of .zse. */
#ifndef ZSE_FORMAT_H
#define ZSE_FORMAT_H

#include "quant/quant.h"
#include "util/util.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

/* ---- normalized model configuration --------------------------------------
 * What the model code needs, whatever the source spelled it as. Stored as the "config"
 * object of the .zse header with these field names. */
typedef enum {
    ZSE_ROPE_NONE = 0,      /* plain RoPE */
    ZSE_ROPE_LINEAR,
    ZSE_ROPE_DYNAMIC,
    ZSE_ROPE_LLAMA3,
    ZSE_ROPE_YARN,
} zse_rope_type;

#define ZSE_MAX_EOS 8
/* mixture-of-experts bounds: routed experts per layer, experts a token takes, layers of a
 * model with experts (the per-layer map below is a fixed bitmap) */
#define ZSE_MAX_EXPERTS 1024
#define ZSE_MAX_EXPERTS_USED 32
#define ZSE_MAX_MOE_LAYERS 1024

typedef struct {
    char arch[32];              /* "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral" */
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int hidden_size;
    int intermediate_size;
    int vocab_size;
    int max_position;           /* max_position_embeddings */
    float rms_eps;
    double rope_theta;
    struct {
        zse_rope_type type;
        double factor;
        double low_freq_factor;     /* llama3 */
        double high_freq_factor;    /* llama3 */
        int original_max_position;  /* llama3, yarn, dynamic */
        double attn_factor;         /* yarn */
        double beta_fast, beta_slow;/* yarn */
    } rope_scaling;
    bool tie_embeddings;
    bool attn_bias;             /* q/k/v projections carry biases (qwen2) */
    bool attn_out_bias;
    bool mlp_bias;
    bool qk_norm;               /* per-head RMSNorm on q and k (qwen3) */
    int sliding_window;         /* 0 = full attention */
    /* Mixture of experts (all 0 / false for a dense model). A layer whose bit is set in
     * moe_layers replaces the MLP by: a router (f32 logits over n_experts), softmax over
     * them, the n_experts_used largest (renormalized to sum to 1 when norm_topk), each a
     * SwiGLU MLP of width expert_ffn, their outputs summed by those weights; plus, when
     * shared_ffn > 0, a shared expert of that width every token runs, scaled by
     * sigmoid(its gate) when shared_gate. Other layers keep the dense MLP. */
    int n_experts;              /* routed experts per MoE layer; 0 = dense */
    int n_experts_used;         /* top-k */
    int expert_ffn;             /* one routed expert's MLP width */
    int shared_ffn;             /* the shared expert's MLP width; 0 = none */
    bool shared_gate;           /* the shared expert's output is scaled by sigmoid(w · x) */
    bool norm_topk;             /* the top-k weights are renormalized to sum to 1 */
    uint64_t moe_layers[ZSE_MAX_MOE_LAYERS / 64];   /* bit l: layer l runs the experts */
    /* token ids from config / generation_config / tokenizer_config; -1 when absent */
    int bos_id;
    int pad_id;
    int eos_ids[ZSE_MAX_EOS];
    int n_eos;
} zse_config;

/* layer l runs routed experts (a MoE layer) rather than the dense MLP */
bool zse_config_layer_is_moe(const zse_config *c, int l);
/* how many layers run experts */
int zse_config_moe_layer_count(const zse_config *c);

/* config <-> JSON (the .zse "config" object) */
json_t *zse_config_to_json(const zse_config *c);
int zse_config_from_json(zse_config *c, const json_t *obj);

/* ---- Hugging Face model directories ----------------------------------------- */
typedef struct {
    zse_config config;
    json_t *config_json;            /* config.json as read */
    json_t *generation_config;      /* generation_config.json or NULL */
    json_t *tokenizer_config;       /* tokenizer_config.json or NULL */
    char *tokenizer_json_path;      /* path of tokenizer.json (required) */
    char *chat_template;            /* from chat_template.jinja or tokenizer_config, or NULL */
} zse_hf_dir;

int zse_hf_open(zse_hf_dir *d, const char *dir);
void zse_hf_close(zse_hf_dir *d);
/* normalize config.json (+ generation_config, tokenizer_config) into c */
int zse_hf_normalize_config(zse_config *c, const json_t *config, const json_t *generation,
                            const json_t *tokenizer_config);

/* Canonical tensor names used inside .zse files (independent of the source naming):
 *   token_embd.weight
 *   blk.N.attn_norm.weight  blk.N.attn_q.weight  blk.N.attn_q.bias  blk.N.attn_k.*  blk.N.attn_v.*
 *   blk.N.attn_q_norm.weight blk.N.attn_k_norm.weight (qk_norm)  blk.N.attn_output.weight
 *   blk.N.ffn_norm.weight  blk.N.ffn_gate.weight  blk.N.ffn_up.weight  blk.N.ffn_down.weight
 *   MoE layers instead of the dense MLP: blk.N.ffn_gate_inp.weight (router), the layer's
 *   expert bank (below), and with a shared expert blk.N.ffn_gate_inp_shexp.weight (its
 *   sigmoid gate) blk.N.ffn_gate_shexp.weight blk.N.ffn_up_shexp.weight blk.N.ffn_down_shexp.weight
 *   output_norm.weight  output.weight (absent when embeddings are tied)
 * Returns a heap string or NULL (with an error) for a tensor the architecture does not use. */
char *zse_hf_canonical_name(const zse_config *c, const char *hf_name);

/* The parts of one routed expert, in the order they lie in its range of the file. */
enum { ZSE_EXPERT_GATE = 0, ZSE_EXPERT_UP = 1, ZSE_EXPERT_DOWN = 2, ZSE_EXPERT_PARTS = 3,
       ZSE_EXPERT_GATE_UP = -1 /* a fused source tensor: gate rows, then up rows */ };
/* a routed expert's weight in a Hugging Face checkpoint */
typedef struct {
    int layer;
    int expert;     /* -1: a fused tensor [n_experts][rows][cols] that holds every expert */
    int part;       /* ZSE_EXPERT_GATE / _UP / _DOWN, or ZSE_EXPERT_GATE_UP (fused) */
} zse_hf_expert_ref;
/* true when hf names a routed expert's weight of this config (per-expert names such as
 * model.layers.N.mlp.experts.E.gate_proj.weight or Mixtral's block_sparse_moe.experts.E.w1,
 * or transformers 5's fused mlp.experts.gate_up_proj / down_proj) */
bool zse_hf_expert_ref_of(const zse_config *c, const char *hf_name, zse_hf_expert_ref *ref);
/* "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps" */
const char *zse_expert_part_name(int part);

/* Forward-order rank of a canonical name (token_embd first, then each block's tensors in
 * the order above, output_norm, output last); -1 for a name that is not canonical. */
int64_t zse_canonical_rank(const char *name);
/* The [rows, cols] the config gives a canonical tensor (vectors are [1, n]); false for a
 * name the config's forward pass does not read (unknown, or a layer past n_layers). */
bool zse_canonical_shape(const zse_config *c, const char *name, int64_t *rows, int64_t *cols);
/* 0 when the shape matches (or the name is not one the config reads); else an error
 * naming the tensor, its shape and the config's */
int zse_check_tensor_shape(const zse_config *c, const char *name, int64_t rows, int64_t cols);
/* every tensor the config's forward pass reads is present: has(ctx, name) answers */
int zse_check_required_tensors(const zse_config *c, bool (*has)(const void *ctx, const char *name),
                               const void *ctx);

/* ---- safetensors -------------------------------------------------------------- */
typedef enum { ZSE_ST_F32, ZSE_ST_F16, ZSE_ST_BF16, ZSE_ST_I8, ZSE_ST_U8, ZSE_ST_I32,
               ZSE_ST_OTHER,
               ZSE_ST_GGML      /* a GGUF tensor: ggml_type says its block format */
} zse_st_dtype;

typedef struct {
    char *name;
    zse_st_dtype dtype;
    int ndim;
    int64_t shape[8];
    const uint8_t *data;        /* inside the mapping */
    size_t size;                /* bytes */
    int file_index;             /* which shard */
    uint32_t ggml_type;         /* ZSE_ST_GGML: the GGML type id (quant.h) */
    int permuted_heads;         /* ZSE_ST_GGML: rows of this many heads are in llama.cpp's
                                 * interleaved RoPE order, undone when read; 0 = in order */
} zse_st_tensor;

typedef struct {
    zse_map *shards;
    int n_shards;
    zse_st_tensor *tensors;
    size_t n_tensors;
    bool canonical_names;       /* tensors carry zse's canonical names (a GGUF source) */
} zse_safetensors;

/* dir_or_file: a .safetensors file, or a directory with model.safetensors or
 * model.safetensors.index.json (sharded). Every offset is checked against the file. */
int zse_st_open(zse_safetensors *st, const char *dir_or_file);
void zse_st_close(zse_safetensors *st);
const zse_st_tensor *zse_st_find(const zse_safetensors *st, const char *name);
/* convert n elements of a tensor (F32/F16/BF16, or a GGUF tensor's whole rows) starting
 * at element `first` to f32 */
int zse_st_read_f32(const zse_st_tensor *t, size_t first, size_t n, float *out);

/* ---- GGUF (gguf.c: the container; gguf_model.c: a GGUF as a conversion source) ---------- */
/* the value types, numbered as the file format numbers them */
enum {
    ZSE_GGUF_U8, ZSE_GGUF_I8, ZSE_GGUF_U16, ZSE_GGUF_I16, ZSE_GGUF_U32, ZSE_GGUF_I32, ZSE_GGUF_F32, ZSE_GGUF_BOOL,
    ZSE_GGUF_STR, ZSE_GGUF_ARR, ZSE_GGUF_U64, ZSE_GGUF_I64, ZSE_GGUF_F64, ZSE_GGUF_TYPES
};
typedef struct {
    char *key;
    uint32_t type;              /* ZSE_GGUF_* */
    const uint8_t *at;          /* the value (an array's first element) inside the mapping */
    uint32_t arr_type;          /* arrays: element type and count */
    uint64_t arr_n;
} zse_gguf_kv;

typedef struct {
    char *name;
    int n_dims;
    int64_t ne[4];              /* ggml order: ne[0] is the row length */
    uint32_t type;              /* GGML type id */
    uint64_t offset;            /* from the data section's start */
    uint64_t size;              /* bytes; 0 for a type zse cannot read */
    const uint8_t *data;        /* inside the mapping, bounds-checked */
} zse_gguf_tensor;

typedef struct {
    zse_map map;
    uint32_t version;
    zse_gguf_kv *kvs;
    size_t n_kvs;
    zse_gguf_tensor *tensors;
    size_t n_tensors;
    uint64_t alignment, data_offset;
} zse_gguf;

bool zse_is_gguf_file(const char *path);            /* by its magic, whatever its name */
/* maps and checks the whole header and tensor directory against the file */
zse_gguf *zse_gguf_open(const char *path);
void zse_gguf_close(zse_gguf *g);
const zse_gguf_kv *zse_gguf_find(const zse_gguf *g, const char *key);
const zse_gguf_tensor *zse_gguf_tensor_named(const zse_gguf *g, const char *name);
bool zse_gguf_kv_int(const zse_gguf_kv *kv, int64_t *out);      /* integers and bools */
bool zse_gguf_kv_num(const zse_gguf_kv *kv, double *out);       /* floats and integers */
const char *zse_gguf_kv_str(const zse_gguf_kv *kv, size_t *len); /* not NUL-terminated */
/* the byte size of a scalar value type; -1 for strings, arrays and unknown types */
int zse_gguf_scalar_size(uint32_t type);
/* zse_st_read_f32 of a ZSE_ST_GGML tensor; the GGUF row that holds row r */
int zse_gguf_read_f32(const zse_st_tensor *t, size_t first, size_t n, float *out);
int64_t zse_gguf_source_row(const zse_st_tensor *t, int64_t r);
/* A GGUF file as zse convert's source: the normalized config and chat template into
 * meta (tokenizer_json_path stays NULL: the vocabulary comes through the convert
 * options), the tensors into st under their canonical names. */
int zse_gguf_open_source(const char *path, zse_hf_dir *meta, zse_safetensors *st);

/* ---- .zse reader ----------------------------------------------------------- */
/* The newest version this zse reads and writes. The writer marks a file with the oldest
 * version that has everything it holds: major 1, or 2 when it holds routed experts (its expert
 * banks are a header key a 1.x reader would skip: it must refuse the file instead) or an
 * int8g tensor; minor 0, or 1 when its header carries the optional "calibration" key (a
 * reader of either major skips it, so it needs no new major). The reader reads majors 1 and
 * 2 at any minor. docs/FORMAT.md §Versioning. */
#define ZSE_FORMAT_MAJOR 2
#define ZSE_FORMAT_MINOR 1
#define ZSE_FORMAT_DENSE_MAJOR 1
#define ZSE_FORMAT_CALIB_MINOR 1    /* the minor of a file with "calibration" (else 0) */
#define ZSE_TENSOR_ALIGN 4096
#define ZSE_EXPERT_PART_ALIGN 256   /* a part's offset inside its expert's range */

typedef struct {
    char *name;                 /* canonical name */
    zse_qshape q;               /* scheme, rows, cols, group size */
    zse_layout layout;
    uint64_t offset;            /* absolute file offset, 4096-aligned */
    uint64_t size;              /* bytes */
    uint64_t checksum;          /* XXH3-64 of the bytes */
    const void *data;           /* offset inside the mapping: weights are used in place */
} zse_tensor_info;

/* One MoE layer's routed experts: expert e is the range [offset + e * stride, + size) of
 * the file, holding its gate, up and down weights (part[]) at fixed offsets, packed as the
 * tensors of their scheme are; each expert's range has its own checksum, so an expert can
 * be read, copied and checked on its own (docs/FORMAT.md §Expert banks). */
typedef struct {
    zse_qshape q;               /* every expert's part has this shape and scheme */
    zse_layout layout;
    uint64_t at;                /* offset inside the expert's range (a multiple of 256) */
    uint64_t size;              /* packed bytes */
} zse_expert_part;

typedef struct {
    int layer;
    int count;                  /* experts */
    uint64_t offset;            /* expert 0's first byte (4096-aligned) */
    uint64_t stride;            /* from one expert to the next (a multiple of 4096, >= size) */
    uint64_t size;              /* one expert's checksummed bytes */
    zse_expert_part part[ZSE_EXPERT_PARTS];
    uint64_t *checksums;        /* [count], XXH3-64 of each expert's size bytes */
    const uint8_t *data;        /* expert 0 inside the mapping */
} zse_expert_bank;

typedef struct zse_file zse_file;

/* Maps the file and checks the preamble, the header checksum and every tensor's offset
 * and size against the file length; tensor data is not read. */
zse_file *zse_file_open(const char *path);
void zse_file_close(zse_file *f);
const zse_config *zse_file_config(const zse_file *f);
const json_t *zse_file_header(const zse_file *f);     /* the whole header object */
size_t zse_file_n_tensors(const zse_file *f);
const zse_tensor_info *zse_file_tensor_at(const zse_file *f, size_t i);
const zse_tensor_info *zse_file_tensor(const zse_file *f, const char *name); /* NULL if absent */
/* tokenizer.json as stored (verbatim bytes, not NUL-terminated); checksum checked on call */
const char *zse_file_tokenizer_json(const zse_file *f, size_t *len);
const char *zse_file_chat_template(const zse_file *f);  /* NULL when none */
const json_t *zse_file_tokenizer_config(const zse_file *f); /* may be NULL */
const json_t *zse_file_generation(const zse_file *f);   /* may be NULL */
const char *zse_file_path(const zse_file *f);
uint64_t zse_file_size(const zse_file *f);
const uint8_t *zse_file_base(const zse_file *f);        /* start of the mapping */
/* checks every tensor and expert checksum; on mismatch the error names the tensor */
int zse_file_verify(const zse_file *f, int *n_bad);
unsigned zse_file_major(const zse_file *f);
/* expert banks, in file order; zse_file_experts: the bank of a layer, NULL for a dense one */
size_t zse_file_n_expert_banks(const zse_file *f);
const zse_expert_bank *zse_file_expert_bank_at(const zse_file *f, size_t i);
const zse_expert_bank *zse_file_experts(const zse_file *f, int layer);
/* one part of one expert as a tensor (name "blk.L.ffn_gate_exps.E", data inside the
 * mapping, checksum 0: the expert's range carries it); name must hold 64 bytes */
void zse_expert_tensor(const zse_expert_bank *b, int expert, int part, char *name, zse_tensor_info *out);
/* expert e's bytes match their checksum */
bool zse_expert_verify(const zse_expert_bank *b, int expert);

/* ---- LoRA adapters (lora.c): PEFT directories and .zsa files ------------------------
 * A LoRA adapter adds scale · B·(A·x) to some of a decoder layer's projections (PEFT's
 * LoraLayer: A is [rank][in], B [out][rank]). In memory and in a .zsa file every part is
 * f16: A as PEFT has it, B transposed ([rank][out]), so both are read a rank row at a
 * time. docs/FORMAT.md §LoRA adapters specifies .zsa. */
enum {
    ZSE_LORA_Q = 0, ZSE_LORA_K, ZSE_LORA_V, ZSE_LORA_O,     /* self_attn.{q,k,v,o}_proj */
    ZSE_LORA_GATE, ZSE_LORA_UP, ZSE_LORA_DOWN,              /* mlp.{gate,up,down}_proj */
    ZSE_LORA_MODULES
};
#define ZSE_LORA_MAX_RANK 128
#define ZSE_LORA_MAX_LAYERS 100000  /* the config check's bound on n_layers */

/* "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down" (the base
 * weights' canonical names) and the Hugging Face module names "q_proj" ... "down_proj" */
const char *zse_lora_module_name(int module);
const char *zse_lora_hf_module(int module);
/* the in and out widths of a layer's projection under c; false when layer l has none
 * (the MLP of a mixture-of-experts layer: its experts are not LoRA targets) */
bool zse_lora_base_dims(const zse_config *c, int layer, int module, int64_t *in, int64_t *out);

typedef struct {
    int rank;               /* 0: the adapter leaves this projection alone */
    float scale;            /* lora_alpha / rank, or lora_alpha / sqrt(rank) with use_rslora */
    int64_t in, out;
    const uint16_t *a;      /* f16 [rank][in] */
    const uint16_t *bt;     /* f16 [rank][out]: B transposed */
} zse_lora_part;

typedef struct {
    int n_layers;           /* 1 + the highest adapted layer */
    zse_lora_part *parts;   /* [n_layers][ZSE_LORA_MODULES] */
    uint32_t modules;       /* bit m: some layer adapts module m */
    int max_rank;
    char *path;
    json_t *peft_config;    /* adapter_config.json as read (a .zsa keeps it in its header) */
    uint16_t *owned;        /* a PEFT directory's weights, converted */
    zse_map map;            /* a .zsa file's mapping (the parts point into it) */
    bool zsa;
} zse_lora_file;

/* path: a PEFT directory (adapter_config.json + adapter_model.safetensors) or a .zsa file.
 * Everything PEFT can save that is not a plain LoRA on q/k/v/o/gate/up/down (DoRA, bias,
 * embedding or lm_head adapters, modules_to_save, ...) is refused with an error naming the
 * field or tensor; a .zsa file's checksums are checked. */
int zse_lora_open(zse_lora_file *f, const char *path);
void zse_lora_close(zse_lora_file *f);
/* the adapter fits the base model c: its layers exist, each part's widths are the base
 * projection's, no part on the MLP of a MoE layer; else an error that says what differs */
int zse_lora_check_base(const zse_lora_file *f, const zse_config *c);
/* the largest rank the adapter at path uses, from adapter_config.json or the .zsa header
 * alone (no weights read) */
int zse_lora_probe(const char *path, int *max_rank);
/* writes the adapter as a .zsa file (atomically; OUT replaced only with force) */
int zse_lora_write_zsa(const zse_lora_file *f, const char *out_path, bool force);

/* ---- an output file that appears whole or not at all (outfile.c) ----------------
 * An anonymous file (O_TMPFILE) in OUT's directory, named only when complete, so nothing
 * is left behind even if the process is killed; where the filesystem lacks O_TMPFILE, a
 * named temp file OUT.tmp.PID that every failure path removes. Without force the name is
 * given with link(), which fails rather than replace a file that appeared meanwhile. */
typedef struct {
    int fd;
    char *dir;          /* OUT's directory */
    char *tmp;          /* the named temp file, or NULL while anonymous */
} zse_out_file;

int zse_out_create(zse_out_file *f, const char *out_path);
/* names the written file OUT (replacing it only with force) and fsyncs the directory */
int zse_out_commit(zse_out_file *f, const char *out_path, bool force);
/* closes it; remove_tmp: a failure, the named temp file goes */
void zse_out_close(zse_out_file *f, bool remove_tmp);

/* ---- conversion --------------------------------------------------------------- */
/* What a calibrated conversion (src/calib) changes in the writer's work: a tensor's
 * scheme and group, its bytes, and one more header object. Every callback may be NULL. */
typedef struct {
    void *ctx;
    /* may change q->scheme and q->group_size of tensor `name` (canonical) from the
     * policy's choice; 0, or -1 with an error */
    int (*choose)(void *ctx, const char *name, zse_qshape *q);
    /* fills the packed bytes of tensor `name` (zse_qshape_bytes(q), zeroed): 1 when it
     * did, 0 to let the writer quantize the source as usual, -1 with an error */
    int (*produce)(void *ctx, const char *name, const zse_qshape *q, void *packed);
    /* the header's "calibration" object (a new reference; the same on every call) */
    json_t *(*header)(void *ctx);
} zse_convert_hook;

typedef struct {
    zse_scheme scheme;          /* for 2-D linear weights */
    int group_size;             /* 4-bit schemes */
    int embed_scheme;           /* -1 = policy default */
    int lm_head_scheme;         /* -1 = policy default */
    const char **keep_fp16;     /* glob patterns (canonical or HF names) kept at f16 */
    int n_keep_fp16;
    bool force;                 /* overwrite OUT */
    int threads;                /* 0 = physical cores */
    /* A GGUF source without --quant (quant_given false): each tensor whose type a zse
     * scheme holds exactly keeps it (F32, F16, BF16; Q8_0 → int8g, Q4_0 → int4s, Q4_1 →
     * int4, at group 32), Q4_K becomes int4 g32 and Q5_0/Q5_1/Q5_K/Q6_K int8g g32 */
    bool quant_given;
    /* the vocabulary of a GGUF source as tokenizer.json text (heap) and its
     * tokenizer_config; supplied by the caller because the tokenizer module, which builds
     * it, sits above this one (the CLI passes zse_tokenizer_json_from_gguf) */
    char *(*gguf_tokenizer)(const char *gguf_path, size_t *len, json_t **tokenizer_config);
    const zse_convert_hook *hook; /* NULL: the policy and the plain quantizers */
    const char *chat_template;  /* NULL: the source's; else this template is stored instead
                                 * (zse convert --chat-template FILE) */
} zse_convert_opts;

/* src: a Hugging Face directory or a .gguf file */
int zse_convert(const char *src_dir, const char *out_path, const zse_convert_opts *o);
/* the scheme the policy gives a tensor (canonical and Hugging Face name, rows of its
 * shape) before any hook: docs/FORMAT.md §Quantization policy */
zse_scheme zse_convert_policy(const zse_convert_opts *o, const char *canon, const char *hf, int64_t rows);

#endif
