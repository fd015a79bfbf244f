/* The admin routes behind the dashboard's keys and audit views: what `zse api-key` and
 * `zse audit` do, over HTTP, for admin keys only (http_head.c refuses every other caller before
 * a body byte is read; without --auth these routes are off).
 *
 * Every answer is JSON built with jansson (names and routes are escaped there; the page
 * writes them as text). Changes go to the database through the server's own connection and
 * then straight into the keyring, so a key made here works on the next request. */
#include "server/server.h"

#include <openssl/crypto.h>
#include <string.h>
#include <time.h>

#define AUDIT_DEFAULT_SINCE_S 3600.0
#define AUDIT_DEFAULT_LIMIT 200
#define AUDIT_MAX_LIMIT 5000
#define RATE_LIMIT_MAX 1000000

/* ---- routing ------------------------------------------------------------------------------ */

static int no_route(srv_error *e, const char *path)
{
    char clean[256];
    srv_text_clean(clean, sizeof clean, path, strlen(path), SRV_TEXT_ESCAPE_CONTROLS);
    return srv_error_set(e, 404, "invalid_request_error", "unknown_url", NULL,
                         "Unknown admin URL: %s (there are /admin/keys, /admin/keys/NAME and /admin/audit)", clean);
}

static int wrong_method(srv_error *e, const char *method, const char *path, const char *allow, const char **allow_out)
{
    char m[40], p[256];
    srv_text_clean(m, sizeof m, method, strlen(method), SRV_TEXT_ESCAPE_CONTROLS);
    srv_text_clean(p, sizeof p, path, strlen(path), SRV_TEXT_ESCAPE_CONTROLS);
    *allow_out = allow;
    return srv_error_set(e, 405, "invalid_request_error", "method_not_allowed", NULL,
                         "%s is not allowed on %s; use %s", m, p, allow);
}

int srv_admin_route(const char *method, const char *path, srv_admin_call *out, const char **allow, srv_error *e)
{
    memset(out, 0, sizeof *out);
    *allow = NULL;
    bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
    bool post = strcmp(method, "POST") == 0;
    if (strcmp(path, "/admin/keys") == 0) {
        if (!get && !post)
            return wrong_method(e, method, path, "GET, HEAD, POST", allow);
        out->op = get ? SRV_ADMIN_KEYS_LIST : SRV_ADMIN_KEY_CREATE;
        out->has_body = post;
        return 0;
    }
    if (strcmp(path, "/admin/audit") == 0) {
        if (!get)
            return wrong_method(e, method, path, "GET, HEAD", allow);
        out->op = SRV_ADMIN_AUDIT;
        return 0;
    }
    static const char prefix[] = "/admin/keys/";
    if (strncmp(path, prefix, sizeof prefix - 1) == 0) {
        const char *name = path + sizeof prefix - 1;
        if (!srv_key_name_valid(name)) /* also no further '/' */
            return no_route(e, path);
        bool del = strcmp(method, "DELETE") == 0;
        if (!post && !del)
            return wrong_method(e, method, path, "POST, DELETE", allow);
        snprintf(out->name, sizeof out->name, "%s", name);
        out->op = del ? SRV_ADMIN_KEY_DELETE : SRV_ADMIN_KEY_UPDATE;
        out->has_body = post;
        return 0;
    }
    return no_route(e, path);
}

/* ---- request bodies ----------------------------------------------------------------------- */

static json_t *parse_object(const char *body, size_t len, srv_error *e)
{
    json_error_t je;
    json_t *o = json_loadb(body ? body : "", len, JSON_REJECT_DUPLICATES, &je);
    if (!o) {
        srv_error_invalid(e, NULL, "the body is not JSON: %s (line %d, column %d)", je.text, je.line, je.column);
        return NULL;
    }
    if (!json_is_object(o)) {
        json_decref(o);
        srv_error_invalid(e, NULL, "the body must be a JSON object");
        return NULL;
    }
    return o;
}

