/* zse chat MODEL — an interactive conversation through the model's chat template.
 * Each turn renders the whole conversation, reuses the KV of the longest prefix the cache
 * already holds and feeds only the rest. Ctrl-C stops the current answer, not the
 * program; /reset forgets the conversation, /exit (or end of input) quits. Without a
 * terminal, each input line is one user message. */
#include "cli/cli.h"

#include "zse.h"
#include "util/util.h"

#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char cmd_chat_summary[] = "chat with a model interactively (its chat template, history in the KV cache)";

static volatile sig_atomic_t stop_answer;

static void on_sigint(int sig)
{
    (void)sig;
    stop_answer = 1;
}

/* feed the rendered conversation, reusing the cached prefix */
static int feed_conversation(zse_model *m, zse_seq *q, const char *rendered)
{
    int32_t *ids;
    size_t n;
    if (zse_tokenize(m, rendered, strlen(rendered), ZSE_TOK_PARSE_SPECIAL, &ids, &n) != 0)
        return -1;
    const int32_t *have = zse_seq_tokens(q);
    size_t common = 0, len = zse_seq_length(q);
    while (common < len && common < n && have[common] == ids[common])
        common++;
    if (common == n && n > 0)
        common--; /* re-run the last token: generation needs fresh logits */
    int rc = zse_seq_truncate(q, common);
    if (rc == 0)
        rc = zse_seq_feed(q, ids + common, n - common);
    free(ids);
    return rc;
}

static char *answer(zse_model *m, zse_seq *q, json_t *history, bool tty)
{
    char *msgs = json_dumps(history, JSON_COMPACT);
    char *rendered = msgs ? zse_chat_render(m, msgs, NULL, true) : NULL;
    free(msgs);
    if (!rendered || feed_conversation(m, q, rendered) != 0) {
        free(rendered);
        return NULL;
    }
    free(rendered);
    zse_buf text = {0};
    stop_answer = 0;
    for (;;) {
        int32_t tok;
        char *piece;
        zse_finish fin;
        if (zse_seq_next(q, &tok, &piece, &fin) != 0) {
            zse_buf_free(&text);
            return NULL;
        }
        fputs(piece, stdout);
        fflush(stdout);
        zse_buf_puts(&text, piece);
        zse_free(piece);
        if (fin != ZSE_FINISH_NONE || stop_answer)
            break;
    }
    if (stop_answer && tty)
        fputs(" [stopped]", stdout);
    fputs("\n", stdout);
    return text.data ? text.data : zse_strdup("");
}

