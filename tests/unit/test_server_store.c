/* server: rate windows, durations, the key database (priorities, schema upgrade, file
 * mode), the keyring, the audit log (refused-request counts, rows lost to failed writes),
 * the metrics text, client text made safe, and the connection guard. */
#include "test.h"

#include "server/server.h"

#include <sqlite3.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char tmpdir[] = "/tmp/zse-server-store-XXXXXX";

static void test_window(void)
{
    srv_window w;
    CHECK(srv_window_init(&w, 0) == -1);
    CHECK(srv_window_init(&w, 3) == 0);
    srv_rate r = srv_window_admit(&w, 100.0, 60);
    CHECK(r.allowed && r.limit == 3 && r.remaining == 2 && r.reset_s == 60);
    r = srv_window_admit(&w, 110.0, 60);
    CHECK(r.allowed && r.remaining == 1);
    r = srv_window_admit(&w, 120.0, 60);
    CHECK(r.allowed && r.remaining == 0);
    r = srv_window_admit(&w, 130.0, 60);
    CHECK(!r.allowed);
    CHECK_EQ_INT(r.retry_after_s, 30); /* the admission at 100 leaves the window at 160 */
    CHECK_EQ_INT(r.remaining, 0);
    /* sliding, not fixed: at 160.5 exactly one admission (the one at 100) has left */
    r = srv_window_admit(&w, 160.5, 60);
    CHECK(r.allowed && r.remaining == 0);
    r = srv_window_admit(&w, 160.6, 60);
    CHECK(!r.allowed);
    /* after a quiet minute everything is free again */
    r = srv_window_admit(&w, 300, 60);
    CHECK(r.allowed && r.remaining == 2);
    srv_window_free(&w);
}

static void test_duration(void)
{
    double s;
    CHECK(srv_parse_duration("90s", &s) && s == 90);
    CHECK(srv_parse_duration("15m", &s) && s == 900);
    CHECK(srv_parse_duration("1h", &s) && s == 3600);
    CHECK(srv_parse_duration("7d", &s) && s == 7 * 86400);
    CHECK(srv_parse_duration("2w", &s) && s == 14 * 86400);
    CHECK(srv_parse_duration("45", &s) && s == 45);
    CHECK(srv_parse_duration("1.5h", &s) && s == 5400);
    CHECK(!srv_parse_duration("", &s));
    CHECK(!srv_parse_duration("h", &s));
    CHECK(!srv_parse_duration("-1h", &s));
    CHECK(!srv_parse_duration("1y", &s));
    CHECK(!srv_parse_duration("abc", &s));
}

static char *path_in(const char *name)
{
    zse_buf b = {0};
    zse_buf_printf(&b, "%s/%s", tmpdir, name);
    return b.data;
}

