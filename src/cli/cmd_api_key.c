/* zse api-key — API keys for `zse serve --auth`, kept hashed in the server's database. */
#include "cli/cli.h"

#include "server/server.h"
#include "util/util.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

const char cmd_api_key_summary[] = "create, list, delete, disable or enable API keys for zse serve --auth";

static void usage(FILE *out)
{
    fprintf(out,
            "usage: zse api-key create NAME [--rate-limit N/min] [--priority P] [--admin]\n"
            "       zse api-key list [--json]\n"
            "       zse api-key delete|disable|enable NAME\n"
            "       zse api-key set-limit NAME N/min\n"
            "       zse api-key set-priority NAME P\n"
            "       zse api-key set-role NAME admin|user\n\n"
            "Keys are printed once, at creation; only their SHA-256 is stored.\n"
            "A rate limit allows N requests in any 60 seconds (0 = unlimited).\n"
            "A priority (-1000 to 1000, default 0; lower runs first) is the most urgent one the\n"
            "key's requests get: they may ask for a larger (less urgent) 'priority', not a smaller.\n"
            "An admin key may also manage keys and read the audit log through the web dashboard\n"
            "(the /admin routes of zse serve --auth); an ordinary (user) key may not.\n\n"
            "  --db PATH        the database (default $ZSE_DB or ~/.local/share/zse/zse.db)\n"
            "  --rate-limit R   N or N/min\n"
            "  --priority P     the key's priority\n"
            "  --admin          create an admin key (role admin; default user)\n"
            "  --json           list as JSON\n");
}

/* "N", "N/min" or "N/m" → requests per minute */
static bool parse_rate(const char *s, int *out)
{
    char num[32];
    const char *slash = strchr(s, '/');
    size_t n = slash ? (size_t)(slash - s) : strlen(s);
    if (n == 0 || n >= sizeof num)
        return false;
    if (slash && strcmp(slash, "/min") != 0 && strcmp(slash, "/m") != 0)
        return false;
    memcpy(num, s, n);
    num[n] = '\0';
    int64_t v;
    if (!zse_parse_i64(num, &v) || v < 0 || v > 1000000)
        return false;
    *out = (int)v;
    return true;
}

/* -1000..1000 */
static bool parse_priority(const char *s, int *out)
{
    int64_t v;
    if (!s || !zse_parse_i64(s, &v) || v < SRV_PRIORITY_MIN || v > SRV_PRIORITY_MAX)
        return false;
    *out = (int)v;
    return true;
}

