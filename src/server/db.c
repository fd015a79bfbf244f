/* The server's SQLite database: API keys (hashed) and the audit log. One file, by default
 * ~/.local/share/zse/zse.db, shared by `zse serve`, `zse api-key` and `zse audit` (WAL mode,
 * so the CLI can change keys while a server runs). */
#include "server/server.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SCHEMA_VERSION 3

struct srv_db {
    sqlite3 *db;
    char *path;
};

char *srv_db_default_path(void)
{
    const char *env = getenv("ZSE_DB");
    if (env && *env)
        return zse_strdup(env);
    zse_buf b = {0};
    const char *xdg = getenv("XDG_DATA_HOME");
    const char *home = getenv("HOME");
    int rc;
    if (xdg && *xdg)
        rc = zse_buf_printf(&b, "%s/zse/zse.db", xdg);
    else if (home && *home)
        rc = zse_buf_printf(&b, "%s/.local/share/zse/zse.db", home);
    else
        return zse_fail("neither HOME nor XDG_DATA_HOME is set; pass --db PATH"), NULL;
    if (rc != 0) {
        zse_buf_free(&b);
        return NULL;
    }
    return b.data;
}

/* mkdir -p of the folders above path, private to the user */
static int make_parent_dirs(const char *path)
{
    char *dir = zse_strdup(path);
    if (!dir)
        return -1;
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
            zse_fail("cannot create folder %s: %s", dir, strerror(errno));
            free(dir);
            return -1;
        }
        *p = '/';
    }
    free(dir);
    return 0;
}

static int exec_sql(sqlite3 *db, const char *sql)
{
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        zse_fail("database: %s", msg ? msg : sqlite3_errmsg(db));
        sqlite3_free(msg);
        return -1;
    }
    return 0;
}

/* Refused requests (no valid key, unknown route, malformed HTTP) are counted per minute,
 * client and status instead of one row each, in a table of their own: a flood of them can
 * neither prune nor crowd out the rows of real requests. */
#define REFUSED_TABLE                                                                        \
    "CREATE TABLE IF NOT EXISTS audit_refused ("                                             \
    "  minute REAL NOT NULL,"                                                                \
    "  client TEXT NOT NULL,"                                                                \
    "  status INTEGER NOT NULL,"                                                             \
    "  route TEXT NOT NULL,"                                                                 \
    "  count INTEGER NOT NULL,"                                                              \
    "  PRIMARY KEY (minute, client, status));"

/* Version 2 added api_keys.priority and the audit_refused table; version 3 api_keys.admin
 * (the key's role: an admin key may also call the dashboard's /admin routes). */
static const char SCHEMA[] =
    "CREATE TABLE IF NOT EXISTS api_keys ("
    "  name TEXT PRIMARY KEY,"
    "  hash BLOB NOT NULL UNIQUE,"
    "  prefix TEXT NOT NULL,"
    "  rate_limit INTEGER NOT NULL DEFAULT 0,"
    "  enabled INTEGER NOT NULL DEFAULT 1,"
    "  created REAL NOT NULL,"
    "  last_used REAL NOT NULL DEFAULT 0,"
    "  priority INTEGER NOT NULL DEFAULT 0,"
    "  admin INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE IF NOT EXISTS audit ("
    "  id INTEGER PRIMARY KEY,"
    "  time REAL NOT NULL,"
    "  key_name TEXT NOT NULL,"
    "  method TEXT NOT NULL,"
    "  route TEXT NOT NULL,"
    "  status INTEGER NOT NULL,"
    "  latency_ms REAL NOT NULL,"
    "  prompt_tokens INTEGER NOT NULL,"
    "  completion_tokens INTEGER NOT NULL,"
    "  client TEXT NOT NULL,"
    "  request_id TEXT NOT NULL);"
    "CREATE INDEX IF NOT EXISTS audit_time ON audit(time);"
    "CREATE INDEX IF NOT EXISTS audit_key_time ON audit(key_name, time);"
    REFUSED_TABLE;

static int user_version(sqlite3 *db)
{
    sqlite3_stmt *st;
    int v = -1;
    if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    return v;
}

