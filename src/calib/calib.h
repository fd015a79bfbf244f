/* calib — calibrated conversion: `zse convert --calibrate FILE [--target-bpw B]`
 * (docs/QUANT.md is the method, docs/ARCHITECTURE.md where it sits).
 *
 * The source is first converted to a float .zse and run on the CPU over the calibration
 * text with the model's own forward pass; taps collect the Hessian of every linear
 * weight's input. Per layer, AWQ scales are searched and folded into the RMSNorm (or the
 * projection) before, and GPTQ quantizes the scaled weights into zse's int4 / int4s / nf4
 * group layouts. With a target, each tensor's sensitivity (the KL divergence of the
 * model's next-token distributions when that tensor alone is quantized) drives a
 * mixed-precision plan — 4-bit at smaller groups, int8 or f16 for the most sensitive —
 * within the bit budget. The file written has the same layouts the kernels already read,
 * and the plan in its header ("calibration"). */
#ifndef ZSE_CALIB_H
#define ZSE_CALIB_H

#include "format/format.h"

#include <stdbool.h>

typedef struct {
    const char *text_path;      /* the calibration text (required) */
    double target_bpw;          /* > 0: bits per weight over the planned tensors */
    int ctx;                    /* tokens per calibration window; 0 = 512 (the model's maximum if smaller) */
    int max_tokens;             /* calibration tokens used at most; 0 = 16384 */
    bool no_awq;                /* skip the AWQ scale search (GPTQ alone) */
    bool no_gptq;               /* round to nearest after the AWQ scales (AWQ alone) */
    bool quiet;                 /* no progress lines on stderr */
    /* tests: store the calibrated tensors in f32 with the AWQ scales folded in, instead of
     * quantizing them — the file must compute what the float model does */
    bool write_float;
} zse_calib_opts;

/* zse_convert(src_dir, out_path, o), calibrated: o->scheme must be a 4-bit scheme (int4,
 * int4s, nf4); o->group_size is the recipe's group (the plan may choose smaller ones). */
int zse_convert_calibrated(const char *src_dir, const char *out_path, const zse_convert_opts *o,
                           const zse_calib_opts *c);

#endif