static void test_keys(void)
{
    char *path = path_in("a/b/zse.db"); /* folders are created */
    srv_db *db = srv_db_open(path);
    CHECK(db != NULL);
    if (!db) {
        free(path);
        return;
    }
    struct stat st;
    CHECK(stat(path, &st) == 0 && (st.st_mode & 077) == 0); /* private to the user */
    char key[SRV_KEY_CHARS + 1], key2[SRV_KEY_CHARS + 1];
    CHECK(srv_key_create(db, "alice", 0, 0, key) == 0);
    CHECK(strncmp(key, "zse-", 4) == 0 && strlen(key) == SRV_KEY_CHARS);
    CHECK(srv_key_create(db, "bob", 2, -50, key2) == 0);
    CHECK(strcmp(key, key2) != 0);
    char scratch[SRV_KEY_CHARS + 1];
    CHECK(srv_key_create(db, "alice", 0, 0, scratch) == -1);
    CHECK(strstr(zse_error_message(), "exists") != NULL);
    CHECK(srv_key_create(db, "bad name", 0, 0, scratch) == -1);
    CHECK(srv_key_create(db, "", 0, 0, scratch) == -1);
    CHECK(srv_key_create(db, "x", -1, 0, scratch) == -1);
    CHECK(srv_key_create(db, "x", 0, -1001, scratch) == -1);
    CHECK(strstr(zse_error_message(), "priority must be from -1000") != NULL);
    CHECK(!srv_key_name_valid("a/b"));
    CHECK(srv_key_name_valid("team-a.prod_1@x"));

    srv_key *keys;
    size_t n;
    CHECK(srv_key_list(db, &keys, &n) == 0 && n == 2);
    CHECK_EQ_STR(keys[0].name, "alice");
    CHECK(keys[0].enabled && keys[0].rate_limit == 0 && keys[0].created > 1.6e9);
    CHECK(strncmp(keys[0].prefix, key, 12) == 0);
    unsigned char h[32];
    srv_key_hash(key, strlen(key), h);
    CHECK(memcmp(h, keys[0].hash, 32) == 0); /* only the hash is stored */
    CHECK_EQ_STR(keys[1].name, "bob");
    CHECK(keys[1].rate_limit == 2 && keys[1].priority == -50 && keys[0].priority == 0);

    /* the keyring: constant-time lookup, disabled keys, limits */
    srv_keyring *kr = srv_keyring_new();
    CHECK(srv_keyring_set(kr, keys, n) == 0);
    char name[SRV_KEY_NAME_MAX + 1];
    int prio = 99;
    srv_rate rate;
    char hdr[128];
    snprintf(hdr, sizeof hdr, "Bearer %s", key);
    CHECK(srv_keyring_check(kr, hdr, 1000, name, &prio, &rate) == SRV_AUTH_OK);
    CHECK_EQ_STR(name, "alice");
    CHECK(prio == 0);
    CHECK(rate.limit == 0);
    snprintf(hdr, sizeof hdr, "bearer   %s  ", key);
    CHECK(srv_keyring_check(kr, hdr, 1000, name, &prio, &rate) == SRV_AUTH_OK);
    CHECK(srv_keyring_check(kr, NULL, 1000, name, &prio, &rate) == SRV_AUTH_MISSING);
    CHECK(srv_keyring_check(kr, "Basic abc", 1000, name, &prio, &rate) == SRV_AUTH_MISSING);
    CHECK(srv_keyring_check(kr, "Bearer ", 1000, name, &prio, &rate) == SRV_AUTH_MISSING);
    CHECK(srv_keyring_check(kr, "Bearer zse-0000", 1000, name, &prio, &rate) == SRV_AUTH_UNKNOWN);
    CHECK(name[0] == '\0');
    snprintf(hdr, sizeof hdr, "Bearer %s", key2);
    CHECK(srv_keyring_check(kr, hdr, 1000, name, &prio, &rate) == SRV_AUTH_OK && rate.remaining == 1);
    CHECK(prio == -50); /* the key's priority comes with its name */
    CHECK(srv_keyring_check(kr, hdr, 1001, name, &prio, &rate) == SRV_AUTH_OK && rate.remaining == 0);
    CHECK(srv_keyring_check(kr, hdr, 1002, name, &prio, &rate) == SRV_AUTH_LIMITED);
    CHECK(rate.retry_after_s == 58 && rate.limit == 2);
    CHECK_EQ_STR(name, "bob");
    /* a reload with the same keys keeps the window's history */
    CHECK(srv_keyring_set(kr, keys, n) == 0);
    CHECK(srv_keyring_check(kr, hdr, 1003, name, &prio, &rate) == SRV_AUTH_LIMITED);
    free(keys);

    CHECK(srv_key_set_enabled(db, "alice", false) == 0);
    CHECK(srv_key_set_enabled(db, "nobody", false) == -1);
    CHECK(strstr(zse_error_message(), "no key named 'nobody'") != NULL);
    CHECK(srv_key_set_rate_limit(db, "bob", 5) == 0);
    CHECK(srv_key_set_priority(db, "bob", 7) == 0);
    CHECK(srv_key_set_priority(db, "bob", 1001) == -1);
    CHECK(srv_key_list(db, &keys, &n) == 0 && n == 2);
    CHECK(!keys[0].enabled && keys[1].rate_limit == 5 && keys[1].priority == 7);
    CHECK(srv_keyring_set(kr, keys, n) == 0);
    free(keys);
    snprintf(hdr, sizeof hdr, "Bearer %s", key);
    CHECK(srv_keyring_check(kr, hdr, 1004, name, &prio, &rate) == SRV_AUTH_DISABLED);
    snprintf(hdr, sizeof hdr, "Bearer %s", key2);
    CHECK(srv_keyring_check(kr, hdr, 1004, name, &prio, &rate) == SRV_AUTH_OK); /* a new limit: a new window */
    /* a plain start-up key (--api-key): accepted besides the stored ones, kept across reloads */
    size_t before = srv_keyring_size(kr);
    CHECK(srv_keyring_set_plain(kr, "") == -1);
    CHECK(srv_keyring_set_plain(kr, "sekrit-plain") == 0 && srv_keyring_size(kr) == before + 1);
    CHECK(srv_keyring_check(kr, "Bearer sekrit-plain", 1005, name, &prio, &rate) == SRV_AUTH_OK);
    CHECK_EQ_STR(name, SRV_PLAIN_KEY_NAME);
    CHECK(prio == 0 && rate.limit == 0);
    CHECK(srv_keyring_check(kr, "Bearer sekrit-plai", 1005, name, &prio, &rate) == SRV_AUTH_UNKNOWN);
    CHECK(srv_key_list(db, &keys, &n) == 0 && srv_keyring_set(kr, keys, n) == 0);
    free(keys);
    CHECK(srv_keyring_check(kr, "Bearer sekrit-plain", 1006, name, &prio, &rate) == SRV_AUTH_OK);
    CHECK(srv_keyring_check(kr, hdr, 1006, name, &prio, &rate) == SRV_AUTH_OK); /* the stored ones still work */
    CHECK(srv_key_delete(db, "alice") == 0);
    CHECK(srv_key_delete(db, "alice") == -1);
    CHECK(srv_key_list(db, &keys, &n) == 0 && n == 1);
    free(keys);
    srv_keyring_free(kr);
    srv_db_close(db);

    /* a second connection sees the same keys; a newer schema is refused */
    db = srv_db_open(path);
    CHECK(db != NULL);
    CHECK(srv_key_list(db, &keys, &n) == 0 && n == 1);
    free(keys);
    srv_db_close(db);
    free(path);

    char *bad = path_in("not-a-db");
    FILE *f = fopen(bad, "w");
    fputs("this is not sqlite, just text long enough to be noticed by the header check..............", f);
    fclose(f);
    CHECK(srv_db_open(bad) == NULL);
    free(bad);
}