static int init_schema(sqlite3 *db, const char *path)
{
    int v = user_version(db);
    if (v < 0)
        return zse_fail("%s is not a readable SQLite database: %s", path, sqlite3_errmsg(db));
    if (v > SCHEMA_VERSION)
        return zse_fail("%s was written by a newer zse (schema %d, this one knows %d)", path, v,
                        SCHEMA_VERSION);
    if (exec_sql(db, "PRAGMA journal_mode=WAL") != 0 || exec_sql(db, "PRAGMA synchronous=NORMAL") != 0)
        return -1;
    if (v == SCHEMA_VERSION)
        return 0;
    /* a version 1 file gains the key priority and the refused-request table, a version 2
     * file the key role (every existing key stays an ordinary one); a new one gets the whole
     * schema */
#define ADD_ADMIN "ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0;"
    const char *steps = v == 1   ? "ALTER TABLE api_keys ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;" REFUSED_TABLE
                                   ADD_ADMIN
                        : v == 2 ? ADD_ADMIN
                                 : SCHEMA;
#undef ADD_ADMIN
    char sql[4096];
    snprintf(sql, sizeof sql, "BEGIN IMMEDIATE; %s PRAGMA user_version=%d; COMMIT;", steps, SCHEMA_VERSION);
    if (exec_sql(db, sql) != 0) {
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        return -1;
    }
    return 0;
}

/* An existing file made by an older zse, a copy or an umask of 022 may be readable by
 * others: it is narrowed to its owner (0600), or opening fails saying why. */
static int make_private(int fd, const char *path)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return zse_fail("cannot stat database %s: %s", path, strerror(errno));
    if ((st.st_mode & 077) == 0)
        return 0;
    if (fchmod(fd, st.st_mode & 0700) != 0)
        return zse_fail("database %s is readable by other users (mode %03o) and cannot be made private: %s "
                        "(chmod 600 it as its owner)", path, (unsigned)(st.st_mode & 0777), strerror(errno));
    zse_log(ZSE_LOG_WARN, "database %s was mode %03o; made it 0600 (it holds key hashes and client addresses)",
            path, (unsigned)(st.st_mode & 0777));
    return 0;
}

/* SQLite's -wal and -shm files beside it, when they exist already */
static int make_journal_private(const char *path)
{
    static const char *const suffixes[] = {"-wal", "-shm"};
    for (size_t i = 0; i < sizeof suffixes / sizeof suffixes[0]; i++) {
        zse_buf p = {0};
        if (zse_buf_printf(&p, "%s%s", path, suffixes[i]) != 0)
            return -1;
        int fd = open(p.data, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        int rc = fd >= 0 ? make_private(fd, p.data) : 0;
        if (fd >= 0)
            close(fd);
        zse_buf_free(&p);
        if (rc != 0)
            return -1;
    }
    return 0;
}

srv_db *srv_db_open(const char *path)
{
    if (make_parent_dirs(path) != 0)
        return NULL;
    /* created here first so the file is private: it holds key hashes and client addresses */
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        zse_fail("cannot open database %s: %s", path, strerror(errno));
        return NULL;
    }
    int rc = make_private(fd, path);
    close(fd);
    if (rc != 0 || make_journal_private(path) != 0)
        return NULL;
    return srv_db_open_shared(path);
}

/* No descriptor of the file is opened and closed here: closing one drops every POSIX lock
 * this process holds on that file, the other connections' included (SQLite's WAL locks on
 * the -shm file among them), after which another process may reset the shared index under
 * them (seen as a "disk I/O error" and a PRAGMA data_version that stops moving). */
srv_db *srv_db_open_shared(const char *path)
{
    srv_db *d = zse_calloc(1, sizeof *d);
    if (!d || !(d->path = zse_strdup(path))) {
        free(d);
        return NULL;
    }
    if (sqlite3_open_v2(path, &d->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX, NULL) != SQLITE_OK) {
        zse_fail("cannot open database %s: %s", path, d->db ? sqlite3_errmsg(d->db) : "out of memory");
        srv_db_close(d);
        return NULL;
    }
    sqlite3_busy_timeout(d->db, 5000);
    if (init_schema(d->db, path) != 0) {
        zse_error_prefix("database %s", path);
        srv_db_close(d);
        return NULL;
    }
    return d;
}

