/* zse run MODEL -p PROMPT — generate a continuation. */
#include "cli/cli.h"

#include "zse.h"
#include "util/util.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

const char cmd_run_summary[] = "generate a continuation of a prompt";

static void usage(FILE *out)
{
    fprintf(out,
            "usage: zse run MODEL.zse -p PROMPT [options]\n\n"
            "  -p, --prompt TEXT       the prompt (tokenized like tokenizer(prompt, add_special_tokens=False))\n"
            "  -f, --file FILE         read the prompt from a file\n"
            "  -n, --max-tokens N      tokens to generate (default 128)\n"
            "  --temp T                temperature; 0 is greedy (default 0.8)\n"
            "  --top-k K, --top-p P, --min-p P, --repeat-penalty R, --seed S\n"
            "  --bos                   add the tokenizer's BOS\n"
            "  --ignore-eos            keep going past end-of-sequence tokens\n"
            "  --threads N             CPU threads (default: physical cores)\n"
            "  --ctx N                 context length (default: the model's)\n"
            "  --kv-cache f16|int8     KV cache storage (default f16)\n"
            "  --device cpu|cuda|cuda:N\n"
            "  --gpu-memory SIZE       GPU memory for weights, KV cache and activations (default: what is free)\n"
            "  --ids                   print the generated ids as a JSON array instead of text\n"
            "  --dump-logits FILE      write the prompt's last-position logits as a JSON array\n"
            "  --dump-argmax FILE      write the argmax of every prompt position as a JSON array\n"
            "  --json-schema FILE      the output is JSON valid against this JSON Schema (--strict: OpenAI's strict mode)\n"
            "  --json                  the output is a JSON object\n"
            "  --regex RE              the output matches this regular expression (docs/GRAMMAR.md)\n"
            CLI_LORA_HELP CLI_SPEC_HELP);
}

static int dump_logits(const char *path, const float *logits, int n)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return zse_fail("cannot write %s", path);
    fputc('[', f);
    for (int i = 0; i < n; i++)
        fprintf(f, "%s%.9g", i ? ", " : "", (double)logits[i]); /* round-trips the float */
    fputs("]\n", f);
    return fclose(f) == 0 ? 0 : zse_fail("cannot write %s", path);
}