static srv_audit_row row_at(double t, const char *key, int status);

/* a database of schema 1 (made by an earlier zse) is upgraded in place; a file others can
 * read is narrowed to its owner, its -wal file too */
static void test_db_upgrade_and_mode(void)
{
    char *path = path_in("v1.db");
    sqlite3 *raw;
    CHECK(sqlite3_open(path, &raw) == SQLITE_OK);
    CHECK(sqlite3_exec(raw,
                       "CREATE TABLE api_keys (name TEXT PRIMARY KEY, hash BLOB NOT NULL UNIQUE, prefix TEXT NOT NULL,"
                       " rate_limit INTEGER NOT NULL DEFAULT 0, enabled INTEGER NOT NULL DEFAULT 1, created REAL NOT NULL,"
                       " last_used REAL NOT NULL DEFAULT 0);"
                       "CREATE TABLE audit (id INTEGER PRIMARY KEY, time REAL NOT NULL, key_name TEXT NOT NULL,"
                       " method TEXT NOT NULL, route TEXT NOT NULL, status INTEGER NOT NULL, latency_ms REAL NOT NULL,"
                       " prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, client TEXT NOT NULL,"
                       " request_id TEXT NOT NULL);"
                       "INSERT INTO api_keys(name, hash, prefix, created) VALUES('old', zeroblob(32), 'zse-0000', 1);"
                       "PRAGMA journal_mode=WAL; PRAGMA user_version=1;",
                       NULL, NULL, NULL) == SQLITE_OK);
    sqlite3_close(raw);
    CHECK(chmod(path, 0644) == 0);
    char *wal = path_in("v1.db-wal");
    FILE *f = fopen(wal, "a");
    if (f)
        fclose(f);
    CHECK(chmod(wal, 0644) == 0);
    srv_db *db = srv_db_open(path);
    CHECK(db != NULL);
    struct stat st;
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600);
    CHECK(stat(wal, &st) == 0 && (st.st_mode & 077) == 0);
    srv_key *keys;
    size_t n;
    CHECK(db && srv_key_list(db, &keys, &n) == 0 && n == 1);
    if (db && n == 1) {
        CHECK_EQ_STR(keys[0].name, "old");
        CHECK(keys[0].priority == 0);
        CHECK(!keys[0].admin); /* keys from before roles stay ordinary ones */
        free(keys);
    }
    srv_refused_row r = {.minute = 60, .status = 401, .count = 2};
    snprintf(r.client, sizeof r.client, "10.0.0.1");
    CHECK(db && srv_refused_write(db, &r, 1) == 0); /* the table came with the upgrade */
    srv_db_close(db);
    free(wal);
    free(path);
}


