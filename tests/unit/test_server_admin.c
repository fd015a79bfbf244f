/* server: key roles (the schema 2 → 3 upgrade, the keyring's view of them), the admin
 * routes' paths and methods, every admin operation on a real database (fields checked,
 * unknown fields refused, a key cannot lock itself out, the keyring follows at once, the
 * audit filters), and the dashboard's embedded files, headers and session object. */
#include "test.h"

#include "server/server.h"

#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char tmpdir[] = "/tmp/zse-server-admin-XXXXXX";

static char *path_in(const char *name)
{
    size_t n = strlen(tmpdir) + strlen(name) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", tmpdir, name);
    return p;
}

static void test_routes(void)
{
    srv_admin_call c;
    srv_error e;
    const char *allow;
    CHECK(srv_admin_route("GET", "/admin/keys", &c, &allow, &e) == 0 && c.op == SRV_ADMIN_KEYS_LIST && !c.has_body);
    CHECK(srv_admin_route("HEAD", "/admin/keys", &c, &allow, &e) == 0 && c.op == SRV_ADMIN_KEYS_LIST);
    CHECK(srv_admin_route("POST", "/admin/keys", &c, &allow, &e) == 0 && c.op == SRV_ADMIN_KEY_CREATE && c.has_body);
    CHECK(srv_admin_route("POST", "/admin/keys/alice", &c, &allow, &e) == 0 && c.op == SRV_ADMIN_KEY_UPDATE);
    CHECK_EQ_STR(c.name, "alice");
    CHECK(srv_admin_route("DELETE", "/admin/keys/a.b@c-d_e", &c, &allow, &e) == 0 && c.op == SRV_ADMIN_KEY_DELETE &&
          !c.has_body);
    CHECK_EQ_STR(c.name, "a.b@c-d_e");
    CHECK(srv_admin_route("GET", "/admin/audit", &c, &allow, &e) == 0 && c.op == SRV_ADMIN_AUDIT);
    /* wrong methods: 405 and what is allowed */
    CHECK(srv_admin_route("DELETE", "/admin/keys", &c, &allow, &e) == -1 && e.status == 405);
    CHECK_EQ_STR(allow, "GET, HEAD, POST");
    CHECK(srv_admin_route("GET", "/admin/keys/alice", &c, &allow, &e) == -1 && e.status == 405);
    CHECK_EQ_STR(allow, "POST, DELETE");
    CHECK(srv_admin_route("POST", "/admin/audit", &c, &allow, &e) == -1 && e.status == 405);
    /* paths that name nothing, or a name no key can have */
    CHECK(srv_admin_route("GET", "/admin/", &c, &allow, &e) == -1 && e.status == 404);
    CHECK(srv_admin_route("GET", "/admin/keysx", &c, &allow, &e) == -1 && e.status == 404);
    CHECK(srv_admin_route("POST", "/admin/keys/", &c, &allow, &e) == -1 && e.status == 404);
    CHECK(srv_admin_route("POST", "/admin/keys/a/b", &c, &allow, &e) == -1 && e.status == 404);
    CHECK(srv_admin_route("POST", "/admin/keys/<script>", &c, &allow, &e) == -1 && e.status == 404);
    /* the message quotes the path with control bytes escaped */
    CHECK(srv_admin_route("GET", "/admin/x\r\ny", &c, &allow, &e) == -1 && strstr(e.message, "\\x0d\\x0a") != NULL);
}

