/* grammar — constrained decoding: JSON Schema, regular expressions, choice lists and
 * composed grammars compiled to one byte-level context-free form, and a matcher per
 * sequence that turns the grammar's state into a packed token bitmask over a model's
 * vocabulary (bit i of word i/32 set: token i may come next).
 *
 * Stages (one file each, docs/GRAMMAR.md has the algorithm):
 *   build.c      the builder: expressions (text, byte classes, sequence, alternation,
 *                repetition, rules); the public composition API
 *   lower.c      expressions lowered into flat rules (continuation passing, factoring)
 *   regex.c      a regex subset → builder expressions
 *   schema.c     JSON Schema → builder expressions (and json_object, any JSON value)
 *   vocab.c      a model's vocabulary: token bytes in a byte trie, EOS ids
 *   pda.c        the pushdown automaton: stacks, closure, advancing by bytes
 *   mask.c       per-position token caches (the vocabulary classified once per position)
 *   matcher.c    the matcher: masks, accept, rollback, forced bytes
 *
 * Ownership and threads:
 *   - a zse_grammar_vocab is immutable once built: share it between grammars and threads.
 *   - a zse_grammar is immutable to its users and reference counted (retain/release, atomic):
 *     share it between matchers and threads, cache it per request shape. It fills its token
 *     caches lazily, thread-safely (first use of a grammar position computes it once).
 *     It holds a reference to nothing: its vocabulary must outlive it.
 *   - a zse_matcher belongs to one sequence and one thread at a time; it retains its grammar.
 * Errors: functions return NULL / -1 and record a message with zse_fail (zse_error_message()):
 * a compile error names the JSON Schema keyword and its JSON path, or the regex construct and
 * its offset; a server answers it with a 400. */
#ifndef ZSE_GRAMMAR_H
#define ZSE_GRAMMAR_H

#include "tokenizer/tokenizer.h"
#include "util/util.h"

#include <jansson.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* ---- vocabulary ----------------------------------------------------------------------- */
typedef struct zse_grammar_vocab zse_grammar_vocab;

/* From a tokenizer: each token's bytes (zse_tokenizer_token_bytes); special tokens never
 * match a grammar, except EOS ids (allowed where the grammar may end) and the special tokens
 * whose text is in allow_special (e.g. a tool-call marker such as "[TOOL_CALLS]", whose text
 * then counts as its bytes). eos: the ids that end a sequence (n_eos ≥ 1). */
zse_grammar_vocab *zse_grammar_vocab_from_tokenizer(const zse_tokenizer *tok, const int32_t *eos, int n_eos,
                                                    const char *const *allow_special, int n_allow);
/* From raw token bytes (tests, tools): bytes[i] / lens[i] for token i; a NULL bytes[i] is a
 * token that never matches. */
zse_grammar_vocab *zse_grammar_vocab_new(int n_vocab, const uint8_t *const *bytes, const uint32_t *lens,
                                         const int32_t *eos, int n_eos);
void zse_grammar_vocab_free(zse_grammar_vocab *v);
int zse_grammar_vocab_size(const zse_grammar_vocab *v);
/* uint32 words of a mask: (n_vocab + 31) / 32 */
int zse_grammar_mask_words(const zse_grammar_vocab *v);

/* ---- builder: composing grammars (used by the compilers below and by src/toolcall) ------ */
typedef struct zse_gb zse_gb;
typedef int32_t zse_gx; /* an expression of one builder; -1 is an error already recorded */