int cmd_chat(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        printf("usage: zse chat MODEL.zse [--system S] [-n N] [--temp T] [--top-p P] [--seed S] [--threads N]\n"
               "                [--ctx N] [--device D] [--gpu-memory SIZE] [--no-prefix-cache]\n"
               "                [--lora PATH [--lora-scale S]]\n\n"
               "Type a message and press Enter. /reset starts over, /exit quits; Ctrl-C stops the\n"
               "answer being written. With stdin not a terminal, each line is one message.\n"
               "Each turn reuses the conversation's computed prefix; --no-prefix-cache computes\n"
               "every turn's whole prompt.\n\n" CLI_LORA_HELP CLI_SPEC_HELP);
        return 0;
    }
    const char *path = NULL, *system = NULL;
    int64_t n_gen = 512, seed = 0, threads = 0, ctx = 4096;
    double temp = 0.7, top_p = 0.95;
    zse_load_params lp;
    zse_load_params_default(&lp);
    cli_spec spec_flags = {0};
    zse_spec_params spec;
    cli_lora lora_flags = {0};
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_spec_arg(&a, &spec_flags) || cli_lora_arg(&a, &lora_flags)) continue;
        else if (cli_is(&a, NULL, "--system")) system = cli_value(&a);
        else if (cli_is(&a, "-n", "--max-tokens")) cli_int(&a, 1, 1 << 20, &n_gen);
        else if (cli_is(&a, NULL, "--temp")) cli_float(&a, 0, 100, &temp);
        else if (cli_is(&a, NULL, "--top-p")) cli_float(&a, 0, 1, &top_p);
        else if (cli_is(&a, NULL, "--seed")) cli_int(&a, 0, INT64_MAX, &seed);
        else if (cli_is(&a, NULL, "--threads")) cli_int(&a, 1, 1024, &threads);
        else if (cli_is(&a, NULL, "--ctx")) cli_int(&a, 16, 1 << 24, &ctx);
        else if (cli_is(&a, NULL, "--device")) lp.device = cli_value(&a);
        else if (cli_is(&a, NULL, "--gpu-memory")) cli_size(&a, 1ull << 20, &lp.gpu_memory);
        else if (cli_is(&a, NULL, "--no-prefix-cache")) lp.no_prefix_cache = true;
        else if (cli_positional(&a) && !path) path = a.arg;
        else return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!path) {
        fprintf(stderr, "usage: zse chat MODEL.zse [--system S]\n");
        return 2;
    }
    if (cli_spec_parse(&spec_flags, &spec, "chat") != 0 || cli_lora_prepare(&lora_flags, &lp, "chat") != 0)
        return 2;
    lp.threads = (int)threads;
    lp.ctx_size = (int)ctx;
    zse_model *draft = NULL;
    if (cli_spec_load_draft(&spec_flags, &lp, &draft, &spec) != 0)
        return cli_error("chat");
    zse_model *m = zse_model_load(path, &lp);
    if (!m) {
        zse_model_free(draft);
        return cli_error("chat");
    }
    zse_adapter *adapter = NULL;
    if (cli_lora_open(&lora_flags, m, &adapter) != 0) {
        zse_model_free(m);
        zse_model_free(draft);
        return cli_error("chat");
    }
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = (float)temp;
    s.top_p = (float)top_p;
    s.seed = (uint64_t)seed;
    s.max_tokens = (int)n_gen;
    s.adapter = adapter;
    zse_seq *q = zse_seq_new(m, &s);
    if (q && zse_seq_set_spec(q, &spec) != 0) {
        zse_seq_free(q);
        q = NULL;
        cli_error("chat");
    }
    json_t *history = json_array();
    bool tty = isatty(STDIN_FILENO);
    struct sigaction sa = {.sa_handler = on_sigint}, old;
    sigaction(SIGINT, &sa, &old); /* no SA_RESTART: Ctrl-C at the prompt interrupts the read */
    int rc = q && history ? 0 : 1;
    if (system)
        json_array_append_new(history, json_pack("{s:s, s:s}", "role", "system", "content", system));
    char line[65536];
    while (rc == 0) {
        if (tty) {
            fputs("> ", stdout);
            fflush(stdout);
        }
        if (!fgets(line, sizeof line, stdin)) {
            if (ferror(stdin) && errno == EINTR) {
                clearerr(stdin);
                fputs("\n", stdout);
                continue;
            }
            break;
        }
        line[strcspn(line, "\r\n")] = '\0';
        if (strcmp(line, "/exit") == 0)
            break;
        if (strcmp(line, "/reset") == 0) {
            while (json_array_size(history) > (system ? 1u : 0u))
                json_array_remove(history, json_array_size(history) - 1);
            zse_seq_truncate(q, 0);
            continue;
        }
        if (!*line)
            continue;
        json_array_append_new(history, json_pack("{s:s, s:s}", "role", "user", "content", line));
        char *reply = answer(m, q, history, tty);
        if (!reply) {
            rc = cli_error("chat");
            break;
        }
        json_array_append_new(history, json_pack("{s:s, s:s}", "role", "assistant", "content", reply));
        free(reply);
    }
    sigaction(SIGINT, &old, NULL);
    json_decref(history);
    zse_seq_free(q);
    zse_adapter_release(adapter);
    zse_model_free(m);
    zse_model_free(draft);
    return rc;
}