/* refused requests are counted per minute, client and status, never as rows; rows lost to
 * a failed write count as dropped */
static void test_refused_and_lost_rows(void)
{
    char *path = path_in("refused.db");
    srv_audit *a = srv_audit_start(path, 0, 0, NULL);
    CHECK(a != NULL);
    if (!a) {
        free(path);
        return;
    }
    double now = (double)time(NULL);
    for (int i = 0; i < 3; i++) {
        srv_audit_row r = row_at(now, "key-a", 200);
        srv_audit_log(a, &r);
    }
    for (int i = 0; i < 20000; i++)
        srv_audit_refused(a, now, i % 2 ? "10.0.0.1" : "10.0.0.2", i % 3 ? 401 : 404, "/nope");
    for (int i = 0; i < 5000; i++) { /* more distinct addresses than one write counts */
        char client[32];
        snprintf(client, sizeof client, "10.1.%d.%d", i / 256, i % 256);
        srv_audit_refused(a, now, client, 401, "/v1/models");
    }
    CHECK(srv_audit_flush(a) == 0);
    CHECK(srv_audit_refused_total(a) == 25000);
    srv_db *db = srv_db_open(path);
    srv_audit_row *rows;
    size_t n;
    CHECK(db && srv_audit_query(db, 0, NULL, 0, &rows, &n) == 0 && n == 3); /* the real rows are all there */
    free(rows);
    srv_refused_row *counts;
    CHECK(db && srv_refused_query(db, now - 60, 0, &counts, &n) == 0);
    int64_t total = 0, star = 0, from_a = 0;
    for (size_t i = 0; i < n; i++) {
        total += counts[i].count;
        if (strcmp(counts[i].client, "*") == 0)
            star += counts[i].count;
        if (strcmp(counts[i].client, "10.0.0.1") == 0 && counts[i].status == 401)
            from_a = counts[i].count;
    }
    CHECK_EQ_INT(total, 25000);
    CHECK(star > 0 && n <= 4096);
    CHECK_EQ_INT(from_a, 6667); /* odd i with i % 3 != 0 */
    free(counts);
    /* a write that fails (the table is gone) loses its rows: they are counted */
    sqlite3 *raw;
    CHECK(sqlite3_open(path, &raw) == SQLITE_OK && sqlite3_exec(raw, "DROP TABLE audit", NULL, NULL, NULL) == SQLITE_OK);
    sqlite3_close(raw);
    uint64_t before = srv_audit_dropped(a);
    for (int i = 0; i < 4; i++) {
        srv_audit_row r = row_at(now, "key-a", 200);
        srv_audit_log(a, &r);
    }
    CHECK(srv_audit_flush(a) == 0);
    CHECK_EQ_INT(srv_audit_dropped(a) - before, 4);
    srv_audit_stop(a);
    srv_db_close(db);
    free(path);
}