zse_gb *zse_gb_new(void);
void zse_gb_free(zse_gb *b);
/* the exact bytes s[0..n) */
zse_gx zse_gb_text(zse_gb *b, const char *s, size_t n);
/* one byte in [lo, hi] */
zse_gx zse_gb_byte_range(zse_gb *b, uint8_t lo, uint8_t hi);
zse_gx zse_gb_seq(zse_gb *b, const zse_gx *xs, int n);    /* n == 0: the empty string */
zse_gx zse_gb_alt(zse_gb *b, const zse_gx *xs, int n);    /* n ≥ 1 */
/* x repeated min..max times; max < 0: unbounded. x must not match the empty string. */
zse_gx zse_gb_repeat(zse_gb *b, zse_gx x, int min, int max);
/* a named rule, defined later with zse_gb_define (for recursion) */
zse_gx zse_gb_rule(zse_gb *b);
int zse_gb_define(zse_gb *b, zse_gx rule, zse_gx body);
/* any text (valid UTF-8) that does not contain `marker` (for free text before a trigger) */
zse_gx zse_gb_text_without(zse_gb *b, const char *marker);
/* a regular expression (docs/GRAMMAR.md: the subset), matching its whole input */
zse_gx zse_gb_regex(zse_gb *b, const char *pattern, size_t len);
/* a JSON value valid against `schema` (a JSON Schema object or boolean) */
enum { ZSE_SCHEMA_STRICT = 1 }; /* OpenAI strict: every object closed, every property required */
zse_gx zse_gb_json_schema(zse_gb *b, const json_t *schema, unsigned flags);
/* any JSON object / any JSON value */
zse_gx zse_gb_json_object(zse_gb *b);
zse_gx zse_gb_json_value(zse_gb *b);

/* ---- compiled grammars ----------------------------------------------------------------- */
typedef struct zse_grammar zse_grammar;

/* root: the expression the whole output must match. The builder may be freed after. */
zse_grammar *zse_grammar_compile(zse_gb *b, zse_gx root, const zse_grammar_vocab *v);
/* shortcuts: a JSON Schema text, any JSON object, a regex, one of n strings */
zse_grammar *zse_grammar_json_schema(const zse_grammar_vocab *v, const char *schema, size_t len, unsigned flags);
zse_grammar *zse_grammar_json_object(const zse_grammar_vocab *v);
zse_grammar *zse_grammar_regex(const zse_grammar_vocab *v, const char *pattern, size_t len);
zse_grammar *zse_grammar_choice(const zse_grammar_vocab *v, const char *const *choices, int n);
/* fills every position's token cache now (what a first mask at each position would do), so
 * decode steps never pay for it: for a grammar compiled once and used many times. 0 / -1 */
int zse_grammar_precompute(zse_grammar *g);
zse_grammar *zse_grammar_retain(zse_grammar *g);
void zse_grammar_release(zse_grammar *g); /* frees at the last release; NULL is a no-op */
const zse_grammar_vocab *zse_grammar_vocab_of(const zse_grammar *g);

/* ---- matcher: one per sequence ------------------------------------------------------- */
typedef struct zse_matcher zse_matcher;

/* max_rollback: how many accepted steps rollback can undo (0 for none) */
zse_matcher *zse_matcher_new(zse_grammar *g, int max_rollback);
void zse_matcher_free(zse_matcher *m);
/* mask[(n_vocab+31)/32]: bit t set iff token t may come next (EOS ids where the grammar may
 * end; only EOS when nothing else can follow; nothing once ended). Returns the count of
 * allowed tokens, -1 on error. */
int zse_matcher_fill_mask(zse_matcher *m, uint32_t *mask);
/* 0: accepted; 1: not allowed here (state unchanged); -1: error */
int zse_matcher_accept_token(zse_matcher *m, int32_t id);
/* bytes forced or given from outside (one rollback step); 1 when they do not match */
int zse_matcher_accept_bytes(zse_matcher *m, const void *bytes, size_t n);
/* undo the last k accepted steps (tokens, byte strings, EOS); -1 when fewer are kept */
int zse_matcher_rollback(zse_matcher *m, int k);
void zse_matcher_reset(zse_matcher *m);
bool zse_matcher_can_end(const zse_matcher *m);  /* EOS allowed now */
bool zse_matcher_must_end(const zse_matcher *m); /* only EOS can follow */
bool zse_matcher_ended(const zse_matcher *m);    /* EOS accepted */
/* jump-forward: appends the bytes every continuation must start with (at most max) */
int zse_matcher_forced_bytes(zse_matcher *m, zse_buf *out, size_t max);