void srv_db_close(srv_db *d)
{
    if (!d)
        return;
    sqlite3_close(d->db);
    free(d->path);
    free(d);
}

int64_t srv_db_data_version(srv_db *d)
{
    sqlite3_stmt *st;
    int64_t v = -1;
    if (sqlite3_prepare_v2(d->db, "PRAGMA data_version", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* ---- keys ------------------------------------------------------------------------------ */

bool srv_key_name_valid(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > SRV_KEY_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '-' || c == '_' || c == '.' || c == '@';
        if (!ok)
            return false;
    }
    return true;
}

void srv_key_hash(const char *key, size_t len, unsigned char out[32])
{
    unsigned int n = 32;
    if (EVP_Digest(key, len, out, &n, EVP_sha256(), NULL) != 1)
        memset(out, 0, 32); /* never matches: stored hashes come from the same call */
}

static double unix_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int check_name(const char *name)
{
    if (!srv_key_name_valid(name))
        return zse_fail("key name '%s' must be 1-%d characters of A-Z a-z 0-9 . _ - @", name,
                        SRV_KEY_NAME_MAX);
    return 0;
}

static int check_priority(int priority)
{
    if (priority < SRV_PRIORITY_MIN || priority > SRV_PRIORITY_MAX)
        return zse_fail("priority must be from %d (most urgent) to %d, not %d", SRV_PRIORITY_MIN, SRV_PRIORITY_MAX,
                        priority);
    return 0;
}

int srv_key_create(srv_db *d, const char *name, int rate_limit, int priority, char key_out[SRV_KEY_CHARS + 1])
{
    return srv_key_create_as(d, name, rate_limit, priority, false, key_out);
}

int srv_key_create_as(srv_db *d, const char *name, int rate_limit, int priority, bool admin,
                      char key_out[SRV_KEY_CHARS + 1])
{
    if (check_name(name) != 0 || check_priority(priority) != 0)
        return -1;
    if (rate_limit < 0)
        return zse_fail("rate limit must be 0 (none) or more requests per minute");
    unsigned char raw[24];
    if (RAND_bytes(raw, sizeof raw) != 1)
        return zse_fail("the system random generator failed; no key made");
    static const char hex[] = "0123456789abcdef";
    memcpy(key_out, "zse-", 4);
    for (size_t i = 0; i < sizeof raw; i++) {
        key_out[4 + 2 * i] = hex[raw[i] >> 4];
        key_out[5 + 2 * i] = hex[raw[i] & 15];
    }
    key_out[SRV_KEY_CHARS] = '\0';
    OPENSSL_cleanse(raw, sizeof raw);
    unsigned char hash[32];
    srv_key_hash(key_out, SRV_KEY_CHARS, hash);
    char prefix[13];
    memcpy(prefix, key_out, 12);
    prefix[12] = '\0';
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(d->db, "INSERT INTO api_keys(name, hash, prefix, rate_limit, enabled, created, priority, "
                                  "admin) VALUES(?, ?, ?, ?, 1, ?, ?, ?)", -1, &st, NULL) != SQLITE_OK)
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    sqlite3_bind_text(st, 1, name, -1, SQLITE_TRANSIENT);
    sqlite3_bind_blob(st, 2, hash, 32, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 3, prefix, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(st, 4, rate_limit);
    sqlite3_bind_double(st, 5, unix_now());
    sqlite3_bind_int(st, 6, priority);
    sqlite3_bind_int(st, 7, admin);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_CONSTRAINT) {
        OPENSSL_cleanse(key_out, SRV_KEY_CHARS);
        return zse_fail("a key named '%s' exists already (zse api-key list shows them)", name);
    }
    if (rc != SQLITE_DONE) {
        OPENSSL_cleanse(key_out, SRV_KEY_CHARS);
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    }
    return 0;
}

/* runs an UPDATE/DELETE naming one key; fails when no key has that name */
static int change_one(srv_db *d, const char *sql, const char *name, int has_int, int value)
{
    if (check_name(name) != 0)
        return -1;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(d->db, sql, -1, &st, NULL) != SQLITE_OK)
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    int i = 1;
    if (has_int)
        sqlite3_bind_int(st, i++, value);
    sqlite3_bind_text(st, i, name, -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    if (sqlite3_changes(d->db) == 0)
        return zse_fail("no key named '%s' (zse api-key list shows them)", name);
    return 0;
}

int srv_key_delete(srv_db *d, const char *name)
{
    return change_one(d, "DELETE FROM api_keys WHERE name = ?", name, 0, 0);
}

int srv_key_set_enabled(srv_db *d, const char *name, bool enabled)
{
    return change_one(d, "UPDATE api_keys SET enabled = ? WHERE name = ?", name, 1, enabled);
}

int srv_key_set_rate_limit(srv_db *d, const char *name, int rate_limit)
{
    if (rate_limit < 0)
        return zse_fail("rate limit must be 0 (none) or more requests per minute");
    return change_one(d, "UPDATE api_keys SET rate_limit = ? WHERE name = ?", name, 1, rate_limit);
}

int srv_key_set_priority(srv_db *d, const char *name, int priority)
{
    if (check_priority(priority) != 0)
        return -1;
    return change_one(d, "UPDATE api_keys SET priority = ? WHERE name = ?", name, 1, priority);
}

int srv_key_set_admin(srv_db *d, const char *name, bool admin)
{
    return change_one(d, "UPDATE api_keys SET admin = ? WHERE name = ?", name, 1, admin);
}

int srv_key_touch(srv_db *d, const char *name, double when)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(d->db, "UPDATE api_keys SET last_used = max(last_used, ?) WHERE name = ?", -1,
                           &st, NULL) != SQLITE_OK)
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    sqlite3_bind_double(st, 1, when);
    sqlite3_bind_text(st, 2, name, -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : zse_fail("database: %s", sqlite3_errmsg(d->db));
}

