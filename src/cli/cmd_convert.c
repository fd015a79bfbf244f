/* zse convert SRC -o OUT.zse — Hugging Face directory or GGUF file to one .zse file. */
#include "cli/cli.h"

#include "calib/calib.h"
#include "format/format.h"
#include "template/template.h"
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char cmd_convert_summary[] = "convert a Hugging Face model directory or a GGUF file into a .zse file";

static void usage(FILE *out)
{
    fprintf(out,
            "usage: zse convert SRC -o OUT.zse [options]\n\n"
            "SRC is a Hugging Face model directory or a .gguf file (llama, mistral, qwen2).\n\n"
            "  -o, --output FILE       the .zse file to write\n"
            "  --quant SCHEME          f32, f16, bf16, int8, int8g, int4, int4s or nf4 (default\n"
            "                          int4; a GGUF without --quant keeps F32/F16/BF16/Q8_0/\n"
            "                          Q4_0/Q4_1 exactly and re-quantizes other types: Q4_K to\n"
            "                          int4, the rest to int8g, at group 32)\n"
            "  --group-size N          group size of int4, int4s, nf4, int8g: 32, 64 or 128\n"
            "                          (default 128)\n"
            "  --keep-fp16 PATTERN     keep matching tensors at f16 (glob on zse or HF names;\n"
            "                          repeatable)\n"
            "  --embed-quant SCHEME    embedding table scheme (default: int8 for integer\n"
            "                          recipes, else the recipe's)\n"
            "  --lm-head-quant SCHEME  lm_head scheme (default: the recipe's)\n"
            "  --threads N             quantization threads (default: physical cores)\n"
            "  --force                 overwrite OUT if it exists\n"
            "  --chat-template FILE    store this Jinja chat template instead of the source's\n\n"
            "calibrated 4-bit (docs/QUANT.md; runs the model on the CPU over the text; a Hugging\n"
            "Face directory of a dense model: GGUF files and mixture-of-experts models are refused):\n"
            "  --calibrate FILE        AWQ scales and GPTQ from the activations on FILE (a text\n"
            "                          like what the model will see, not the evaluation text)\n"
            "  --target-bpw B          keep the most sensitive tensors at smaller groups, int8 or\n"
            "                          f16 within B bits per weight over the 4-bit tensors (e.g. 4.5)\n"
            "  --calib-tokens N        calibration tokens used at most (default 16384)\n"
            "  --calib-method M        awq+gptq (default), gptq or awq\n");
}

static bool parse_scheme(cli_args *a, int *out)
{
    const char *v = cli_value(a);
    zse_scheme s;
    if (!v)
        return false;
    if (zse_scheme_from_name(v, &s) != 0) {
        fprintf(stderr, "zse convert: %s\n", zse_error_message());
        a->failed = true;
        return false;
    }
    *out = (int)s;
    return true;
}

/* --chat-template FILE: its text, which must be valid UTF-8 and render a conversation
 * (a broken template is refused before a file is written) */
static char *read_chat_template(const char *path)
{
    size_t n = 0;
    char *tpl = zse_read_file(path, &n);
    if (!tpl) {
        fprintf(stderr, "zse convert: --chat-template: %s\n", zse_error_message());
        return NULL;
    }
    json_t *msgs = json_pack("[{s:s, s:s}]", "role", "user", "content", "hi");
    json_t *text = json_stringn(tpl, n); /* NULL: not UTF-8, or a NUL inside */
    zse_buf out = {0};
    int rc = msgs && text ? zse_chat_template_apply(tpl, msgs, NULL, true, NULL, NULL, NULL, &out) : -1;
    if (!text)
        fprintf(stderr, "zse convert: --chat-template %s is not UTF-8 text\n", path);
    else if (rc != 0)
        fprintf(stderr, "zse convert: --chat-template %s does not render: %s\n", path, zse_error_message());
    json_decref(msgs);
    json_decref(text);
    zse_buf_free(&out);
    if (rc != 0) {
        free(tpl);
        return NULL;
    }
    return tpl;
}