static void format_time(double t, char *out, size_t cap)
{
    if (t <= 0) {
        snprintf(out, cap, "never");
        return;
    }
    time_t s = (time_t)t;
    struct tm tm;
    gmtime_r(&s, &tm);
    strftime(out, cap, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static int list_keys(srv_db *db, bool as_json)
{
    srv_key *keys;
    size_t n;
    if (srv_key_list(db, &keys, &n) != 0)
        return cli_error("api-key");
    if (as_json) {
        json_t *arr = json_array();
        for (size_t i = 0; arr && i < n; i++)
            json_array_append_new(arr, json_pack("{s:s, s:s, s:i, s:i, s:b, s:s, s:f, s:o}", "name", keys[i].name,
                                                 "prefix", keys[i].prefix, "rate_limit_per_min", keys[i].rate_limit,
                                                 "priority", keys[i].priority, "enabled", keys[i].enabled, "role",
                                                 keys[i].admin ? "admin" : "user", "created",
                                                 keys[i].created, "last_used",
                                                 keys[i].last_used > 0 ? json_real(keys[i].last_used) : json_null()));
        char *s = arr ? json_dumps(arr, JSON_INDENT(2)) : NULL;
        json_decref(arr);
        free(keys);
        if (!s)
            return zse_fail("out of memory"), cli_error("api-key");
        printf("%s\n", s);
        free(s);
        return 0;
    }
    printf("%-24s %-14s %-10s %-8s %-9s %-5s %-21s %s\n", "NAME", "KEY", "LIMIT", "PRIORITY", "STATUS", "ROLE",
           "CREATED", "LAST USED");
    for (size_t i = 0; i < n; i++) {
        char created[32], used[32], limit[24];
        format_time(keys[i].created, created, sizeof created);
        format_time(keys[i].last_used, used, sizeof used);
        if (keys[i].rate_limit > 0)
            snprintf(limit, sizeof limit, "%d/min", keys[i].rate_limit);
        else
            snprintf(limit, sizeof limit, "none");
        printf("%-24s %-14s %-10s %-8d %-9s %-5s %-21s %s\n", keys[i].name, keys[i].prefix, limit, keys[i].priority,
               keys[i].enabled ? "enabled" : "disabled", keys[i].admin ? "admin" : "user", created, used);
    }
    free(keys);
    return 0;
}

int cmd_api_key(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *action = NULL, *name = NULL, *db_path = NULL, *limit_arg = NULL, *priority_arg = NULL,
               *extra = NULL;
    bool as_json = false, admin = false;
    int rate = 0, priority = 0;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_is(&a, NULL, "--db"))
            db_path = cli_value(&a);
        else if (cli_is(&a, NULL, "--rate-limit"))
            limit_arg = cli_value(&a);
        else if (cli_is(&a, NULL, "--priority"))
            priority_arg = cli_value(&a);
        else if (cli_is(&a, NULL, "--json"))
            as_json = true;
        else if (cli_is(&a, NULL, "--admin"))
            admin = true;
        else if (cli_positional(&a) && !action)
            action = a.arg;
        else if (cli_positional(&a) && !name)
            name = a.arg;
        else if (cli_positional(&a) && !extra)
            extra = a.arg;
        else
            return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (!action) {
        usage(stderr);
        return 2;
    }
    bool is_create = !strcmp(action, "create"), is_list = !strcmp(action, "list");
    bool is_limit = !strcmp(action, "set-limit"), is_priority = !strcmp(action, "set-priority");
    bool is_role = !strcmp(action, "set-role");
    bool named = is_create || is_limit || is_priority || is_role || !strcmp(action, "delete") || !strcmp(action, "disable") ||
                 !strcmp(action, "enable");
    if (!named && !is_list) {
        fprintf(stderr, "zse api-key: unknown action '%s' (create, list, delete, disable, enable, set-limit, "
                        "set-priority, set-role)\n", action);
        return 2;
    }
    if (named && !name) {
        fprintf(stderr, "zse api-key %s: which key? (zse api-key %s NAME)\n", action, action);
        return 2;
    }
    const char *role_arg = NULL;
    if (is_limit)
        limit_arg = extra;
    else if (is_priority)
        priority_arg = extra;
    else if (is_role)
        role_arg = extra;
    else if (extra || (is_list && name)) {
        fprintf(stderr, "zse api-key %s: unexpected argument '%s'\n", action, extra ? extra : name);
        return 2;
    }
    if ((is_limit && !limit_arg) || (limit_arg && !parse_rate(limit_arg, &rate))) {
        fprintf(stderr, "zse api-key: a rate limit is N or N/min (requests per minute), not '%s'\n",
                limit_arg ? limit_arg : "");
        return 2;
    }
    if ((is_priority && !priority_arg) || (priority_arg && !parse_priority(priority_arg, &priority))) {
        fprintf(stderr, "zse api-key: a priority is a whole number from %d (most urgent) to %d, not '%s'\n",
                SRV_PRIORITY_MIN, SRV_PRIORITY_MAX, priority_arg ? priority_arg : "");
        return 2;
    }
    if (is_role && (!role_arg || (strcmp(role_arg, "admin") != 0 && strcmp(role_arg, "user") != 0))) {
        fprintf(stderr, "zse api-key set-role: the role is admin or user, not '%s'\n", role_arg ? role_arg : "");
        return 2;
    }
    if (admin && !is_create) {
        fprintf(stderr, "zse api-key %s: --admin goes with create (or use set-role NAME admin)\n", action);
        return 2;
    }
    if (priority_arg && !is_create && !is_priority) {
        fprintf(stderr, "zse api-key %s: --priority goes with create (or use set-priority)\n", action);
        return 2;
    }
    char *default_path = db_path ? NULL : srv_db_default_path();
    if (!db_path && !default_path)
        return cli_error("api-key");
    srv_db *db = srv_db_open(db_path ? db_path : default_path);
    free(default_path);
    if (!db)
        return cli_error("api-key");
    int rc = 0;
    if (is_list) {
        rc = list_keys(db, as_json);
    } else if (is_create) {
        char key[SRV_KEY_CHARS + 1];
        if (srv_key_create_as(db, name, rate, priority, admin, key) != 0) {
            rc = cli_error("api-key");
        } else {
            printf("%s\n", key);
            fprintf(stderr, "zse api-key: created %s'%s'%s; the key above is shown only now, store it safely\n",
                    admin ? "admin key " : "", name, rate ? " with a rate limit" : "");
        }
    } else {
        int r = !strcmp(action, "delete")    ? srv_key_delete(db, name)
                : !strcmp(action, "disable") ? srv_key_set_enabled(db, name, false)
                : !strcmp(action, "enable")  ? srv_key_set_enabled(db, name, true)
                : is_priority                ? srv_key_set_priority(db, name, priority)
                : is_role                    ? srv_key_set_admin(db, name, strcmp(role_arg, "admin") == 0)
                                             : srv_key_set_rate_limit(db, name, rate);
        if (r != 0)
            rc = cli_error("api-key");
        else
            fprintf(stderr, "zse api-key: %s '%s' done (a running server picks it up within seconds)\n", action, name);
    }
    srv_db_close(db);
    return rc;
}
