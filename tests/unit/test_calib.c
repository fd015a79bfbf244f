/* The calibrated conversion end to end (src/calib) on small fixtures:
 *  - folding the AWQ scales leaves the float model's outputs unchanged (the file written with
 *    f32 weights and scales folded into the norms and the v / up rows computes what the plain
 *    f32 conversion does), and the scales were really there;
 *  - a calibrated int4 file's plan and header: within --target-bpw, every tensor as the header says;
 *  - the model's hooks: taps and swaps on a resident dense model; refused with layers streamed
 *    from host memory and (taps) on a mixture-of-experts model;
 *  - bad input: a missing, empty or too short text, a recipe that is not 4-bit, a target out of
 *    range or below what the recipe takes, a mixture-of-experts or GGUF source — each a clear
 *    error, and nothing left behind. */
#include "format_testlib.h"

#include "calib/calib.h"
#include "engine/engine.h"
#include "zse.h"

#include <dirent.h>

static const char *data_dir;

static const char *fixture(const char *name)
{
    static char buf[4][512];
    static int k;
    char *b = buf[k++ % 4];
    snprintf(b, 512, "%s/%s", data_dir, name);
    return b;
}

static zse_calib_opts calib_opts(void)
{
    zse_calib_opts c = {.text_path = fixture("calib.txt"), .max_tokens = 128, .quiet = true};
    return c;
}

static zse_convert_opts int4_opts(void)
{
    zse_convert_opts o = {.scheme = ZSE_SCHEME_Q4, .group_size = 64, .embed_scheme = -1, .lm_head_scheme = -1,
                          .threads = 2};
    return o;
}

/* the logits of every position of `n` tokens of the calibration text under a model file */
static float *logits_of(const char *path, size_t n, int *vocab)
{
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.device = "cpu";
    lp.threads = 2;
    lp.ctx_size = 256;
    zse_model *m = zse_model_load(path, &lp);
    CHECK_MSG(m != NULL, "%s", zse_last_error());
    if (!m)
        return NULL;
    zse_model_info info;
    zse_model_get_info(m, &info);
    *vocab = info.vocab_size;
    size_t len, n_ids;
    char *text = zse_read_file(fixture("calib.txt"), &len);
    int32_t *ids = NULL;
    float *lg = malloc(n * (size_t)info.vocab_size * sizeof *lg);
    CHECK(zse_tokenize(m, text, len, 0, &ids, &n_ids) == 0 && n_ids >= n);
    zse_seq *q = zse_seq_new(m, NULL);
    CHECK(zse_seq_feed_logits(q, ids + 1000, n, lg) == 0); /* past the calibration tokens */
    zse_seq_free(q);
    zse_free(ids);
    free(text);
    zse_model_free(m);
    return lg;
}

static json_t *calibration_header(const char *path)
{
    zse_file *f = zse_file_open(path);
    CHECK_MSG(f != NULL, "%s", zse_error_message());
    if (!f)
        return NULL;
    json_t *c = json_deep_copy(json_object_get(zse_file_header(f), "calibration"));
    zse_file_close(f);
    return c;
}

/* Folding on one model: `mha` (v's rows take attn_output's scales) or not; both untied
 * (output_norm takes the lm_head's scales). Under GQA only f32 rounding changes (which now
 * and then tips a K/V element to the next f16 in the KV cache); with v's rows scaled the
 * f16 KV cache rounds every V value differently, about 2^-11 of it. */