static void copy_text(char *dst, size_t cap, const unsigned char *src)
{
    snprintf(dst, cap, "%s", src ? (const char *)src : "");
}

int srv_key_list(srv_db *d, srv_key **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(d->db, "SELECT name, hash, prefix, rate_limit, enabled, created, last_used, priority, "
                                  "admin FROM api_keys ORDER BY name", -1, &st, NULL) != SQLITE_OK)
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    srv_key *keys = NULL;
    size_t count = 0, cap = 0;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (zse_grow((void **)&keys, &cap, count + 1, sizeof *keys, 16) != 0) {
            free(keys);
            sqlite3_finalize(st);
            return -1;
        }
        if (sqlite3_column_bytes(st, 1) != 32)
            continue; /* a damaged row could never match a key; leave it out */
        srv_key *k = &keys[count++];
        memset(k, 0, sizeof *k);
        copy_text(k->name, sizeof k->name, sqlite3_column_text(st, 0));
        memcpy(k->hash, sqlite3_column_blob(st, 1), 32);
        copy_text(k->prefix, sizeof k->prefix, sqlite3_column_text(st, 2));
        k->rate_limit = sqlite3_column_int(st, 3);
        k->enabled = sqlite3_column_int(st, 4) != 0;
        k->created = sqlite3_column_double(st, 5);
        k->last_used = sqlite3_column_double(st, 6);
        k->priority = sqlite3_column_int(st, 7);
        k->admin = sqlite3_column_int(st, 8) != 0;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        free(keys);
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    }
    *out = keys;
    *n = count;
    return 0;
}

/* ---- audit rows -------------------------------------------------------------------------- */

static int bind_row(sqlite3_stmt *st, const srv_audit_row *r)
{
    sqlite3_bind_double(st, 1, r->time);
    sqlite3_bind_text(st, 2, r->key, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, r->method, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, r->route, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 5, r->status);
    sqlite3_bind_double(st, 6, r->latency_ms);
    sqlite3_bind_int(st, 7, r->prompt_tokens);
    sqlite3_bind_int(st, 8, r->completion_tokens);
    sqlite3_bind_text(st, 9, r->client, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 10, r->request_id, -1, SQLITE_STATIC);
    return 0;
}