static void test_text(void)
{
    char out[64];
    CHECK(srv_text_clean(out, sizeof out, "plain", 5, 0) == 5 && strcmp(out, "plain") == 0);
    srv_text_clean(out, sizeof out, "/\xff" "a", 3, 0);
    CHECK_EQ_STR(out, "/\\xffa"); /* invalid UTF-8 is escaped */
    srv_text_clean(out, sizeof out, "\xc3\xa9\xe2\x82", 4, 0);
    CHECK_EQ_STR(out, "\xc3\xa9\\xe2\\x82"); /* é kept, a cut character escaped */
    srv_text_clean(out, sizeof out, "\xed\xa0\x80\xc0\xaf", 5, 0); /* a surrogate, an overlong '/' */
    CHECK_EQ_STR(out, "\\xed\\xa0\\x80\\xc0\\xaf");
    srv_text_clean(out, sizeof out, "a\r\nb\x1b[31m", 9, SRV_TEXT_ESCAPE_CONTROLS);
    CHECK_EQ_STR(out, "a\\x0d\\x0ab\\x1b[31m");
    srv_text_clean(out, sizeof out, "\xc2\x9b" "2J", 4, SRV_TEXT_ESCAPE_CONTROLS); /* C1 CSI */
    CHECK_EQ_STR(out, "\\xc2\\x9b2J");
    srv_text_clean(out, sizeof out, "a\nb", 3, 0);
    CHECK_EQ_STR(out, "a\nb"); /* controls kept without the flag (JSON escapes them) */
    char small[6];
    CHECK(srv_text_clean(small, sizeof small, "ab\xe2\x82\xac", 5, 0) == 5 && strcmp(small, "ab\xe2\x82\xac") == 0);
    CHECK(srv_text_clean(small, sizeof small, "abc\xe2\x82\xac", 6, 0) == 3); /* never half of € */
    CHECK(srv_text_clean(small, sizeof small, "ab\xff", 3, 0) == 2);          /* never half of \xff */
}

/* a message quoting a client's bytes, or cut inside a character, still encodes as JSON */
static void test_error_utf8(void)
{
    srv_error e;
    srv_error_set(&e, 404, "invalid_request_error", "unknown_url", NULL, "Unknown request URL: GET /%s", "\xff\xfe");
    char *s = srv_error_openai_json(&e);
    CHECK(s && strstr(s, "GET /\\\\xff\\\\xfe") != NULL);
    free(s);
    char long_msg[1400];
    memset(long_msg, 'a', 597);
    for (int i = 597; i + 2 < (int)sizeof long_msg; i += 2)
        memcpy(long_msg + i, "\xc3\xa9", 2);
    long_msg[sizeof long_msg - 1] = '\0';
    srv_error_invalid(&e, "messages\xff", "%s", long_msg);
    s = srv_error_openai_json(&e);
    CHECK(s != NULL);
    json_t *j = s ? json_loads(s, 0, NULL) : NULL;
    CHECK(j && strlen(json_string_value(json_object_get(json_object_get(j, "error"), "message"))) <= 599);
    json_decref(j);
    free(s);
    s = srv_error_tgi_json(&e);
    CHECK(s != NULL);
    free(s);
}

/* whether the peer of fd has seen its end shut down (the guard closed it) */
static bool was_shut(int peer)
{
    char c;
    return recv(peer, &c, 1, MSG_DONTWAIT) == 0;
}