static void check_folding(const char *model, bool mha, double tol)
{
    const char *src = fixture(model), *tag = mha ? "mha" : "gqa";
    zse_convert_opts ref = {.scheme = ZSE_SCHEME_F32, .group_size = 64, .embed_scheme = -1, .lm_head_scheme = -1};
    CHECK(zse_convert(src, tl_path("%s-ref.zse", tag), &ref) == 0);
    zse_convert_opts o = int4_opts();
    o.embed_scheme = ZSE_SCHEME_F32;
    zse_calib_opts c = calib_opts();
    c.write_float = true;
    c.no_gptq = true;
    CHECK_MSG(zse_convert_calibrated(src, tl_path("%s-folded.zse", tag), &o, &c) == 0, "%s", zse_error_message());
    /* the scales were there: inputs got alpha > 0 and the norms changed */
    json_t *h = calibration_header(tl_path("%s-folded.zse", tag));
    size_t i, scaled = 0, o_scaled = 0;
    json_t *e;
    json_array_foreach(json_object_get(h, "tensors"), i, e) {
        double alpha = json_real_value(json_object_get(e, "awq_alpha"));
        const char *name = json_string_value(json_object_get(e, "name"));
        scaled += alpha > 0;
        o_scaled += alpha > 0 && strstr(name, "attn_output") != NULL;
        CHECK_EQ_STR(json_string_value(json_object_get(e, "scheme")), "f32");
    }
    CHECK_MSG(scaled >= 4, "%s: %zu tensors scaled", model, scaled);
    CHECK_MSG(mha ? o_scaled >= 1 : o_scaled == 0, "%s: %zu attn_output scaled", model, o_scaled);
    json_decref(h);
    zse_file *a = zse_file_open(tl_path("%s-ref.zse", tag)), *b = zse_file_open(tl_path("%s-folded.zse", tag));
    const zse_tensor_info *na = zse_file_tensor(a, "blk.0.attn_norm.weight"), *nb = zse_file_tensor(b, "blk.0.attn_norm.weight");
    CHECK(na && nb && memcmp(na->data, nb->data, na->size) != 0);
    zse_file_close(a);
    zse_file_close(b);
    /* ... and the function is the same */
    int va = 0, vb = 0;
    const size_t n = 96;
    float *la = logits_of(tl_path("%s-ref.zse", tag), n, &va), *lb = logits_of(tl_path("%s-folded.zse", tag), n, &vb);
    CHECK(va == vb);
    double worst = 0, scale = 0;
    for (size_t k = 0; la && lb && k < n * (size_t)va; k++) {
        worst = fmax(worst, fabs(la[k] - lb[k]));
        scale = fmax(scale, fabs(la[k]));
    }
    CHECK_MSG(worst <= tol * scale, "%s: logits differ by %g (largest %g)", model, worst, scale);
    free(la);
    free(lb);
}

static void test_folding_is_exact(void)
{
    check_folding("random/qwen2-untied", false, 1e-4); /* GQA, q/k/v biases */
    check_folding("random/llama-rope-linear", true, 5e-3);
}

/* the model's two calibration hooks: taps see every linear input once per pass with the
 * pass's rows; a swapped weight changes the output and swapping the file's back restores
 * it bit for bit */
typedef struct {
    int calls[5];
    int64_t rows, cols[5];
} tap_log;

static void count_tap(void *ctx, int layer, zse_tap_point p, const float *x, int64_t rows, int64_t cols)
{
    tap_log *t = ctx;
    (void)layer;
    t->calls[p]++;
    t->rows = rows;
    t->cols[p] = cols;
    CHECK(isfinite(x[0]) && isfinite(x[rows * cols - 1]));
}