/* ======================================================================================
 * Internal to src/grammar (the stage files share these; callers use the API above).
 * ====================================================================================== */

/* flat grammar: rules → alternatives → elements ending in GE_END */
enum { GE_CLASS = 0, GE_RULE = 1, GE_END = 2 };
typedef struct {
    uint32_t kind : 2;
    uint32_t arg : 30; /* class index (GE_CLASS), rule index (GE_RULE) */
} gr_elem;

typedef struct {
    uint64_t bits[4];
} gr_class; /* 256-bit byte set */

static inline bool gr_class_has(const gr_class *c, uint8_t byte)
{
    return (c->bits[byte >> 6] >> (byte & 63)) & 1;
}

typedef struct {
    uint32_t first_alt, n_alts;
} gr_rule;

/* what one grammar position knows about every token, whatever lies below its frame */
typedef struct {
    uint32_t *accepted_bits;  /* a full mask, or NULL when accepted_ids is used */
    int32_t *accepted_ids;    /* sorted */
    uint32_t n_accepted;
    int32_t *uncertain_ids;   /* tokens that leave the frame: checked against the real stack */
    uint16_t *uncertain_from; /* the byte offset where each left the frame (0: check it whole) */
    uint16_t *uncertain_lcp;  /* bytes its rest shares with the previous one's (sorted by rest) */
    uint32_t n_uncertain;
    uint32_t n_whole;         /* the first n_whole have from 0 */
} gr_pos_cache;

struct zse_grammar {
    atomic_int refs;
    const zse_grammar_vocab *vocab;
    gr_elem *elems;
    uint32_t n_elems;
    uint32_t *alt_start; /* element index of each alternative's first element */
    uint32_t n_alt;
    gr_rule *rules;
    uint32_t n_rules;
    gr_class *classes;
    uint32_t n_classes;
    uint32_t root; /* rule index */
    _Atomic(gr_pos_cache *) *caches; /* one per element, filled on first use */
};

/* vocabulary trie: nodes in depth-first preorder */
typedef struct {
    uint8_t byte;
    uint16_t depth;    /* 1 for the first byte */
    uint32_t end;      /* the first node after this one's subtree */
    int32_t token;     /* a token ending here, or -1; more in dup_next */
} gr_trie_node;

struct zse_grammar_vocab {
    int n_vocab;
    uint8_t **bytes; /* NULL: never matches */
    uint32_t *lens;
    bool *is_eos;
    int32_t *eos;
    int n_eos;
    gr_trie_node *trie;
    uint32_t n_trie;
    int32_t *dup_next; /* next token with the same bytes, or -1 */
};

/* builder internals shared by build.c, lower.c, regex.c, schema.c */
enum { X_EMPTY, X_CLASS, X_SEQ, X_ALT, X_REPEAT, X_RULE };

typedef struct {
    uint8_t kind;
    int32_t a;          /* class (X_CLASS), child (X_REPEAT), builder rule (X_RULE) */
    int32_t min, max;   /* X_REPEAT */
    uint32_t kid0, nkid; /* X_SEQ, X_ALT: kids[kid0 .. kid0+nkid) */
} gb_expr;

struct zse_gb {
    gb_expr *x;
    uint32_t nx, capx;
    zse_gx *kids;
    uint32_t nkids, capkids;
    gr_class *classes;
    uint32_t nclasses, capclasses;
    zse_gx *rule_body; /* builder rules: their body expression, -1 until defined */
    uint32_t nrules, caprules;
};

/* grows *p (elements of `elem` bytes) to hold `need`, doubling; -1 when out of memory */
int gr_grow(void **p, uint32_t *cap, uint32_t need, size_t elem);

