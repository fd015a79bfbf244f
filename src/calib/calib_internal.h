/* calib/calib_internal.h — what the stages of a calibrated conversion share:
 *
 *   calib.c        the pipeline: float reference, model, tokens, tensors, the final write
 *   collect.c      Hessians from the taps, per layer: AWQ scales and the quantized candidates
 *   sensitivity.c  KL divergence of each tensor alone, and the plan within the bit budget
 *   write.c        the convert hook: schemes, bytes (scales folded), the header's plan */
#ifndef ZSE_CALIB_INTERNAL_H
#define ZSE_CALIB_INTERNAL_H

#include "calib/calib.h"
#include "engine/engine.h"
#include "model/model.h"
#include "quant/quant.h"

/* The inputs of linear weights: four per layer, then the lm_head's. Index layer * 4 + kind,
 * n_layers * 4 for the lm_head's. */
enum { IN_ATTN = 0, IN_ATTN_OUT = 1, IN_FFN = 2, IN_DOWN = 3, IN_PER_LAYER = 4 };

typedef struct {
    int64_t n;              /* channels */
    float *H;               /* n x n, while its layer is being processed */
    uint64_t tokens;        /* rows accumulated */
    float *s;               /* AWQ scales (n), or NULL: not scaled */
    double alpha;           /* the AWQ exponent chosen (0 when not scaled) */
    bool foldable;          /* something before it can absorb 1/s exactly */
} calib_input;

#define CALIB_MAX_OPTS 6

/* one way to store a calibrated tensor */
typedef struct {
    zse_scheme scheme;
    int group_size;
    uint64_t bytes;
    double error;           /* output error on the calibration activations (zse_weighted_error) */
    double cost;            /* the estimated KL divergence it adds (sensitivity.c) */
    int64_t stored;         /* offset of its packed bytes in the candidate store; -1: made when written */
} calib_option;

typedef struct {
    char name[64];          /* canonical */
    char source[128];       /* the Hugging Face name (for --keep-fp16 globs) */
    int64_t rows, cols;
    int input;              /* the input it multiplies (its columns take that input's scales) */
    int row_input;          /* the input its rows feed whose scales divide them (v, up), or -1 */
    zse_scheme policy;      /* what zse convert's policy gives it */
    bool calibrated;        /* the policy gives it the recipe's 4-bit scheme: quantized here */
    calib_option opt[CALIB_MAX_OPTS];
    int n_opts;             /* opt[0] is the recipe's scheme and group */
    int chosen;
    double kl;              /* sensitivity: mean KL when it alone is quantized as opt[0] */
    double error_rtn;       /* the output error of the recipe by plain round to nearest */
} calib_tensor;

typedef struct {
    zse_calib_opts opts;
    zse_convert_opts conv;  /* the caller's recipe */
    zse_model *model;       /* the float reference, on the CPU */
    const zse_file *file;
    const zse_config *c;
    zse_pool *pool;
    int32_t *ids;           /* calibration tokens */
    size_t n_ids;
    int ctx;                /* tokens per window */
    size_t sens_tokens;     /* tokens of the sensitivity windows (0: no plan) */
    calib_input *in;
    int n_in;
    calib_tensor *t;
    int n_t;
    int store_fd;           /* the candidates: an anonymous file beside OUT */
    uint64_t store_size;
    char text_sha[65];
    const char *text_name;
    double seconds;
} calib;

/* calib.c */
const zse_tensor_info *calib_tensor_info(const calib *k, const char *name);
/* the f32 rows of a tensor of the float reference (rows x cols) */
int calib_read_f32(const calib *k, const char *name, float *out, int64_t rows, int64_t cols);
/* the windows of the first `tokens` calibration tokens: start of window w and its length */
size_t calib_windows(const calib *k, size_t tokens);
void calib_window(const calib *k, size_t w, const int32_t **ids, size_t *n);
void calib_progress(const calib *k, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* collect.c: every calibrated tensor gets its options and candidates */
int calib_collect(calib *k);
/* the weight as the file will hold it before quantization: columns times its input's
 * scales, rows divided by its row input's (rows x cols f32) */
int calib_transformed(const calib *k, const calib_tensor *t, float *out);
/* the candidate of option o, dequantized back into the float model's terms (the scales
 * undone): what the model computes with when that option is stored */
int calib_effective(const calib *k, const calib_tensor *t, int o, float *out);
/* the packed bytes of a stored option */
int calib_store_read(const calib *k, const calib_option *o, void *packed);

/* sensitivity.c: kl of every calibrated tensor, the costs of its options and the plan */
int calib_plan(calib *k);
/* bits per weight over the calibrated tensors with their chosen options */
double calib_bpw(const calib *k);

/* write.c */
void calib_hook(calib *k, zse_convert_hook *h);

#endif