static void test_guard(void)
{
    srv_guard_config c = {.max_connections = 16, .header_timeout_s = 2, .body_timeout_s = 5, .refused_per_min = 3};
    srv_guard *g = srv_guard_new(&c);
    CHECK(g != NULL);
    if (!g)
        return;
    int pairs[16][2];
    srv_conn *conns[16];
    for (int i = 0; i < 16; i++) {
        CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, pairs[i]) == 0);
        conns[i] = srv_guard_open(g, pairs[i][0], "10.0.0.1", 100.0 + i * 0.01);
    }
    /* 14 of 16 open (7/8) and none a second old: nobody is evicted yet */
    srv_guard_stats st;
    srv_guard_get_stats(g, &st);
    CHECK(st.open == 16 && st.evicted == 0);
    /* one in its body, one busy: the deadlines are the head's and the body's */
    srv_guard_set_state(g, conns[1], SRV_CONN_BODY, 100.5);
    srv_guard_set_state(g, conns[2], SRV_CONN_BUSY, 100.5);
    /* a client that half-closes with its head unfinished will never finish it; a busy one
     * that half-closes is waiting for its answer */
    shutdown(pairs[15][1], SHUT_WR);
    shutdown(pairs[2][1], SHUT_WR);
    srv_guard_tick(g, 100.6);
    srv_guard_get_stats(g, &st);
    CHECK(st.half_closed == 1 && srv_guard_reason(g, conns[15]) == SRV_CLOSE_HALF_CLOSED);
    CHECK(srv_guard_reason(g, conns[2]) == SRV_CLOSE_NONE);
    /* a second later the table is still nearly full: the oldest waiting heads go */
    srv_guard_tick(g, 101.2);
    srv_guard_get_stats(g, &st);
    CHECK_EQ_INT(st.evicted, 2); /* 16 - 1 half-closed - 2 leaves 13 < 14 */
    CHECK(was_shut(pairs[0][1]) && srv_guard_reason(g, conns[0]) == SRV_CLOSE_EVICTED);
    CHECK(!was_shut(pairs[1][1]) && !was_shut(pairs[2][1])); /* reading a body, busy: kept */
    CHECK(was_shut(pairs[3][1]) && !was_shut(pairs[4][1]));
    for (int i = 0; i < 4; i += (i == 0 ? 3 : 1)) {
        srv_guard_close(g, conns[i]);
        conns[i] = NULL;
        close(pairs[i][0]);
    }
    /* past the head deadline every waiting head closes however recent its bytes */
    srv_guard_tick(g, 102.5);
    srv_guard_get_stats(g, &st);
    CHECK(st.header_timeouts == 11 && st.body_timeouts == 0); /* 4..14 */
    CHECK(!was_shut(pairs[1][1]));
    srv_guard_tick(g, 105.6); /* the body's deadline: 5 s after its head */
    srv_guard_get_stats(g, &st);
    CHECK(st.body_timeouts == 1 && srv_guard_reason(g, conns[1]) == SRV_CLOSE_BODY_TIMEOUT);
    CHECK(!was_shut(pairs[2][1]) && srv_guard_reason(g, conns[2]) == SRV_CLOSE_NONE);
    for (int i = 0; i < 16; i++) {
        srv_guard_close(g, conns[i]);
        if (conns[i])
            close(pairs[i][0]);
        close(pairs[i][1]);
    }
    srv_guard_get_stats(g, &st);
    CHECK(st.open == 0);
    /* three refusals a minute per address: the fourth gets no answer */
    CHECK(srv_guard_refuse(g, "10.0.0.9", 200) && srv_guard_refuse(g, "10.0.0.9", 200) &&
          srv_guard_refuse(g, "10.0.0.9", 200));
    CHECK(!srv_guard_refuse(g, "10.0.0.9", 200));
    CHECK(srv_guard_refuse(g, "10.0.0.8", 200));     /* others are not hurt */
    CHECK(!srv_guard_refuse(g, "10.0.0.9", 219.9));  /* a token a 20 s */
    CHECK(srv_guard_refuse(g, "10.0.0.9", 220.5));
    CHECK(!srv_guard_refuse(g, "10.0.0.9", 220.6));
    srv_guard_get_stats(g, &st);
    CHECK(st.refused_unanswered == 3);
    srv_guard_free(g);
}

static srv_audit_row row_at(double t, const char *key, int status)
{
    srv_audit_row r;
    memset(&r, 0, sizeof r);
    r.time = t;
    snprintf(r.key, sizeof r.key, "%s", key);
    snprintf(r.method, sizeof r.method, "POST");
    snprintf(r.route, sizeof r.route, "/v1/chat/completions");
    r.status = status;
    r.latency_ms = 12.5;
    r.prompt_tokens = 7;
    r.completion_tokens = 9;
    snprintf(r.client, sizeof r.client, "127.0.0.1");
    snprintf(r.request_id, sizeof r.request_id, "chatcmpl-1");
    return r;
}