zse_gx gb_class(zse_gb *b, const gr_class *c);
zse_gx gb_empty(zse_gb *b);
zse_gx gb_seq2(zse_gb *b, zse_gx x, zse_gx y);
zse_gx gb_seq3(zse_gb *b, zse_gx x, zse_gx y, zse_gx z);
zse_gx gb_alt2(zse_gb *b, zse_gx x, zse_gx y);
zse_gx gb_opt(zse_gb *b, zse_gx x);
zse_gx gb_cstr(zse_gb *b, const char *s);
/* one Unicode code point in [lo, hi] as UTF-8 (surrogates excluded) */
zse_gx gb_codepoints(zse_gb *b, uint32_t lo, uint32_t hi);
bool gb_nullable(zse_gb *b, zse_gx x);
/* code point ranges (sorted, disjoint) as UTF-8; json: as JSON string content (escaped) */
typedef struct {
    uint32_t lo, hi;
} gr_range;
zse_gx gb_ranges(zse_gb *b, const gr_range *r, int n, bool json);
/* the regex compiler; json: a schema's pattern (searched, written as JSON string content) */
zse_gx gb_regex_mode(zse_gb *b, const char *pattern, size_t len, bool json);

/* pda.c: stack nodes and the byte step (see docs/GRAMMAR.md) */
#define GR_NIL 0x7fffffffu    /* below the root: reaching it means the grammar is complete */
#define GR_BOTTOM 0x7ffffffeu /* below a cached position's frame */
#define GR_SCRATCH 0x80000000u
typedef struct {
    uint32_t elem, parent;
} gr_node;

typedef struct {
    /* persistent nodes (interned; they live until the matcher is reset or freed) */
    gr_node *nodes;
    uint32_t n_nodes, cap_nodes;
    uint32_t *hash; /* open addressing over (elem, parent), 0 = empty, else id + 1 */
    uint32_t hash_cap, hash_used;
    /* scratch nodes for speculation: ids GR_SCRATCH | i, dropped by truncation */
    gr_node *scratch;
    uint32_t n_scratch, cap_scratch;
    /* what one step made or saw (scratch nodes, tops in the output set, rule expansions),
     * hashed; entries of older steps are told apart by a generation stamp */
    uint64_t *step_key;
    uint32_t *step_val, *step_gen;
    uint32_t step_cap, step_used, gen;
} gr_store;

/* a set of stacks: tops at GE_CLASS elements, plus flags */
typedef struct {
    uint32_t *tops;
    uint32_t n, cap;
    bool accept;  /* the grammar may end here */
    bool escaped; /* a stack left a cached position's frame (cache computation only) */
} gr_set;

int gr_store_init(gr_store *s);
void gr_store_free(gr_store *s);
void gr_store_clear(gr_store *s);
static inline const gr_node *gr_node_at(const gr_store *s, uint32_t id)
{
    return id & GR_SCRATCH ? &s->scratch[id & ~GR_SCRATCH] : &s->nodes[id];
}
int gr_set_push(gr_set *set, uint32_t id);
void gr_set_free(gr_set *set);
/* the closure of continuing at element `elem` with `parent` below, into out */
int gr_close(const zse_grammar *g, gr_store *s, uint32_t elem, uint32_t parent, gr_set *out);
/* out = the stacks of in after one byte (out cleared first) */
int gr_advance(const zse_grammar *g, gr_store *s, const gr_set *in, uint8_t byte, gr_set *out);
/* the stacks after popping the frame of node id: continuing at its parent */
int gr_pop(const zse_grammar *g, gr_store *s, uint32_t id, gr_set *out);
/* scratch node id → persistent (interned) id; -1 on failure */
int64_t gr_persist(gr_store *s, uint32_t id);

/* mask.c */
const gr_pos_cache *gr_cache_get(const zse_grammar *g, uint32_t elem);
void gr_cache_free(gr_pos_cache *c);

#endif