/* an optional whole number within [lo, hi]; 1 when present, 0 when absent, -1 on error */
static int int_field(json_t *o, const char *name, int lo, int hi, int *out, srv_error *e)
{
    json_t *v = json_object_get(o, name);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return srv_error_invalid(e, name, "'%s' must be a whole number from %d to %d", name, lo, hi);
    *out = (int)json_integer_value(v);
    return 1;
}

/* "role": "admin" | "user"; 1 when present, 0 when absent, -1 on error */
static int role_field(json_t *o, bool *admin, srv_error *e)
{
    json_t *v = json_object_get(o, "role");
    if (!v || json_is_null(v))
        return 0;
    const char *r = json_string_value(v);
    if (!r || (strcmp(r, "admin") != 0 && strcmp(r, "user") != 0))
        return srv_error_invalid(e, "role", "'role' must be \"admin\" or \"user\"");
    *admin = strcmp(r, "admin") == 0;
    return 1;
}

/* ---- answers ------------------------------------------------------------------------------ */

static json_t *key_json(const srv_key *k)
{
    return json_pack("{s:s, s:s, s:s, s:i, s:i, s:b, s:f, s:o}", "name", k->name, "prefix", k->prefix, "role",
                     k->admin ? "admin" : "user", "rate_limit_per_min", k->rate_limit, "priority", k->priority,
                     "enabled", k->enabled, "created", k->created, "last_used",
                     k->last_used > 0 ? json_real(k->last_used) : json_null());
}

/* the database's failure as a 500, with what zse_fail recorded */
static int db_failed(srv_error *e, const char *what)
{
    return srv_error_set(e, 500, "server_error", NULL, NULL, "%s: %s", what, zse_last_error());
}

/* the keyring takes the table as it is now (the audit thread would within a second) */
static int reload_keyring(srv_db *db, srv_keyring *kr, srv_error *e)
{
    srv_key *keys;
    size_t n;
    if (srv_key_list(db, &keys, &n) != 0)
        return db_failed(e, "cannot read the keys");
    int rc = kr ? srv_keyring_set(kr, keys, n) : 0;
    free(keys);
    return rc == 0 ? 0 : srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
}

/* the stored key of that name: 1 found, 0 none, -1 database error */
static int find_key(srv_db *db, const char *name, srv_key *out, srv_error *e)
{
    srv_key *keys;
    size_t n;
    if (srv_key_list(db, &keys, &n) != 0)
        return db_failed(e, "cannot read the keys");
    int found = 0;
    for (size_t i = 0; i < n && !found; i++)
        if (strcmp(keys[i].name, name) == 0) {
            *out = keys[i];
            found = 1;
        }
    free(keys);
    return found;
}

static int keys_list(srv_db *db, json_t **out, srv_error *e)
{
    srv_key *keys;
    size_t n;
    if (srv_key_list(db, &keys, &n) != 0)
        return db_failed(e, "cannot read the keys");
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++)
        if (json_array_append_new(arr, key_json(&keys[i])) != 0) {
            json_decref(arr);
            arr = NULL;
        }
    free(keys);
    if (!arr || !(*out = json_pack("{s:o}", "keys", arr)))
        return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    return 0;
}