static void test_audit(void)
{
    char *path = path_in("audit.db");
    srv_db *db = srv_db_open(path);
    CHECK(db != NULL);
    char key[SRV_KEY_CHARS + 1];
    CHECK(srv_key_create(db, "carol", 0, 0, key) == 0);
    srv_keyring *kr = srv_keyring_new();
    srv_audit *a = srv_audit_start(path, 0, 0, kr);
    CHECK(a != NULL);
    if (!a || !db) {
        free(path);
        return;
    }
    CHECK(srv_keyring_size(kr) == 1); /* loaded at start */
    double now = (double)time(NULL);
    for (int i = 0; i < 500; i++) {
        srv_audit_row r = row_at(now - 500 + i, i % 2 ? "carol" : "", 200 + (i % 3));
        srv_audit_log(a, &r);
    }
    CHECK(srv_audit_flush(a) == 0);
    srv_audit_row *rows;
    size_t n;
    CHECK(srv_audit_query(db, 0, NULL, 0, &rows, &n) == 0 && n == 500);
    CHECK(n && rows[0].time < rows[n - 1].time); /* oldest first */
    CHECK(n && strcmp(rows[1].key, "carol") == 0 && rows[1].prompt_tokens == 7 && rows[1].latency_ms == 12.5);
    CHECK(n && strcmp(rows[1].client, "127.0.0.1") == 0 && strcmp(rows[1].route, "/v1/chat/completions") == 0);
    free(rows);
    CHECK(srv_audit_query(db, now - 100, "carol", 0, &rows, &n) == 0 && n == 50);
    free(rows);
    CHECK(srv_audit_query(db, 0, NULL, 10, &rows, &n) == 0 && n == 10);
    CHECK(n == 10 && rows[9].time == now - 1); /* the newest ten */
    free(rows);
    srv_key *keys;
    size_t nk;
    CHECK(srv_key_list(db, &keys, &nk) == 0 && nk == 1 && keys[0].last_used == now - 1);
    free(keys);

    /* a key made by another connection reaches the running keyring */
    char key2[SRV_KEY_CHARS + 1];
    CHECK(srv_key_create(db, "dave", 0, 0, key2) == 0);
    for (int i = 0; i < 40 && srv_keyring_size(kr) != 2; i++)
        usleep(100 * 1000);
    CHECK(srv_keyring_size(kr) == 2);
    srv_audit_stop(a);

    /* retention: by age, then by count */
    CHECK(srv_audit_prune(db, now - 100, 0) == 0);
    CHECK(srv_audit_query(db, 0, NULL, 0, &rows, &n) == 0 && n == 100);
    free(rows);
    CHECK(srv_audit_prune(db, 0, 30) == 0);
    CHECK(srv_audit_query(db, 0, NULL, 0, &rows, &n) == 0 && n == 30);
    CHECK(n == 30 && rows[29].time == now - 1);
    free(rows);
    /* a writer started with retention prunes on start */
    a = srv_audit_start(path, 15, 0, NULL);
    CHECK(a != NULL);
    srv_audit_stop(a);
    CHECK(srv_audit_query(db, 0, NULL, 0, &rows, &n) == 0 && n >= 10 && n <= 15);
    free(rows);
    srv_keyring_free(kr);
    srv_db_close(db);
    free(path);
}