static void test_model_hooks(void)
{
    const char *src = fixture("random/llama-rope-linear");
    zse_convert_opts ref = {.scheme = ZSE_SCHEME_F32, .group_size = 64, .embed_scheme = -1, .lm_head_scheme = -1};
    CHECK(zse_convert(src, tl_path("hooks.zse"), &ref) == 0);
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.device = "cpu";
    lp.ctx_size = 64;
    zse_model *m = zse_model_load(tl_path("hooks.zse"), &lp);
    CHECK(m != NULL);
    if (!m)
        return;
    const int32_t ids[8] = {5, 9, 100, 7, 300, 2, 11, 40};
    float *a = malloc(8 * 2048 * sizeof *a), *b = malloc(8 * 2048 * sizeof *b), *c = malloc(8 * 2048 * sizeof *c);
    tap_log log = {0};
    CHECK(zse_llm_set_tap(m->llm, count_tap, &log) == 0);
    zse_seq *q = zse_seq_new(m, NULL);
    CHECK(zse_seq_feed_logits(q, ids, 8, a) == 0);
    zse_seq_free(q);
    CHECK(zse_llm_set_tap(m->llm, NULL, NULL) == 0);
    CHECK(log.calls[ZSE_TAP_ATTN_IN] == 2 && log.calls[ZSE_TAP_ATTN_OUT] == 2 && log.calls[ZSE_TAP_FFN_IN] == 2 &&
          log.calls[ZSE_TAP_FFN_DOWN] == 2 && log.calls[ZSE_TAP_OUTPUT] == 1);
    CHECK(log.rows == 8 && log.cols[ZSE_TAP_ATTN_IN] == 64 && log.cols[ZSE_TAP_FFN_DOWN] == 160);
    /* a zeroed ffn_down in layer 1: other logits */
    const zse_tensor_info *orig = zse_file_tensor(m->file, "blk.1.ffn_down.weight");
    zse_tensor_info zero = *orig;
    float *zeros = calloc((size_t)(orig->q.rows * orig->q.cols), sizeof *zeros);
    zero.data = zeros;
    CHECK(zse_llm_swap_weight(m->llm, "blk.1.ffn_down.weight", &zero) == 0);
    q = zse_seq_new(m, NULL);
    CHECK(zse_seq_feed_logits(q, ids, 8, b) == 0);
    zse_seq_free(q);
    CHECK(memcmp(a, b, 8 * 2048 * sizeof *a) != 0);
    CHECK(zse_llm_swap_weight(m->llm, "blk.1.ffn_down.weight", orig) == 0);
    q = zse_seq_new(m, NULL);
    CHECK(zse_seq_feed_logits(q, ids, 8, c) == 0);
    zse_seq_free(q);
    CHECK(memcmp(a, c, 8 * 2048 * sizeof *a) == 0);
    /* only linear weights of the right shape */
    CHECK(zse_llm_swap_weight(m->llm, "blk.0.attn_norm.weight", orig) == -1);
    CHECK(zse_llm_swap_weight(m->llm, "blk.7.ffn_down.weight", orig) == -1);
    CHECK(zse_llm_swap_weight(m->llm, "blk.0.ffn_up.weight", orig) == -1);
    CHECK(strstr(zse_error_message(), "cannot replace") != NULL);
    /* layer 0 streamed from host memory: no tap, no swap */
    zse_backend *be = zse_backend_create("cpu", 1);
    uint8_t streamed[2] = {1, 0};
    zse_placement pl = {.streamed = streamed, .stream_buffers = 2};
    zse_llm *sm = be ? zse_llm_load_placed(m->file, be, 16, 16, &pl) : NULL;
    CHECK_MSG(sm != NULL, "%s", zse_error_message());
    if (sm) {
        CHECK(zse_llm_set_tap(sm, count_tap, &log) == -1 && strstr(zse_error_message(), "host memory"));
        CHECK(zse_llm_swap_weight(sm, "blk.1.ffn_down.weight", orig) == -1 &&
              strstr(zse_error_message(), "streamed from host memory"));
        CHECK(zse_llm_set_tap(sm, NULL, NULL) == 0);
    }
    zse_llm_free(sm);
    /* a mixture-of-experts model: its experts' inputs pass no tap point */
    zse_convert_opts moe_ref = ref;
    CHECK(zse_convert(fixture("random/qwen2-moe"), tl_path("moe.zse"), &moe_ref) == 0);
    zse_file *mf = zse_file_open(tl_path("moe.zse"));
    zse_llm *mm = mf && be ? zse_llm_load(mf, be, 16, 16) : NULL;
    CHECK_MSG(mm != NULL, "%s", zse_error_message());
    if (mm)
        CHECK(zse_llm_set_tap(mm, count_tap, &log) == -1 && strstr(zse_error_message(), "mixture-of-experts"));
    zse_llm_free(mm);
    zse_file_close(mf);
    zse_backend_destroy(be);
    free(zeros);
    free(a);
    free(b);
    free(c);
    zse_model_free(m);
}