static int key_create(srv_db *db, srv_keyring *kr, json_t *body, json_t **out, srv_error *e)
{
    static const char *const fields[] = {"name", "rate_limit", "priority", "role", NULL};
    if (srv_check_fields(body, fields, "", "POST /admin/keys", e) != 0)
        return -1;
    const char *name = json_string_value(json_object_get(body, "name"));
    if (!name || !srv_key_name_valid(name))
        return srv_error_invalid(e, "name", "'name' must be 1-%d characters of A-Z a-z 0-9 . _ - @", SRV_KEY_NAME_MAX);
    int rate = 0, priority = 0;
    bool admin = false;
    if (int_field(body, "rate_limit", 0, RATE_LIMIT_MAX, &rate, e) < 0 ||
        int_field(body, "priority", SRV_PRIORITY_MIN, SRV_PRIORITY_MAX, &priority, e) < 0 ||
        role_field(body, &admin, e) < 0)
        return -1;
    srv_key existing;
    int found = find_key(db, name, &existing, e);
    if (found < 0)
        return -1;
    if (found)
        return srv_error_set(e, 409, "invalid_request_error", "key_exists", "name", "a key named '%s' exists already",
                             name);
    char key[SRV_KEY_CHARS + 1];
    if (srv_key_create_as(db, name, rate, priority, admin, key) != 0)
        return db_failed(e, "cannot create the key");
    srv_key made;
    if (find_key(db, name, &made, e) != 1 || reload_keyring(db, kr, e) != 0) {
        OPENSSL_cleanse(key, sizeof key);
        return e->status ? -1 : db_failed(e, "the new key vanished");
    }
    json_t *o = key_json(&made);
    if (!o || json_object_set_new(o, "key", json_string(key)) != 0) {
        json_decref(o);
        OPENSSL_cleanse(key, sizeof key);
        return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    }
    OPENSSL_cleanse(key, sizeof key);
    *out = o;
    return 0;
}

/* the caller cannot lock itself out: its own key stays enabled, an admin, and present */
static int refuse_self(srv_error *e, const char *caller, const char *what)
{
    return srv_error_set(e, 409, "invalid_request_error", "own_key", NULL,
                         "'%s' is the key making this request: it cannot %s itself (use another admin key)", caller,
                         what);
}

static int key_update(srv_db *db, srv_keyring *kr, const char *name, const char *caller, json_t *body, json_t **out,
                      srv_error *e)
{
    static const char *const fields[] = {"enabled", "rate_limit", "priority", "role", NULL};
    if (srv_check_fields(body, fields, "", "POST /admin/keys/NAME", e) != 0)
        return -1;
    json_t *en = json_object_get(body, "enabled");
    if (en && !json_is_boolean(en))
        return srv_error_invalid(e, "enabled", "'enabled' must be true or false");
    int rate = 0, priority = 0;
    bool admin = false;
    int has_rate, has_priority, has_role;
    if ((has_rate = int_field(body, "rate_limit", 0, RATE_LIMIT_MAX, &rate, e)) < 0 ||
        (has_priority = int_field(body, "priority", SRV_PRIORITY_MIN, SRV_PRIORITY_MAX, &priority, e)) < 0 ||
        (has_role = role_field(body, &admin, e)) < 0)
        return -1;
    if (!en && !has_rate && !has_priority && !has_role)
        return srv_error_invalid(e, NULL, "nothing to change: send enabled, rate_limit, priority or role");
    srv_key k;
    int found = find_key(db, name, &k, e);
    if (found < 0)
        return -1;
    if (!found)
        return srv_error_set(e, 404, "invalid_request_error", "key_not_found", NULL, "no key named '%s'", name);
    bool self = strcmp(name, caller) == 0;
    if (self && en && !json_is_true(en))
        return refuse_self(e, caller, "disable");
    if (self && has_role && !admin)
        return refuse_self(e, caller, "demote");
    if ((en && srv_key_set_enabled(db, name, json_is_true(en)) != 0) ||
        (has_rate && srv_key_set_rate_limit(db, name, rate) != 0) ||
        (has_priority && srv_key_set_priority(db, name, priority) != 0) ||
        (has_role && srv_key_set_admin(db, name, admin) != 0))
        return db_failed(e, "cannot change the key");
    if (reload_keyring(db, kr, e) != 0 || find_key(db, name, &k, e) != 1)
        return e->status ? -1 : db_failed(e, "the key vanished");
    if (!(*out = key_json(&k)))
        return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    return 0;
}

static int key_delete(srv_db *db, srv_keyring *kr, const char *name, const char *caller, json_t **out, srv_error *e)
{
    if (strcmp(name, caller) == 0)
        return refuse_self(e, caller, "delete");
    srv_key k;
    int found = find_key(db, name, &k, e);
    if (found < 0)
        return -1;
    if (!found)
        return srv_error_set(e, 404, "invalid_request_error", "key_not_found", NULL, "no key named '%s'", name);
    if (srv_key_delete(db, name) != 0)
        return db_failed(e, "cannot delete the key");
    if (reload_keyring(db, kr, e) != 0)
        return -1;
    if (!(*out = json_pack("{s:s, s:b}", "name", name, "deleted", 1)))
        return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    return 0;
}