int cmd_run(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *path = NULL, *prompt = NULL, *prompt_file = NULL, *dump = NULL, *dump_argmax = NULL, *kv = "f16";
    int64_t n_gen = 128, top_k = 0, seed = 0, threads = 0, ctx = 0;
    double temp = 0.8, top_p = 1.0, min_p = 0.0, rep = 1.0;
    bool ids_out = false, bos = false, ignore_eos = false, strict = false, any_json = false;
    const char *schema_file = NULL, *regex = NULL;
    zse_load_params lp;
    zse_load_params_default(&lp);
    cli_spec spec_flags = {0};
    cli_lora lora_flags = {0};
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_spec_arg(&a, &spec_flags) || cli_lora_arg(&a, &lora_flags)) continue;
        else if (cli_is(&a, "-p", "--prompt")) prompt = cli_value(&a);
        else if (cli_is(&a, "-f", "--file")) prompt_file = cli_value(&a);
        else if (cli_is(&a, "-n", "--max-tokens")) cli_int(&a, 1, 1 << 24, &n_gen);
        else if (cli_is(&a, NULL, "--temp")) cli_float(&a, 0, 100, &temp);
        else if (cli_is(&a, NULL, "--top-k")) cli_int(&a, 0, 1 << 24, &top_k);
        else if (cli_is(&a, NULL, "--top-p")) cli_float(&a, 0, 1, &top_p);
        else if (cli_is(&a, NULL, "--min-p")) cli_float(&a, 0, 1, &min_p);
        else if (cli_is(&a, NULL, "--repeat-penalty")) cli_float(&a, 0.01, 100, &rep);
        else if (cli_is(&a, NULL, "--seed")) cli_int(&a, 0, INT64_MAX, &seed);
        else if (cli_is(&a, NULL, "--threads")) cli_int(&a, 1, 1024, &threads);
        else if (cli_is(&a, NULL, "--ctx")) cli_int(&a, 1, 1 << 24, &ctx);
        else if (cli_is(&a, NULL, "--kv-cache")) kv = cli_value(&a);
        else if (cli_is(&a, NULL, "--device")) lp.device = cli_value(&a);
        else if (cli_is(&a, NULL, "--gpu-memory")) cli_size(&a, 1ull << 20, &lp.gpu_memory);
        else if (cli_is(&a, NULL, "--ids")) ids_out = true;
        else if (cli_is(&a, NULL, "--bos")) bos = true;
        else if (cli_is(&a, NULL, "--ignore-eos")) ignore_eos = true;
        else if (cli_is(&a, NULL, "--dump-logits")) dump = cli_value(&a);
        else if (cli_is(&a, NULL, "--dump-argmax")) dump_argmax = cli_value(&a);
        else if (cli_is(&a, NULL, "--json-schema")) schema_file = cli_value(&a);
        else if (cli_is(&a, NULL, "--strict")) strict = true;
        else if (cli_is(&a, NULL, "--json")) any_json = true;
        else if (cli_is(&a, NULL, "--regex")) regex = cli_value(&a);
        else if (cli_positional(&a) && !path) path = a.arg;
        else return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!path || (!prompt && !prompt_file)) {
        usage(stderr);
        return 2;
    }
    if (!!schema_file + !!regex + any_json > 1 || (strict && !schema_file)) {
        fprintf(stderr, "zse run: one of --json-schema, --json and --regex at a time (--strict goes with --json-schema)\n");
        return 2;
    }
    if (kv && strcmp(kv, "f16") != 0 && strcmp(kv, "int8") != 0) {
        fprintf(stderr, "zse run: --kv-cache takes f16 or int8, not '%s'\n", kv);
        return 2;
    }
    if (cli_lora_prepare(&lora_flags, &lp, "run") != 0)
        return 2;
    lp.kv_type = strcmp(kv, "int8") == 0 ? ZSE_KV_INT8 : ZSE_KV_F16;
    lp.threads = (int)threads;
    lp.ctx_size = (int)ctx;
    size_t plen = prompt ? strlen(prompt) : 0;
    char *pdata = prompt_file ? zse_read_file(prompt_file, &plen) : NULL;
    if (prompt_file && !pdata)
        return cli_error("run");
    double t0 = zse_now();
    zse_model *draft = NULL;
    zse_spec_params spec;
    if (cli_spec_parse(&spec_flags, &spec, "run") != 0) {
        free(pdata);
        return 2;
    }
    if (cli_spec_load_draft(&spec_flags, &lp, &draft, &spec) != 0) {
        free(pdata);
        return cli_error("run");
    }
    zse_model *m = zse_model_load(path, &lp);
    if (!m) {
        free(pdata);
        zse_model_free(draft);
        return cli_error("run");
    }
    double t_load = zse_now() - t0;
    zse_model_info info;
    zse_model_get_info(m, &info);
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int rc = 1;
    zse_seq *q = NULL;
    zse_adapter *adapter = NULL;
    zse_constraint *constraint = NULL;
    char *schema = NULL;
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = (float)temp;
    s.top_k = (int)top_k;
    s.top_p = (float)top_p;
    s.min_p = (float)min_p;
    s.repetition_penalty = (float)rep;
    s.seed = (uint64_t)seed;
    s.max_tokens = (int)n_gen;
    s.ignore_eos = ignore_eos;
    if (cli_lora_open(&lora_flags, m, &adapter) != 0)
        goto done;
    s.adapter = adapter;
    size_t schema_len = 0;
    if (schema_file && !(schema = zse_read_file(schema_file, &schema_len)))
        goto done;
    if (schema && !(constraint = zse_constraint_json_schema(m, schema, schema_len, strict))) {
        zse_error_prefix("%s", schema_file);
        goto done;
    }
    if ((regex && !(constraint = zse_constraint_regex(m, regex, strlen(regex)))) ||
        (any_json && !(constraint = zse_constraint_json_object(m))))
        goto done;
    s.constraint = constraint;
    if (zse_tokenize(m, pdata ? pdata : prompt, plen, bos ? ZSE_TOK_ADD_SPECIAL : 0, &ids, &n_ids) != 0)
        goto done;
    if (n_ids == 0) {
        zse_fail("the prompt is empty after tokenization; give some text");
        goto done;
    }
    if (!(q = zse_seq_new(m, &s)) || zse_seq_set_spec(q, &spec) != 0)
        goto done;
    double t1 = zse_now();
    if (dump_argmax) {
        /* every position's logits: only when asked, it costs n x vocab floats */
        float *all = malloc(n_ids * (size_t)info.vocab_size * sizeof *all);
        if (!all) {
            zse_fail("out of memory for %zu positions of logits", n_ids);
            goto done;
        }
        int frc = zse_seq_feed_logits(q, ids, n_ids, all);
        FILE *f = frc == 0 ? fopen(dump_argmax, "w") : NULL;
        if (f) {
            fputc('[', f);
            for (size_t i = 0; i < n_ids; i++) {
                const float *row = all + i * (size_t)info.vocab_size;
                int best = 0;
                for (int k = 1; k < info.vocab_size; k++)
                    if (row[k] > row[best])
                        best = k;
                fprintf(f, "%s%d", i ? ", " : "", best);
            }
            fputs("]\n", f);
            frc = fclose(f) == 0 ? 0 : zse_fail("cannot write %s", dump_argmax);
        } else if (frc == 0) {
            frc = zse_fail("cannot write %s", dump_argmax);
        }
        free(all);
        if (frc != 0)
            goto done;
    } else if (zse_seq_feed(q, ids, n_ids) != 0) {
        goto done;
    }
    double t_prompt = zse_now() - t1;
    if (dump && dump_logits(dump, zse_seq_logits(q), info.vocab_size) != 0)
        goto done;
    json_t *gen = json_array();
    double t2 = zse_now();
    int n_out = 0;
    for (;;) {
        int32_t tok;
        char *piece;
        zse_finish fin;
        if (zse_seq_next(q, &tok, &piece, &fin) != 0) {
            json_decref(gen);
            goto done;
        }
        if (!(fin == ZSE_FINISH_STOP && piece && !*piece)) {
            json_array_append_new(gen, json_integer(tok));
            n_out++;
        }
        if (!ids_out && piece) {
            fputs(piece, stdout);
            fflush(stdout);
        }
        zse_free(piece);
        if (fin != ZSE_FINISH_NONE)
            break;
    }
    double t_gen = zse_now() - t2;
    if (ids_out) {
        char *js = json_dumps(gen, JSON_COMPACT);
        printf("%s\n", js ? js : "[]");
        free(js);
    } else {
        printf("\n");
    }
    json_decref(gen);
    fprintf(stderr, "load %.2f s | prompt %zu tokens, %.1f tok/s | generated %d tokens, %.1f tok/s\n", t_load,
            n_ids, (double)n_ids / t_prompt, n_out, t_gen > 0 ? n_out / t_gen : 0.0);
    if (spec.mode != ZSE_SPEC_OFF) {
        zse_spec_stats st;
        zse_seq_get_spec_stats(q, &st);
        fprintf(stderr, "speculative: %llu drafted, %llu accepted (%.0f%%), %.2f tokens per pass\n",
                (unsigned long long)st.drafted, (unsigned long long)st.accepted,
                st.drafted ? 100.0 * (double)st.accepted / (double)st.drafted : 0.0,
                st.passes ? (double)st.emitted / (double)st.passes : 0.0);
    }
    rc = 0;
done:
    if (rc)
        cli_error("run");
    zse_seq_free(q);
    zse_adapter_release(adapter);
    zse_constraint_free(constraint);
    free(schema);
    free(ids);
    free(pdata);
    zse_model_free(m);
    zse_model_free(draft);
    return rc;
}
