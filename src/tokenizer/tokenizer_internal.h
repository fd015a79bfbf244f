/* tokenizer_internal.h — what the stages of the tokenizer share: the loaded pipeline
 * (struct zse_tokenizer), the per-call scratch of an encode, and the helpers each stage
 * uses from another. Private to src/tokenizer (the public API is tokenizer.h).
 *
 *   load.c       tokenizer.json → struct zse_tokenizer: vocabulary maps, merges, added
 *                tokens, the normalizer/pre-tokenizer/decoder/post-processor steps; free
 *                and the accessors
 *   normalize.c  UTF-8 helpers, normalizers and pre-tokenizers
 *   encode.c     the BPE model and encode (added tokens, spans, the per-call cache)
 *   decode.c     decoders, decode, one token's bytes, the streaming detokenizer
 *   open.c       opening a tokenizer from an HF directory, a .zse or a .gguf path
 *   gguf_vocab.c GGUF vocabularies turned into tokenizer.json
 *
 * A loaded tokenizer is never written again: every encode/decode keeps its scratch space
 * (regex match data, BPE heaps) in its own enc_state, so any number of threads may share one. */
#ifndef ZSE_TOKENIZER_INTERNAL_H
#define ZSE_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/tokenizer.h"

#include <pcre2.h>
#include <pthread.h>
#include <string.h>
#include <utf8proc.h>

#define REPLACEMENT_CHAR "\xEF\xBF\xBD" /* U+FFFD */
#define MAX_SPECIAL_AROUND 8           /* post-processor tokens before or after a sequence */

/* ---- hash maps ------------------------------------------------------------------ */

/* string → id; keys are borrowed from the vocabulary array */
typedef struct {
    const char **keys;
    uint32_t *lens;
    int32_t *vals;
    size_t cap; /* power of two */
} str_map;
/* (left id, right id) → (rank, merged id) */
typedef struct {
    uint64_t *keys; /* (left << 32 | right) + 1; 0 = empty */
    int32_t *rank;
    int32_t *merged;
    size_t cap;
} pair_map;

/* a set of code point pairs (a, b): which characters ever sit side by side inside a
 * vocabulary token. Where two neighbours of a word never do, no merge can join them, so
 * the word may be cut there and each part merged alone with the same result. */
typedef struct {
    uint64_t *keys;
    size_t cap, n;
} cp_pair_set;
/* ---- pipeline description -------------------------------------------------------- */

enum norm_kind {
    N_NFC, N_NFKC, N_NFD, N_NFKD, N_LOWER, N_PREPEND, N_REPLACE, N_STRIP,
    N_STRIP_ACCENTS, N_NMT, N_BERT, N_PRECOMPILED
};

/* SentencePiece's precompiled_charsmap: a Darts double-array trie from source strings to
 * offsets into a blob of NUL-terminated replacements */
typedef struct {
    unsigned char *data;   /* the decoded charsmap (owned) */
    const unsigned char *units; /* the trie's 32-bit units (little-endian), inside data */
    size_t n_units;
    const char *normalized;
    size_t normalized_len;
} charsmap;

typedef struct {
    enum norm_kind kind;
    char *a, *b;           /* Prepend: a; Replace: a = literal pattern (or re), b = content */
    pcre2_code *re;        /* Replace with a Regex pattern */
    bool left, right;      /* Strip */
    bool clean_text, chinese_chars, strip_accents, lowercase; /* BertNormalizer */
    charsmap map;          /* Precompiled */
} norm_step;

enum pre_kind { P_SPLIT, P_BYTELEVEL, P_METASPACE };
enum split_behavior { B_ISOLATED, B_REMOVED, B_MERGED_PREV, B_MERGED_NEXT, B_CONTIGUOUS };
typedef struct {
    enum pre_kind kind;
    pcre2_code *re;           /* Split/ByteLevel: the pattern; Metaspace: the replacement */
    enum split_behavior behavior;
    bool invert;              /* Split: the pieces between matches are the "matches" */
    bool add_prefix_space;    /* ByteLevel */
    bool use_regex;           /* ByteLevel */
    char *replacement;        /* Metaspace */
    int prepend_scheme;       /* Metaspace: 0 always, 1 first, 2 never */
    bool split;               /* Metaspace */
} pre_step;

enum dec_kind { D_BYTELEVEL, D_REPLACE, D_BYTEFALLBACK, D_FUSE, D_STRIP, D_METASPACE, D_WORDPIECE, D_CTC };
typedef struct {
    enum dec_kind kind;
    char *a, *b;              /* Replace: a → b (or re → b); Strip: a = content; Metaspace: a;
                               * WordPiece: a = prefix; CTC: a = pad token, b = word delimiter */
    pcre2_code *re;
    int start, stop;          /* Strip */
    int prepend_scheme;       /* Metaspace */
    bool cleanup;             /* WordPiece, CTC */
} dec_step;

/* the byte trie of a Unigram model's pieces: prefix search from each position */
typedef struct {
    int32_t child, sibling; /* first child, next sibling; -1 when none */
    int32_t id;             /* the piece ending here, -1 when none */
    uint8_t byte;
} trie_node;

typedef struct {
    trie_node *v;
    size_t n, cap;
    int32_t root[256];      /* the node of each first byte, -1 when none */
} piece_trie;

enum model_kind { MODEL_BPE, MODEL_UNIGRAM, MODEL_WORDPIECE };

typedef struct {
    char *content;            /* as written */
    size_t len;
    char *norm;               /* content after the normalizer (normalized tokens match this) */
    size_t norm_len;
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} added_token;