/* a version 2 database (before roles) gains the column; its keys stay ordinary ones */
static void test_role_upgrade(void)
{
    char *path = path_in("v2.db");
    sqlite3 *raw;
    CHECK(sqlite3_open(path, &raw) == SQLITE_OK);
    CHECK(sqlite3_exec(raw,
                       "CREATE TABLE api_keys (name TEXT PRIMARY KEY, hash BLOB NOT NULL UNIQUE, prefix TEXT NOT NULL,"
                       " rate_limit INTEGER NOT NULL DEFAULT 0, enabled INTEGER NOT NULL DEFAULT 1, created REAL NOT NULL,"
                       " last_used REAL NOT NULL DEFAULT 0, priority INTEGER NOT NULL DEFAULT 0);"
                       "CREATE TABLE audit (id INTEGER PRIMARY KEY, time REAL NOT NULL, key_name TEXT NOT NULL,"
                       " method TEXT NOT NULL, route TEXT NOT NULL, status INTEGER NOT NULL, latency_ms REAL NOT NULL,"
                       " prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, client TEXT NOT NULL,"
                       " request_id TEXT NOT NULL);"
                       "CREATE TABLE audit_refused (minute REAL NOT NULL, client TEXT NOT NULL, status INTEGER NOT NULL,"
                       " route TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (minute, client, status));"
                       "INSERT INTO api_keys(name, hash, prefix, created) VALUES('old', zeroblob(32), 'zse-0000', 1);"
                       "PRAGMA user_version=2;",
                       NULL, NULL, NULL) == SQLITE_OK);
    sqlite3_close(raw);
    srv_db *db = srv_db_open(path);
    CHECK(db != NULL);
    srv_key *keys = NULL;
    size_t n = 0;
    CHECK(db && srv_key_list(db, &keys, &n) == 0 && n == 1 && !keys[0].admin);
    free(keys);
    CHECK(db && srv_key_set_admin(db, "old", true) == 0);
    CHECK(db && srv_key_list(db, &keys, &n) == 0 && n == 1 && keys[0].admin);
    free(keys);
    CHECK(db && srv_key_set_admin(db, "nobody", true) == -1);
    srv_db_close(db);
    free(path);
}

/* the keyring knows roles: only an enabled admin key is an admin */
static void test_keyring_roles(srv_db *db)
{
    char k1[SRV_KEY_CHARS + 1], k2[SRV_KEY_CHARS + 1];
    CHECK(srv_key_create_as(db, "root", 0, 0, true, k1) == 0);
    CHECK(srv_key_create(db, "user1", 0, 0, k2) == 0);
    srv_key *keys;
    size_t n;
    CHECK(srv_key_list(db, &keys, &n) == 0 && n == 2);
    srv_keyring *kr = srv_keyring_new();
    CHECK(srv_keyring_set(kr, keys, n) == 0);
    free(keys);
    CHECK(srv_keyring_is_admin(kr, "root"));
    CHECK(!srv_keyring_is_admin(kr, "user1"));
    CHECK(!srv_keyring_is_admin(kr, "nobody"));
    CHECK(!srv_keyring_is_admin(kr, ""));
    CHECK(!srv_keyring_is_admin(kr, NULL));
    CHECK(srv_key_set_enabled(db, "root", false) == 0);
    CHECK(srv_key_list(db, &keys, &n) == 0);
    CHECK(srv_keyring_set(kr, keys, n) == 0);
    free(keys);
    CHECK(!srv_keyring_is_admin(kr, "root")); /* disabled: no admin */
    CHECK(srv_key_set_enabled(db, "root", true) == 0);
    srv_keyring_free(kr);
}

typedef struct {
    const char *since, *key, *limit;
} args;

static const char *arg_of(void *ctx, const char *name)
{
    args *a = ctx;
    return !strcmp(name, "since") ? a->since : !strcmp(name, "key") ? a->key : !strcmp(name, "limit") ? a->limit : NULL;
}

/* runs one call; returns the status (the error's on failure) and the parsed answer */
static int run(srv_db *db, srv_keyring *kr, const char *method, const char *path, const char *body, args *a,
               json_t **out, srv_error *e)
{
    srv_admin_call c;
    const char *allow;
    *out = NULL;
    if (srv_admin_route(method, path, &c, &allow, e) != 0)
        return e->status;
    int status;
    char *json;
    if (srv_admin_run(&c, db, kr, "root", body, body ? strlen(body) : 0, a ? arg_of : NULL, a, &status, &json, e) != 0)
        return e->status;
    *out = json_loads(json, 0, NULL);
    free(json);
    return status;
}

