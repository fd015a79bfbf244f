/* zse audit — the requests `zse serve` recorded: who, what, when, how long, how many tokens. */
#include "cli/cli.h"

#include "server/server.h"
#include "util/util.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

const char cmd_audit_summary[] = "show the requests zse serve answered (time, key, route, status, tokens)";

static void usage(FILE *out)
{
    fprintf(out,
            "usage: zse audit [--since 1h] [--key NAME] [--limit N] [--refused] [--json] [--db PATH]\n\n"
            "  --since D     only requests newer than D: 90s, 15m, 1h, 7d, 2w (default 24h)\n"
            "  --key NAME    only requests made with this API key\n"
            "  --limit N     at most the newest N rows (default 1000, 0 = all)\n"
            "  --refused     refused requests instead (no valid key, unknown route, bad HTTP),\n"
            "                counted per minute, client address and status\n"
            "  --json        a JSON array instead of a table\n"
            "  --db PATH     the database (default $ZSE_DB or ~/.local/share/zse/zse.db)\n");
}

static void iso_time(double t, char *out, size_t cap)
{
    time_t s = (time_t)t;
    struct tm tm;
    gmtime_r(&s, &tm);
    size_t n = strftime(out, cap, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, cap - n, ".%03dZ", (int)((t - (double)s) * 1000));
}

/* Text from the database as it is safe to print: rows written by older servers may hold a
 * client's raw bytes (CR/LF, ESC, invalid UTF-8, which JSON cannot carry) */
typedef struct {
    char key[4 * (SRV_KEY_NAME_MAX + 1)];
    char method[32];
    char route[256];
    char client[256];
    char request_id[160];
} clean_row;

static void clean(char *dst, size_t cap, const char *src)
{
    srv_text_clean(dst, cap, src, strlen(src), SRV_TEXT_ESCAPE_CONTROLS);
}

static void clean_audit_row(const srv_audit_row *r, clean_row *c)
{
    clean(c->key, sizeof c->key, r->key);
    clean(c->method, sizeof c->method, r->method);
    clean(c->route, sizeof c->route, r->route);
    clean(c->client, sizeof c->client, r->client);
    clean(c->request_id, sizeof c->request_id, r->request_id);
}

static int print_array(json_t *arr)
{
    char *s = arr ? json_dumps(arr, JSON_INDENT(2)) : NULL;
    json_decref(arr);
    if (!s)
        return zse_fail("out of memory"), cli_error("audit");
    printf("%s\n", s);
    free(s);
    return 0;
}

static int print_json(const srv_audit_row *rows, size_t n)
{
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++) {
        char when[40];
        iso_time(rows[i].time, when, sizeof when);
        clean_row c;
        clean_audit_row(&rows[i], &c);
        const srv_audit_row *r = &rows[i];
        json_t *o = json_pack("{s:s, s:f, s:s, s:s, s:s, s:i, s:f, s:i, s:i, s:s, s:s}", "time", when, "unix_time",
                              r->time, "key", c.key, "method", c.method, "route", c.route, "status", r->status,
                              "latency_ms", r->latency_ms, "prompt_tokens", r->prompt_tokens, "completion_tokens",
                              r->completion_tokens, "client", c.client, "request_id", c.request_id);
        if (!o || json_array_append_new(arr, o) != 0) {
            json_decref(arr);
            arr = NULL;
        }
    }
    return print_array(arr);
}

static void print_table(const srv_audit_row *rows, size_t n)
{
    printf("%-24s %-16s %-6s %-22s %6s %10s %7s %7s %-16s %s\n", "TIME", "KEY", "METHOD", "ROUTE", "STATUS",
           "LATENCY_MS", "PROMPT", "OUTPUT", "CLIENT", "ID");
    for (size_t i = 0; i < n; i++) {
        char when[40];
        iso_time(rows[i].time, when, sizeof when);
        const srv_audit_row *r = &rows[i];
        clean_row c;
        clean_audit_row(r, &c);
        printf("%-24s %-16s %-6s %-22s %6d %10.1f %7d %7d %-16s %s\n", when, c.key[0] ? c.key : "-", c.method, c.route,
               r->status, r->latency_ms, r->prompt_tokens, r->completion_tokens, c.client,
               c.request_id[0] ? c.request_id : "-");
    }
}

static int print_refused(const srv_refused_row *rows, size_t n, bool as_json)
{
    json_t *arr = as_json ? json_array() : NULL;
    if (!as_json)
        printf("%-24s %-40s %6s %10s %s\n", "MINUTE", "CLIENT", "STATUS", "COUNT", "LAST ROUTE");
    for (size_t i = 0; i < n; i++) {
        char when[40], client[256], route[256];
        iso_time(rows[i].minute, when, sizeof when);
        clean(client, sizeof client, rows[i].client);
        clean(route, sizeof route, rows[i].route);
        if (!as_json) {
            printf("%-24s %-40s %6d %10lld %s\n", when, client, rows[i].status, (long long)rows[i].count, route);
            continue;
        }
        json_t *o = json_pack("{s:s, s:f, s:s, s:i, s:I, s:s}", "minute", when, "unix_time", rows[i].minute, "client",
                              client, "status", rows[i].status, "count", (json_int_t)rows[i].count, "route", route);
        if (!arr || !o || json_array_append_new(arr, o) != 0) {
            json_decref(arr);
            return zse_fail("out of memory"), cli_error("audit");
        }
    }
    return as_json ? print_array(arr) : 0;
}

int cmd_audit(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *db_path = NULL, *key = NULL, *since_arg = "24h";
    bool as_json = false, refused = false;
    int64_t limit = 1000;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_is(&a, NULL, "--db"))
            db_path = cli_value(&a);
        else if (cli_is(&a, NULL, "--key"))
            key = cli_value(&a);
        else if (cli_is(&a, NULL, "--since"))
            since_arg = cli_value(&a);
        else if (cli_is(&a, NULL, "--limit"))
            cli_int(&a, 0, 100000000, &limit);
        else if (cli_is(&a, NULL, "--json"))
            as_json = true;
        else if (cli_is(&a, NULL, "--refused"))
            refused = true;
        else
            return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    double since;
    if (!srv_parse_duration(since_arg, &since)) {
        fprintf(stderr, "zse audit: --since takes a duration like 90s, 15m, 1h, 7d or 2w, not '%s'\n", since_arg);
        return 2;
    }
    char *default_path = db_path ? NULL : srv_db_default_path();
    if (!db_path && !default_path)
        return cli_error("audit");
    srv_db *db = srv_db_open(db_path ? db_path : default_path);
    free(default_path);
    if (!db)
        return cli_error("audit");
    if (refused && key) {
        srv_db_close(db);
        fprintf(stderr, "zse audit: --refused lists requests without a valid key; --key does not apply\n");
        return 2;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (refused) {
        srv_refused_row *counts;
        size_t n;
        int rc = srv_refused_query(db, (double)ts.tv_sec - since, (int)limit, &counts, &n);
        srv_db_close(db);
        if (rc != 0)
            return cli_error("audit");
        rc = print_refused(counts, n, as_json);
        free(counts);
        return rc;
    }
    srv_audit_row *rows;
    size_t n;
    int rc = srv_audit_query(db, (double)ts.tv_sec - since, key, (int)limit, &rows, &n);
    srv_db_close(db);
    if (rc != 0)
        return cli_error("audit");
    if (as_json)
        rc = print_json(rows, n);
    else
        print_table(rows, n);
    free(rows);
    return rc;
}