static void test_metrics(void)
{
    srv_metrics *m = srv_metrics_new();
    srv_metrics_request(m, SRV_ROUTE_CHAT, 200);
    srv_metrics_request(m, SRV_ROUTE_CHAT, 200);
    srv_metrics_request(m, SRV_ROUTE_CHAT, 429);
    srv_metrics_request(m, SRV_ROUTE_OTHER, 404);
    srv_metrics_tokens(m, 10, 20);
    srv_metrics_ttft(m, 0.003);
    srv_metrics_ttft(m, 100);
    srv_metrics_tpot(m, 0.02);
    srv_metrics_rate_limited(m);
    zse_engine_stats st = {.queued = 3, .running = 5, .kv_blocks_used = 40, .kv_blocks_total = 100, .preemptions = 2};
    srv_live_stats live = {.engine = &st, .ready = true, .active_requests = 4, .waiting = 2, .body_bytes = 1024,
                           .guard = {.open = 9, .header_timeouts = 3, .body_timeouts = 1, .evicted = 5,
                                     .refused_unanswered = 6},
                           .audit_dropped = 1, .refused = 12};
    zse_buf out = {0};
    CHECK(srv_metrics_render(m, &live, &out) == 0);
    const char *t = zse_buf_str(&out);
    CHECK(strstr(t, "zse_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 2\n") != NULL);
    CHECK(strstr(t, "zse_requests_total{route=\"/v1/chat/completions\",status=\"429\"} 1\n") != NULL);
    CHECK(strstr(t, "zse_requests_total{route=\"other\",status=\"404\"} 1\n") != NULL);
    CHECK(strstr(t, "zse_prompt_tokens_total 10\n") != NULL);
    CHECK(strstr(t, "zse_generation_tokens_total 20\n") != NULL);
    CHECK(strstr(t, "zse_rate_limit_rejections_total 1\n") != NULL);
    CHECK(strstr(t, "zse_time_to_first_token_seconds_bucket{le=\"0.0025\"} 0\n") != NULL);
    CHECK(strstr(t, "zse_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n") != NULL);
    CHECK(strstr(t, "zse_time_to_first_token_seconds_bucket{le=\"30\"} 1\n") != NULL);
    CHECK(strstr(t, "zse_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n") != NULL);
    CHECK(strstr(t, "zse_time_to_first_token_seconds_count 2\n") != NULL);
    CHECK(strstr(t, "zse_time_per_output_token_seconds_bucket{le=\"0.025\"} 1\n") != NULL);
    CHECK(strstr(t, "zse_queue_depth 5\n") != NULL); /* the engine's and the server's queue */
    CHECK(strstr(t, "zse_running_sequences 5\n") != NULL);
    CHECK(strstr(t, "zse_kv_blocks_used 40\n") != NULL);
    CHECK(strstr(t, "zse_kv_blocks_free 60\n") != NULL);
    CHECK(strstr(t, "zse_http_requests_active 4\n") != NULL);
    CHECK(strstr(t, "zse_kv_blocks_capacity 100\n") != NULL);
    CHECK(strstr(t, "zse_kv_blocks_total") == NULL); /* a gauge: no counter suffix */
    CHECK(strstr(t, "zse_http_connections 9\n") != NULL);
    CHECK(strstr(t, "zse_http_connections_closed_total{reason=\"header_timeout\"} 3\n") != NULL);
    CHECK(strstr(t, "zse_http_connections_closed_total{reason=\"evicted\"} 5\n") != NULL);
    CHECK(strstr(t, "zse_refused_requests_total 12\n") != NULL);
    CHECK(strstr(t, "zse_refused_requests_unanswered_total 6\n") != NULL);
    CHECK(strstr(t, "zse_audit_rows_dropped_total 1\n") != NULL);
    CHECK(strstr(t, "# TYPE zse_time_per_output_token_seconds histogram\n") != NULL);
    zse_buf_free(&out);
    srv_live_stats loading = {0};
    CHECK(srv_metrics_render(m, &loading, &out) == 0);
    CHECK(strstr(zse_buf_str(&out), "zse_model_ready 0\n") != NULL);
    CHECK(strstr(zse_buf_str(&out), "zse_queue_depth") == NULL);
    zse_buf_free(&out);
    srv_metrics_free(m);
}

static void test_errors(void)
{
    srv_error e;
    CHECK(srv_error_invalid(&e, "messages[0].role", "bad %s", "role") == -1);
    char *s = srv_error_openai_json(&e);
    CHECK_EQ_STR(s, "{\"error\":{\"message\":\"bad role\",\"type\":\"invalid_request_error\",\"param\":\"messages[0].role\",\"code\":null}}");
    free(s);
    s = srv_error_tgi_json(&e);
    CHECK_EQ_STR(s, "{\"error\":\"bad role\",\"error_type\":\"validation\"}");
    free(s);
    srv_error_set(&e, 503, "server_error", "overloaded", NULL, "busy");
    s = srv_error_openai_json(&e);
    CHECK_EQ_STR(s, "{\"error\":{\"message\":\"busy\",\"type\":\"server_error\",\"param\":null,\"code\":\"overloaded\"}}");
    free(s);
    s = srv_error_tgi_json(&e);
    CHECK_EQ_STR(s, "{\"error\":\"busy\",\"error_type\":\"overloaded\"}");
    free(s);
}

int main(void)
{
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_window();
    test_duration();
    test_keys();
    test_db_upgrade_and_mode();
    test_audit();
    test_refused_and_lost_rows();
    test_metrics();
    test_errors();
    test_text();
    test_error_utf8();
    test_guard();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return test_main_end();
}