/* the latest use of each key among the rows, written to api_keys.last_used */
static int touch_keys(srv_db *d, const srv_audit_row *rows, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!rows[i].key[0])
            continue;
        bool later_seen = false;
        for (size_t j = i + 1; j < n && !later_seen; j++)
            later_seen = strcmp(rows[j].key, rows[i].key) == 0;
        if (!later_seen && srv_key_touch(d, rows[i].key, rows[i].time) != 0)
            return -1;
    }
    return 0;
}

int srv_audit_write(srv_db *d, const srv_audit_row *rows, size_t n)
{
    if (n == 0)
        return 0;
    if (exec_sql(d->db, "BEGIN IMMEDIATE") != 0)
        return -1;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(d->db, "INSERT INTO audit(time, key_name, method, route, status, latency_ms, "
                                  "prompt_tokens, completion_tokens, client, request_id) "
                                  "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", -1, &st, NULL) != SQLITE_OK) {
        zse_fail("database: %s", sqlite3_errmsg(d->db));
        sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
        return -1;
    }
    int rc = SQLITE_DONE;
    for (size_t i = 0; i < n && rc == SQLITE_DONE; i++) {
        bind_row(st, &rows[i]);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE || touch_keys(d, rows, n) != 0) {
        if (rc != SQLITE_DONE)
            zse_fail("database: %s", sqlite3_errmsg(d->db));
        sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
        return -1;
    }
    return exec_sql(d->db, "COMMIT");
}

/* older_sql deletes the rows before ?1 (a time); newest_sql keeps the newest ?1 rows */
static int prune_table(srv_db *d, const char *older_sql, const char *newest_sql, double older_than, int64_t max_rows)
{
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 0 ? older_than <= 0 : max_rows <= 0)
            continue;
        sqlite3_stmt *st;
        if (sqlite3_prepare_v2(d->db, pass == 0 ? older_sql : newest_sql, -1, &st, NULL) != SQLITE_OK)
            return zse_fail("database: %s", sqlite3_errmsg(d->db));
        if (pass == 0)
            sqlite3_bind_double(st, 1, older_than);
        else
            sqlite3_bind_int64(st, 1, max_rows);
        int rc = sqlite3_step(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
            return zse_fail("database: %s", sqlite3_errmsg(d->db));
    }
    return 0;
}

int srv_audit_prune(srv_db *d, double older_than, int64_t max_rows)
{
    return prune_table(d, "DELETE FROM audit WHERE time < ?",
                       "DELETE FROM audit WHERE id <= (SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?)",
                       older_than, max_rows);
}

int srv_audit_query(srv_db *d, double since, const char *key, int limit, srv_audit_row **rows,
                    size_t *n)
{
    *rows = NULL;
    *n = 0;
    sqlite3_stmt *st;
    const char *sql = key ? "SELECT time, key_name, method, route, status, latency_ms, prompt_tokens, "
                            "completion_tokens, client, request_id FROM audit WHERE time >= ?1 AND "
                            "key_name = ?2 ORDER BY time DESC, id DESC LIMIT ?3"
                          : "SELECT time, key_name, method, route, status, latency_ms, prompt_tokens, "
                            "completion_tokens, client, request_id FROM audit WHERE time >= ?1 "
                            "ORDER BY time DESC, id DESC LIMIT ?3";
    if (sqlite3_prepare_v2(d->db, sql, -1, &st, NULL) != SQLITE_OK)
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    sqlite3_bind_double(st, 1, since);
    if (key)
        sqlite3_bind_text(st, 2, key, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st, 3, limit > 0 ? limit : -1);
    srv_audit_row *out = NULL;
    size_t count = 0, cap = 0;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (zse_grow((void **)&out, &cap, count + 1, sizeof *out, 64) != 0) {
            free(out);
            sqlite3_finalize(st);
            return -1;
        }
        srv_audit_row *r = &out[count++];
        memset(r, 0, sizeof *r);
        r->time = sqlite3_column_double(st, 0);
        copy_text(r->key, sizeof r->key, sqlite3_column_text(st, 1));
        copy_text(r->method, sizeof r->method, sqlite3_column_text(st, 2));
        copy_text(r->route, sizeof r->route, sqlite3_column_text(st, 3));
        r->status = sqlite3_column_int(st, 4);
        r->latency_ms = sqlite3_column_double(st, 5);
        r->prompt_tokens = sqlite3_column_int(st, 6);
        r->completion_tokens = sqlite3_column_int(st, 7);
        copy_text(r->client, sizeof r->client, sqlite3_column_text(st, 8));
        copy_text(r->request_id, sizeof r->request_id, sqlite3_column_text(st, 9));
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        free(out);
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    }
    /* newest first from the query; callers read oldest first */
    for (size_t i = 0; i < count / 2; i++) {
        srv_audit_row t = out[i];
        out[i] = out[count - 1 - i];
        out[count - 1 - i] = t;
    }
    *rows = out;
    *n = count;
    return 0;
}