static void test_admin_keys(srv_db *db)
{
    srv_keyring *kr = srv_keyring_new();
    json_t *o;
    srv_error e;
    /* create: the key comes back once, the keyring knows it at once */
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "{\"name\":\"made\",\"rate_limit\":7,\"priority\":3}", NULL, &o, &e),
                 201);
    const char *key = json_string_value(json_object_get(o, "key"));
    CHECK(key && strncmp(key, "zse-", 4) == 0 && strlen(key) == SRV_KEY_CHARS);
    CHECK_EQ_STR(json_string_value(json_object_get(o, "role")), "user");
    CHECK_EQ_INT(json_integer_value(json_object_get(o, "rate_limit_per_min")), 7);
    char hdr[80], name[SRV_KEY_NAME_MAX + 1];
    snprintf(hdr, sizeof hdr, "Bearer %s", key ? key : "");
    int prio;
    srv_rate rate;
    CHECK(srv_keyring_check(kr, hdr, 1, name, &prio, &rate) == SRV_AUTH_OK);
    CHECK_EQ_STR(name, "made");
    CHECK(prio == 3 && rate.limit == 7);
    json_decref(o);
    /* what create refuses */
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "{\"name\":\"made\"}", NULL, &o, &e), 409);
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "{\"name\":\"a b\"}", NULL, &o, &e), 400);
    CHECK_EQ_STR(e.param, "name");
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "{\"name\":\"x\",\"rate_limit\":-1}", NULL, &o, &e), 400);
    CHECK_EQ_STR(e.param, "rate_limit");
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "{\"name\":\"x\",\"priority\":2000}", NULL, &o, &e), 400);
    CHECK_EQ_STR(e.param, "priority");
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "{\"name\":\"x\",\"role\":\"root\"}", NULL, &o, &e), 400);
    CHECK_EQ_STR(e.param, "role");
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "{\"name\":\"x\",\"expires\":1}", NULL, &o, &e), 400);
    CHECK(strstr(e.message, "unsupported field 'expires' for POST /admin/keys; remove it") != NULL);
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "[1]", NULL, &o, &e), 400);
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "{\"name\":", NULL, &o, &e), 400);
    CHECK(strstr(e.message, "not JSON") != NULL);
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "{\"name\":\"x\",\"name\":\"y\"}", NULL, &o, &e), 400);
    /* an admin key made here */
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys", "{\"name\":\"boss2\",\"role\":\"admin\"}", NULL, &o, &e), 201);
    json_decref(o);
    CHECK(srv_keyring_is_admin(kr, "boss2"));

    /* update: each field, at once in the keyring */
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys/made", "{\"enabled\":false}", NULL, &o, &e), 200);
    CHECK(json_is_false(json_object_get(o, "enabled")));
    json_decref(o);
    CHECK(srv_keyring_check(kr, hdr, 2, name, &prio, &rate) == SRV_AUTH_DISABLED);
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys/made", "{\"enabled\":true,\"rate_limit\":0,\"role\":\"admin\"}", NULL,
                     &o, &e), 200);
    CHECK_EQ_STR(json_string_value(json_object_get(o, "role")), "admin");
    json_decref(o);
    CHECK(srv_keyring_check(kr, hdr, 3, name, &prio, &rate) == SRV_AUTH_OK && rate.limit == 0);
    CHECK(srv_keyring_is_admin(kr, "made"));
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys/made", "{}", NULL, &o, &e), 400);
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys/made", "{\"enabled\":1}", NULL, &o, &e), 400);
    CHECK_EQ_STR(e.param, "enabled");
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys/nobody", "{\"enabled\":true}", NULL, &o, &e), 404);
    /* the caller ("root") cannot lock itself out */
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys/root", "{\"enabled\":false}", NULL, &o, &e), 409);
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys/root", "{\"role\":\"user\"}", NULL, &o, &e), 409);
    CHECK_EQ_INT(run(db, kr, "DELETE", "/admin/keys/root", NULL, NULL, &o, &e), 409);
    CHECK_EQ_INT(run(db, kr, "POST", "/admin/keys/root", "{\"rate_limit\":100}", NULL, &o, &e), 200);
    json_decref(o);

    /* list: every key, never a hash or the key itself */
    CHECK_EQ_INT(run(db, kr, "GET", "/admin/keys", NULL, NULL, &o, &e), 200);
    json_t *keys = json_object_get(o, "keys");
    CHECK(json_array_size(keys) == 4);
    size_t i;
    json_t *k;
    json_array_foreach(keys, i, k) {
        CHECK(json_object_get(k, "key") == NULL && json_object_get(k, "hash") == NULL);
        CHECK(json_object_get(k, "prefix") != NULL);
    }
    json_decref(o);

    /* delete */
    CHECK_EQ_INT(run(db, kr, "DELETE", "/admin/keys/made", NULL, NULL, &o, &e), 200);
    json_decref(o);
    CHECK(srv_keyring_check(kr, hdr, 4, name, &prio, &rate) == SRV_AUTH_UNKNOWN);
    CHECK_EQ_INT(run(db, kr, "DELETE", "/admin/keys/made", NULL, NULL, &o, &e), 404);
    srv_keyring_free(kr);
}