int cmd_convert(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *src = NULL, *out = NULL, *tpl_path = NULL;
    const char *keep[64];
    zse_convert_opts o = {.scheme = ZSE_SCHEME_Q4, .group_size = 128, .embed_scheme = -1,
                          .lm_head_scheme = -1, .keep_fp16 = keep,
                          .gguf_tokenizer = zse_tokenizer_json_from_gguf};
    zse_calib_opts co = {0};
    bool target_given = false, tokens_given = false, method_given = false;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        int64_t v;
        int s;
        if (cli_is(&a, NULL, "--calibrate")) {
            co.text_path = cli_value(&a);
        } else if (cli_is(&a, NULL, "--target-bpw")) {
            target_given = cli_float(&a, 2, 16, &co.target_bpw) || target_given;
        } else if (cli_is(&a, NULL, "--calib-tokens")) {
            if (cli_int(&a, 64, 1 << 24, &v)) {
                co.max_tokens = (int)v;
                tokens_given = true;
            }
        } else if (cli_is(&a, NULL, "--calib-method")) {
            const char *m = cli_value(&a);
            method_given = m != NULL;
            if (m && strcmp(m, "gptq") == 0) {
                co.no_awq = true;
            } else if (m && strcmp(m, "awq") == 0) {
                co.no_gptq = true;
            } else if (m && strcmp(m, "awq+gptq") != 0) {
                fprintf(stderr, "zse convert: --calib-method must be awq+gptq, gptq or awq (not '%s')\n", m);
                return 2;
            }
        } else if (cli_is(&a, "-o", "--output")) {
            out = cli_value(&a);
        } else if (cli_is(&a, NULL, "--quant")) {
            if (parse_scheme(&a, &s)) {
                o.scheme = (zse_scheme)s;
                o.quant_given = true;
            }
        } else if (cli_is(&a, NULL, "--group-size")) {
            if (cli_int(&a, 32, 128, &v)) {
                if (v != 32 && v != 64 && v != 128) {
                    fprintf(stderr, "zse convert: --group-size must be 32, 64 or 128\n");
                    return 2;
                }
                o.group_size = (int)v;
            }
        } else if (cli_is(&a, NULL, "--keep-fp16")) {
            const char *p = cli_value(&a);
            if (p && o.n_keep_fp16 == (int)(sizeof keep / sizeof keep[0])) {
                fprintf(stderr, "zse convert: at most %zu --keep-fp16 patterns\n",
                        sizeof keep / sizeof keep[0]);
                return 2;
            }
            if (p)
                keep[o.n_keep_fp16++] = p;
        } else if (cli_is(&a, NULL, "--embed-quant")) {
            if (parse_scheme(&a, &s))
                o.embed_scheme = s;
        } else if (cli_is(&a, NULL, "--lm-head-quant")) {
            if (parse_scheme(&a, &s))
                o.lm_head_scheme = s;
        } else if (cli_is(&a, NULL, "--threads")) {
            if (cli_int(&a, 1, 1024, &v))
                o.threads = (int)v;
        } else if (cli_is(&a, NULL, "--force")) {
            o.force = true;
        } else if (cli_is(&a, NULL, "--chat-template")) {
            tpl_path = cli_value(&a);
        } else if (cli_positional(&a) && !src) {
            src = a.arg;
        } else {
            return cli_unknown(&a);
        }
    }
    if (a.failed)
        return 2;
    if (!src || !out) {
        usage(stderr);
        return 2;
    }
    if (!co.text_path && (target_given || tokens_given || method_given)) {
        fprintf(stderr, "zse convert: --target-bpw, --calib-tokens and --calib-method need --calibrate FILE\n");
        return 2;
    }
    char *tpl = NULL;
    if (tpl_path && !(tpl = read_chat_template(tpl_path)))
        return 2;
    o.chat_template = tpl;
    double t0 = zse_now();
    int crc = co.text_path ? zse_convert_calibrated(src, out, &o, &co) : zse_convert(src, out, &o);
    free(tpl);
    if (crc != 0)
        return cli_error("convert");
    zse_file *f = zse_file_open(out);
    if (!f)
        return cli_error("convert");
    double secs = zse_now() - t0;
    const char *recipe = json_string_value(json_object_get(json_object_get(zse_file_header(f), "quant"), "scheme"));
    fprintf(stderr, "wrote %s: %.1f MB, %zu tensors, %s, in %.1f s\n", out, (double)zse_file_size(f) / 1e6,
            zse_file_n_tensors(f), recipe ? recipe : zse_scheme_name(o.scheme), secs);
    zse_file_close(f);
    return 0;
}