static json_t *audit_row_json(const srv_audit_row *r)
{
    return json_pack("{s:f, s:s, s:s, s:s, s:i, s:f, s:i, s:i, s:s, s:s}", "time", r->time, "key", r->key, "method",
                     r->method, "route", r->route, "status", r->status, "latency_ms", r->latency_ms, "prompt_tokens",
                     r->prompt_tokens, "completion_tokens", r->completion_tokens, "client", r->client, "request_id",
                     r->request_id);
}

static int audit(srv_db *db, srv_arg_fn arg, void *ctx, json_t **out, srv_error *e)
{
    const char *since_s = arg ? arg(ctx, "since") : NULL;
    const char *key = arg ? arg(ctx, "key") : NULL;
    const char *limit_s = arg ? arg(ctx, "limit") : NULL;
    double since = AUDIT_DEFAULT_SINCE_S;
    if (since_s && *since_s && (!srv_parse_duration(since_s, &since) || since < 0))
        return srv_error_invalid(e, "since", "'since' is a duration such as 90s, 15m, 1h, 7d or 2w");
    int64_t limit = AUDIT_DEFAULT_LIMIT;
    if (limit_s && *limit_s && (!zse_parse_i64(limit_s, &limit) || limit < 1 || limit > AUDIT_MAX_LIMIT))
        return srv_error_invalid(e, "limit", "'limit' is a whole number from 1 to %d", AUDIT_MAX_LIMIT);
    if (key && !*key)
        key = NULL;
    if (key && !srv_key_name_valid(key))
        return srv_error_invalid(e, "key", "'key' must be a key name (1-%d characters of A-Z a-z 0-9 . _ - @)",
                                 SRV_KEY_NAME_MAX);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double now = (double)ts.tv_sec + ts.tv_nsec / 1e9;
    srv_audit_row *rows;
    size_t n;
    if (srv_audit_query(db, now - since, key, (int)limit, &rows, &n) != 0)
        return db_failed(e, "cannot read the audit log");
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++)
        if (json_array_append_new(arr, audit_row_json(&rows[i])) != 0) {
            json_decref(arr);
            arr = NULL;
        }
    free(rows);
    if (!arr || !(*out = json_pack("{s:f, s:I, s:o}", "since", now - since, "limit", (json_int_t)limit, "rows", arr)))
        return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    return 0;
}

int srv_admin_run(const srv_admin_call *c, srv_db *db, srv_keyring *kr, const char *caller, const char *body,
                  size_t len, srv_arg_fn arg, void *arg_ctx, int *status, char **json, srv_error *e)
{
    memset(e, 0, sizeof *e);
    *json = NULL;
    *status = 200;
    json_t *in = NULL, *out = NULL;
    if (c->has_body && !(in = parse_object(body, len, e)))
        return -1;
    int rc;
    switch (c->op) {
    case SRV_ADMIN_KEYS_LIST:
        rc = keys_list(db, &out, e);
        break;
    case SRV_ADMIN_KEY_CREATE:
        rc = key_create(db, kr, in, &out, e);
        *status = 201;
        break;
    case SRV_ADMIN_KEY_UPDATE:
        rc = key_update(db, kr, c->name, caller, in, &out, e);
        break;
    case SRV_ADMIN_KEY_DELETE:
        rc = key_delete(db, kr, c->name, caller, &out, e);
        break;
    case SRV_ADMIN_AUDIT:
        rc = audit(db, arg, arg_ctx, &out, e);
        break;
    default:
        rc = srv_error_set(e, 500, "server_error", NULL, NULL, "unknown admin operation");
    }
    json_decref(in);
    if (rc != 0) {
        json_decref(out);
        return -1;
    }
    *json = json_dumps(out, JSON_COMPACT);
    json_decref(out);
    if (!*json)
        return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    return 0;
}