static void test_admin_audit(srv_db *db)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double now = (double)ts.tv_sec;
    srv_audit_row rows[3];
    memset(rows, 0, sizeof rows);
    const char *keys[3] = {"root", "user1", "root"};
    double ages[3] = {7200, 60, 10};
    for (int i = 0; i < 3; i++) {
        rows[i].time = now - ages[i];
        snprintf(rows[i].key, sizeof rows[i].key, "%s", keys[i]);
        snprintf(rows[i].method, sizeof rows[i].method, "GET");
        snprintf(rows[i].route, sizeof rows[i].route, "/v1/models/<b>%d</b>", i);
        rows[i].status = 200 + i;
        snprintf(rows[i].client, sizeof rows[i].client, "127.0.0.1");
    }
    CHECK(srv_audit_write(db, rows, 3) == 0);
    json_t *o;
    srv_error e;
    args a = {NULL, NULL, NULL}; /* default: the last hour */
    CHECK_EQ_INT(run(db, NULL, "GET", "/admin/audit", NULL, &a, &o, &e), 200);
    CHECK(json_array_size(json_object_get(o, "rows")) == 2);
    json_t *last = json_array_get(json_object_get(o, "rows"), 1);
    CHECK_EQ_STR(json_string_value(json_object_get(last, "route")), "/v1/models/<b>2</b>"); /* oldest first */
    json_decref(o);
    a = (args){"3h", "root", NULL};
    CHECK_EQ_INT(run(db, NULL, "GET", "/admin/audit", NULL, &a, &o, &e), 200);
    CHECK(json_array_size(json_object_get(o, "rows")) == 2);
    json_decref(o);
    a = (args){"3h", NULL, "1"};
    CHECK_EQ_INT(run(db, NULL, "GET", "/admin/audit", NULL, &a, &o, &e), 200);
    CHECK(json_array_size(json_object_get(o, "rows")) == 1); /* the newest */
    CHECK_EQ_INT(json_integer_value(json_object_get(json_array_get(json_object_get(o, "rows"), 0), "status")), 202);
    json_decref(o);
    a = (args){"forever", NULL, NULL};
    CHECK_EQ_INT(run(db, NULL, "GET", "/admin/audit", NULL, &a, &o, &e), 400);
    CHECK_EQ_STR(e.param, "since");
    a = (args){NULL, NULL, "0"};
    CHECK_EQ_INT(run(db, NULL, "GET", "/admin/audit", NULL, &a, &o, &e), 400);
    CHECK_EQ_STR(e.param, "limit");
    a = (args){NULL, NULL, "99999"};
    CHECK_EQ_INT(run(db, NULL, "GET", "/admin/audit", NULL, &a, &o, &e), 400);
    a = (args){NULL, "a b", NULL};
    CHECK_EQ_INT(run(db, NULL, "GET", "/admin/audit", NULL, &a, &o, &e), 400);
    CHECK_EQ_STR(e.param, "key");
}