struct zse_tokenizer {
    enum model_kind model;
    char **vocab;             /* id → the model's string ("" for holes) */
    const char **text;        /* id → the token's text: an added token's, else vocab[id] */
    int n_vocab;
    str_map ids;              /* string → id (model vocabulary and added tokens) */
    pair_map merges;
    cp_pair_set joined;       /* code point neighbours inside tokens: safe cut points */
    bool byte_level;          /* a ByteLevel pre-tokenizer maps bytes before BPE */
    bool ignore_merges, byte_fallback, fuse_unk;
    char *subword_prefix;     /* continuing_subword_prefix, NULL when none */
    char *word_suffix;        /* end_of_word_suffix, NULL when none */
    int32_t unk_id;
    double *scores;           /* Unigram: [n_vocab] log probabilities */
    double min_score;         /* Unigram: the lowest score (unknown characters score 10 less) */
    piece_trie trie;          /* Unigram: the pieces */
    int max_input_chars;      /* WordPiece: longer words are one unk */
    size_t max_piece_len;     /* WordPiece: the longest vocabulary string, in bytes */
    int32_t byte_ids[256];    /* <0xNN> tokens for byte fallback, -1 when absent */
    int32_t byte_sym[256];    /* byte-level: the id of each byte's mapped character, -1 when absent */
    norm_step *norms;
    int n_norms;
    pre_step *pres;
    int n_pres;
    dec_step *decs;
    int n_decs;
    added_token *added;
    int n_added;
    uint8_t added_first[256]; /* bit 1: a raw-matched added token starts with this byte; bit 2: normalized */
    bool *is_special;         /* [n_vocab] */
    bool *skippable;          /* [n_vocab]: dropped by skip_special (see prepare_added) */
    int32_t prefix_ids[MAX_SPECIAL_AROUND], suffix_ids[MAX_SPECIAL_AROUND];
    int n_prefix, n_suffix;
    int32_t bos, eos;
    const char *type;
};

/* ---- per-call scratch --------------------------------------------------------------- */

typedef struct {
    size_t start, end;
} span;

typedef struct {
    span *v;
    size_t n, cap;
} spans;

typedef struct {
    int32_t *v;
    size_t n, cap;
} id_vec;

typedef struct {
    int32_t id;
    int32_t cp;     /* the character an initial symbol stands for; -1 for byte/unk symbols */
    int prev, next;
} sym;

typedef struct {
    int32_t rank;
    int pos;
    int32_t left, right;
} cand;

typedef struct {
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit;
    zse_buf text;       /* the piece being pre-tokenized (rewritten by ByteLevel/Metaspace) */
    zse_buf spare;      /* rewrites build here, then swap with text */
    zse_buf mapped;     /* a byte-level piece in GPT-2's alphabet (for ignore_merges) */
    spans cur, next;
    span *marks;        /* split intervals of one span */
    bool *is_match;
    size_t marks_cap;
    sym *sy;
    cand *heap;
    size_t sym_cap;
    id_vec out;
    double *ug_score;   /* Unigram's best path to each byte position of a piece */
    int32_t *ug_from, *ug_id;
    size_t ug_cap;
    zse_buf piece;      /* WordPiece: the candidate with its prefix */
    /* short pieces already encoded in this call (texts repeat their words): the cache
     * belongs to the call, so threads share nothing */
    struct cache_slot { uint64_t hash; uint32_t text_at, text_len, ids_at, ids_len; } *cache;
    size_t cache_used, pieces;
    zse_buf cache_text;
    id_vec cache_ids;
} enc_state;

/* ---- shared between the stages ------------------------------------------------------ */

/* encode.c */
int tok_grow_jit_stack(enc_state *st);
int tok_ids_push(id_vec *v, int32_t id);
int tok_spans_push(spans *s, size_t a, size_t b);

/* load.c */
bool tok_cp_pairs_has(const cp_pair_set *s, int32_t a, int32_t b);
extern int tok_byte_of_cp[512];
extern uint32_t tok_cp_of_byte[256];
bool tok_pair_get(const pair_map *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged);
int32_t tok_str_map_get(const str_map *m, const char *s, size_t n);

/* normalize.c */
int32_t tok_cp_at(const char *s, size_t n, size_t i, size_t *len);
int32_t tok_cp_before(const char *s, size_t i, size_t *len);
bool tok_is_white_space(int32_t c);
bool tok_is_word_char(int32_t c);
int tok_normalize(const zse_tokenizer *t, zse_buf *s);
int tok_pre_tokenize(const zse_tokenizer *t, enc_state *st, const char *text, size_t n, bool first);
int tok_replace_all(const char *s, size_t n, const char *from, const char *to, zse_buf *out);
int tok_replace_regex(const pcre2_code *re, const char *s, size_t n, const char *to, zse_buf *out);
size_t tok_utf8_char_len(unsigned char c);
int tok_utf8_lossy(const char *in, size_t n, zse_buf *out);
bool tok_utf8_valid(const char *s, size_t n);


/* precompiled.c */
int tok_charsmap_load(charsmap *m, const char *b64, size_t b64_len);
int tok_precompiled_normalize(const charsmap *m, const char *s, size_t n, zse_buf *out);

/* unigram.c */
int tok_unigram_count(const json_t *model, int *n_vocab);
int tok_unigram_load(zse_tokenizer *t, const json_t *model);
int tok_unigram_word(const zse_tokenizer *t, enc_state *st, const char *w, size_t n);
void tok_trie_free(piece_trie *tr);

/* wordpiece.c */
int tok_wordpiece_load(zse_tokenizer *t, const json_t *model);
int tok_wordpiece_word(const zse_tokenizer *t, enc_state *st, const char *w, size_t n);

#endif