static void test_plan_in_file(void)
{
    const char *src = fixture("random/llama-rope-linear");
    zse_convert_opts o = int4_opts();
    zse_calib_opts c = calib_opts();
    c.target_bpw = 5.0;
    CHECK_MSG(zse_convert_calibrated(src, tl_path("plan.zse"), &o, &c) == 0, "%s", zse_error_message());
    zse_file *f = zse_file_open(tl_path("plan.zse"));
    CHECK(f != NULL);
    if (!f)
        return;
    int bad = 0;
    CHECK(zse_file_verify(f, &bad) == 0 && bad == 0);
    const json_t *cal = json_object_get(zse_file_header(f), "calibration");
    CHECK_EQ_STR(json_string_value(json_object_get(cal, "method")), "awq+gptq");
    CHECK_NEAR(json_real_value(json_object_get(cal, "target_bpw")), 5.0, 0);
    /* the calibration key is a minor addition: 1.1 in the preamble and the header */
    const uint8_t *base = zse_file_base(f);
    json_t *ver = json_object_get(zse_file_header(f), "version");
    CHECK(base[8] == 1 && base[10] == 1);
    CHECK(json_integer_value(json_array_get(ver, 0)) == 1 && json_integer_value(json_array_get(ver, 1)) == 1);
    /* the budget holds over the tensors the plan covers, and the header says what each got */
    uint64_t bytes = 0, elements = 0;
    int upgraded = 0, planned = 0;
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(cal, "tensors"), i, e) {
        const zse_tensor_info *t = zse_file_tensor(f, json_string_value(json_object_get(e, "name")));
        CHECK(t != NULL);
        if (!t)
            continue;
        CHECK_EQ_STR(zse_scheme_name(t->q.scheme), json_string_value(json_object_get(e, "scheme")));
        CHECK_EQ_INT(t->q.group_size, json_integer_value(json_object_get(e, "group_size")));
        CHECK(json_real_value(json_object_get(e, "kl")) >= 0);
        bytes += t->size;
        elements += (uint64_t)(t->q.rows * t->q.cols);
        upgraded += t->q.scheme != ZSE_SCHEME_Q4 || t->q.group_size != 64;
        planned++;
    }
    CHECK_EQ_INT(planned, 2 * 7 + 1);
    double bpw = 8.0 * (double)bytes / (double)elements;
    CHECK_MSG(bpw <= 5.0 && bpw > 4.6, "%g bits per weight", bpw);
    CHECK_NEAR(json_real_value(json_object_get(cal, "bpw")), bpw, 1e-3);
    CHECK(upgraded > 0);
    zse_file_close(f);
}

/* the directory holds nothing but what the test put there */
static int files_in_tmpdir(void)
{
    DIR *d = opendir(tl_tmpdir);
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)))
        n += de->d_name[0] != '.';
    closedir(d);
    return n;
}

static void expect_error(const char *src, zse_convert_opts o, zse_calib_opts c, const char *want)
{
    int before = files_in_tmpdir();
    CHECK(zse_convert_calibrated(src, tl_path("bad.zse"), &o, &c) == -1);
    CHECK_MSG(strstr(zse_error_message(), want) != NULL, "'%s' does not say '%s'", zse_error_message(), want);
    CHECK_EQ_INT(files_in_tmpdir(), before); /* no output, no reference, no scratch file */
}

static void test_bad_input(void)
{
    const char *src = fixture("random/llama-rope-linear");
    zse_calib_opts c = calib_opts();
    c.text_path = tl_path("no-such-text.txt");
    expect_error(src, int4_opts(), c, "cannot read the calibration text");
    FILE *fp = fopen(tl_path("empty.txt"), "w");
    fclose(fp);
    c.text_path = tl_path("empty.txt");
    expect_error(src, int4_opts(), c, "is empty");
    fp = fopen(tl_path("short.txt"), "w");
    fputs("def f(x):\n    return x\n", fp);
    fclose(fp);
    c.text_path = tl_path("short.txt");
    expect_error(src, int4_opts(), c, "at least 64 are needed");
    c = calib_opts();
    zse_convert_opts o8 = int4_opts();
    o8.scheme = ZSE_SCHEME_Q8;
    expect_error(src, o8, c, "use --quant int4, int4s or nf4");
    c.target_bpw = 40;
    expect_error(src, int4_opts(), c, "out of range");
    c.target_bpw = 4.0; /* int4 g64 takes 4.5 at these widths */
    expect_error(src, int4_opts(), c, "raise it or use a larger --group-size");
    /* sources calibration does not take: refused before any work */
    c = calib_opts();
    expect_error(fixture("random/qwen2-moe"), int4_opts(), c, "is a mixture-of-experts model (qwen2_moe)");
    expect_error(fixture("gguf/qwen2.gguf"), int4_opts(), c, "is a GGUF file");
}

int main(void)
{
    if (!(data_dir = test_env("ZSE_TEST_DATA"))) {
        fprintf(stderr, "ZSE_TEST_DATA is not set\n");
        return 77;
    }
    tl_begin("calib");
    test_model_hooks();
    test_folding_is_exact();
    test_plan_in_file();
    test_bad_input();
    tl_end();
    return test_main_end();
}