/* ---- refused requests, counted per minute, client and status ------------------------------ */

int srv_refused_write(srv_db *d, const srv_refused_row *rows, size_t n)
{
    if (n == 0)
        return 0;
    if (exec_sql(d->db, "BEGIN IMMEDIATE") != 0)
        return -1;
    sqlite3_stmt *st;
    static const char sql[] = "INSERT INTO audit_refused(minute, client, status, route, count) VALUES(?, ?, ?, ?, ?) "
                              "ON CONFLICT(minute, client, status) DO UPDATE SET count = count + excluded.count, "
                              "route = excluded.route";
    if (sqlite3_prepare_v2(d->db, sql, -1, &st, NULL) != SQLITE_OK) {
        zse_fail("database: %s", sqlite3_errmsg(d->db));
        sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
        return -1;
    }
    int rc = SQLITE_DONE;
    for (size_t i = 0; i < n && rc == SQLITE_DONE; i++) {
        sqlite3_bind_double(st, 1, rows[i].minute);
        sqlite3_bind_text(st, 2, rows[i].client, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 3, rows[i].status);
        sqlite3_bind_text(st, 4, rows[i].route, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, rows[i].count);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        zse_fail("database: %s", sqlite3_errmsg(d->db));
        sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
        return -1;
    }
    return exec_sql(d->db, "COMMIT");
}

int srv_refused_prune(srv_db *d, double older_than, int64_t max_rows)
{
    return prune_table(d, "DELETE FROM audit_refused WHERE minute < ?",
                       "DELETE FROM audit_refused WHERE rowid IN (SELECT rowid FROM audit_refused "
                       "ORDER BY minute DESC LIMIT -1 OFFSET ?)",
                       older_than, max_rows);
}

int srv_refused_query(srv_db *d, double since, int limit, srv_refused_row **rows, size_t *n)
{
    *rows = NULL;
    *n = 0;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(d->db, "SELECT minute, client, status, route, count FROM audit_refused WHERE minute >= ?1 "
                                  "ORDER BY minute DESC, count DESC LIMIT ?2", -1, &st, NULL) != SQLITE_OK)
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    /* rows are per minute: the minute holding `since` counts */
    sqlite3_bind_double(st, 1, since - 60);
    sqlite3_bind_int64(st, 2, limit > 0 ? limit : -1);
    srv_refused_row *out = NULL;
    size_t count = 0, cap = 0;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (zse_grow((void **)&out, &cap, count + 1, sizeof *out, 64) != 0) {
            free(out);
            sqlite3_finalize(st);
            return -1;
        }
        srv_refused_row *r = &out[count++];
        memset(r, 0, sizeof *r);
        r->minute = sqlite3_column_double(st, 0);
        copy_text(r->client, sizeof r->client, sqlite3_column_text(st, 1));
        r->status = sqlite3_column_int(st, 2);
        copy_text(r->route, sizeof r->route, sqlite3_column_text(st, 3));
        r->count = sqlite3_column_int64(st, 4);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        free(out);
        return zse_fail("database: %s", sqlite3_errmsg(d->db));
    }
    for (size_t i = 0; i < count / 2; i++) {
        srv_refused_row t = out[i];
        out[i] = out[count - 1 - i];
        out[count - 1 - i] = t;
    }
    *rows = out;
    *n = count;
    return 0;
}