static void test_dashboard_files(void)
{
    const srv_asset *index = srv_dashboard_asset("/");
    CHECK(index != NULL);
    if (index) {
        CHECK(strncmp(index->content_type, "text/html", 9) == 0);
        CHECK(strstr((const char *)index->data, "/ui/app.js") != NULL);
        CHECK(strlen((const char *)index->data) == index->len); /* NUL-terminated, no NUL inside */
    }
    CHECK(srv_dashboard_asset("/ui/app.js") != NULL);
    CHECK(srv_dashboard_asset("/ui/app.css") != NULL);
    CHECK(srv_dashboard_asset("/ui/missing.js") == NULL);
    CHECK(srv_dashboard_asset("/index.html") == NULL);
    /* no file reaches outside this origin */
    for (size_t i = 0; i < srv_dashboard_n_assets; i++) {
        const char *text = (const char *)srv_dashboard_assets[i].data;
        CHECK_MSG(!strstr(text, "http://") && !strstr(text, "https://"), "%s names another origin",
                  srv_dashboard_assets[i].path);
        CHECK_MSG(!strstr(text, ".innerHTML") && !strstr(text, "insertAdjacentHTML") && !strstr(text, "eval("),
                  "%s writes markup from strings", srv_dashboard_assets[i].path);
    }
    bool csp = false;
    for (size_t i = 0; i < srv_dashboard_n_headers; i++)
        if (!strcmp(srv_dashboard_headers[i][0], "Content-Security-Policy")) {
            csp = true;
            CHECK(strstr(srv_dashboard_headers[i][1], "default-src 'none'") != NULL);
            CHECK(strstr(srv_dashboard_headers[i][1], "script-src 'self'") != NULL);
            CHECK(strstr(srv_dashboard_headers[i][1], "unsafe-inline") == NULL);
            CHECK(strstr(srv_dashboard_headers[i][1], "frame-ancestors 'none'") != NULL);
        }
    CHECK(csp);
}

static void test_session(void)
{
    json_t *s = srv_dashboard_session(NULL, "m", 5, false, true, "", false);
    CHECK(s && json_is_true(json_object_get(s, "auth")) && json_is_null(json_object_get(s, "key")) &&
          json_is_null(json_object_get(s, "role")) && json_is_null(json_object_get(s, "model")) &&
          json_is_false(json_object_get(s, "ready")));
    json_decref(s);
    s = srv_dashboard_session(NULL, "m", 5, true, true, "boss", true);
    CHECK(s && !strcmp(json_string_value(json_object_get(s, "key")), "boss") &&
          !strcmp(json_string_value(json_object_get(s, "role")), "admin"));
    json_decref(s);
    s = srv_dashboard_session(NULL, "m", 5, true, true, "u", false);
    CHECK(s && !strcmp(json_string_value(json_object_get(s, "role")), "user"));
    json_decref(s);
}

int main(void)
{
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_routes();
    test_role_upgrade();
    char *path = path_in("admin.db");
    srv_db *db = srv_db_open(path);
    CHECK(db != NULL);
    if (db) {
        test_keyring_roles(db);
        test_admin_keys(db);
        test_admin_audit(db);
    }
    srv_db_close(db);
    free(path);
    test_dashboard_files();
    test_session();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return test_main_end();
}
