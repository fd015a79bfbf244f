/* cli — one file per verb (cmd_<verb>.c defines cmd_<verb>() and cmd_<verb>_summary[]);
 * CMake finds them and builds the verb table. Verbs parse flags and call the library. */
#ifndef ZSE_CLI_H
#define ZSE_CLI_H

#include "format/format.h"
#include "model/model.h"

#include <stdbool.h>
#include <stdint.h>

/* Walks argv of a verb. Typical use:
 *   cli_args a = cli_begin(argc, argv);
 *   while (cli_next(&a)) {
 *       if (cli_is(&a, "-o", "--output")) out = cli_value(&a);
 *       else if (cli_positional(&a)) src = a.arg;
 *       else return cli_unknown(&a);
 *   }
 *   if (a.failed) return 2;
 * Supports "--flag value" and "--flag=value". */
typedef struct {
    int argc;
    char **argv;
    int i;
    const char *arg;     /* the current argument (flag name part for --x=y) */
    const char *inline_value;
    char name_buf[128];
    bool failed;
    const char *verb;
} cli_args;

cli_args cli_begin(int argc, char **argv);
bool cli_next(cli_args *a);
bool cli_is(cli_args *a, const char *short_name, const char *long_name);
bool cli_positional(cli_args *a);
/* the flag's value; on a missing value prints an error, sets failed, returns NULL */
const char *cli_value(cli_args *a);
bool cli_int(cli_args *a, int64_t min, int64_t max, int64_t *out);
bool cli_float(cli_args *a, double min, double max, double *out);
/* a byte count with an optional K/M/G/T suffix (zse_parse_size) */
bool cli_size(cli_args *a, uint64_t min, uint64_t *out);
int cli_unknown(cli_args *a);   /* prints "unknown option", returns 2 */
/* prints "zse: <verb>: message" with the library's last error and returns 1 */
int cli_error(const char *verb);
bool cli_wants_help(int argc, char **argv);

/* ---- speculative decoding flags, the same for run, chat, serve and bench ---------------- */
#include "zse.h"

typedef struct {
    const char *mode;       /* --spec ngram|draft */
    const char *draft;      /* --draft FILE (implies --spec draft) */
    int64_t tokens;         /* --spec-tokens K */
    bool tokens_given;
} cli_spec;

#define CLI_SPEC_HELP                                                                                     \
    "  --spec ngram|draft      speculative decoding: drafts from earlier text (ngram, prompt lookup)\n"    \
    "                          or from a smaller model with the same tokenizer (--draft)\n"                \
    "  --draft FILE.zse        the draft model (implies --spec draft)\n"                                   \
    "  --spec-tokens K         draft tokens checked per step, 1-16 (default 4)\n"
#define CLI_SPEC_DEFAULT_TOKENS 4

/* takes the current flag when it is one of the above (true), else leaves it (false) */
bool cli_spec_arg(cli_args *a, cli_spec *s);
/* Checks the flags into *out (mode OFF when none was given): 0, or 2 after printing what is
 * wrong with them. */
int cli_spec_parse(const cli_spec *s, zse_spec_params *out, const char *verb);
/* Loads the draft model of a DRAFT *out (with lp, the target's load parameters: load it
 * before the target, so the target's KV cache is sized for what is left): 0, or -1 with
 * the error. */
int cli_spec_load_draft(const cli_spec *s, const zse_load_params *lp, zse_model **draft, zse_spec_params *out);

/* ---- a LoRA adapter for run and chat ---------------------------------------------------------- */
typedef struct {
    const char *path;       /* --lora PATH: a PEFT directory or a .zsa file */
    double scale;           /* --lora-scale S */
    bool scale_given;
} cli_lora;

#define CLI_LORA_HELP                                                                                     \
    "  --lora PATH             run with a LoRA adapter: a PEFT directory (adapter_config.json +\n"         \
    "                          adapter_model.safetensors) or a .zsa file (zse convert-adapter)\n"          \
    "  --lora-scale S          multiply the adapter's delta by S (default 1: as trained)\n"

bool cli_lora_arg(cli_args *a, cli_lora *l);
/* sets the load parameters for the adapter (one slot of its rank): 0, or 2 after printing */
int cli_lora_prepare(const cli_lora *l, zse_load_params *lp, const char *verb);
/* the adapter on the loaded model (NULL without --lora): 0, or -1 with the error */
int cli_lora_open(const cli_lora *l, zse_model *m, zse_adapter **out);

/* ---- zse serve's ZSE_ environment variables (serve_env.c) ----------------------------- */
typedef struct {
    const char *flag;       /* "--host" */
    bool value;             /* takes a value (else a switch) */
    bool many;              /* may be given many times: the variable holds values split by spaces */
} cli_serve_flag;
extern const cli_serve_flag cli_serve_flags[];   /* every serve flag; ends with {NULL} */
/* "--max-seqs" -> "ZSE_MAX_SEQS" */
void cli_serve_env_name(const char *flag, char *out, size_t cap);

typedef struct {
    int argc, cap;
    char **argv;            /* argv[0], the variables' flags, then the command line's arguments */
    char **owned;
    int n_owned;
} cli_serve_env;
/* the arguments zse serve parses: its variables' flags (those the command line does not give)
 * first, so the command line's win; -1 after printing what is wrong with a variable */
int cli_serve_env_args(int argc, char **argv, cli_serve_env *e);
void cli_serve_env_free(cli_serve_env *e);

/* fit.c: what fits where (zse hardware --fit, zse info --fit), and the KV cache's size */
int cli_print_fit(const char *model_path, bool as_json);
/* "1.23 GB", "45.6 MB", "789.0 KB": the unit that keeps the figure readable */
const char *cli_human_bytes(uint64_t b, char buf[32]);
/* one line (after `indent`) saying what a placement keeps where (zse info --gpu-memory) */
void cli_print_placement(const zse_fit *fit, const char *indent);
uint64_t cli_kv_bytes_per_token(const zse_config *c, bool int8);
uint64_t cli_kv_bytes(const zse_config *c, int64_t ctx, bool int8);  /* whole 16-token blocks */

#endif
