/* server: rate windows, durations, the key database, the keyring, the audit log and the
 * metrics text. */
#include "test.h"

#include "server/server.h"

#include <stdlib.h>
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
    CHECK(srv_key_create(db, "alice", 0, key) == 0);
    CHECK(strncmp(key, "zse-", 4) == 0 && strlen(key) == SRV_KEY_CHARS);
    CHECK(srv_key_create(db, "bob", 2, key2) == 0);
    CHECK(strcmp(key, key2) != 0);
    char scratch[SRV_KEY_CHARS + 1];
    CHECK(srv_key_create(db, "alice", 0, scratch) == -1);
    CHECK(strstr(zse_error_message(), "exists") != NULL);
    CHECK(srv_key_create(db, "bad name", 0, scratch) == -1);
    CHECK(srv_key_create(db, "", 0, scratch) == -1);
    CHECK(srv_key_create(db, "x", -1, scratch) == -1);
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
    CHECK(keys[1].rate_limit == 2);

    /* the keyring: constant-time lookup, disabled keys, limits */
    srv_keyring *kr = srv_keyring_new();
    CHECK(srv_keyring_set(kr, keys, n) == 0);
    char name[SRV_KEY_NAME_MAX + 1];
    srv_rate rate;
    char hdr[128];
    snprintf(hdr, sizeof hdr, "Bearer %s", key);
    CHECK(srv_keyring_check(kr, hdr, 1000, name, &rate) == SRV_AUTH_OK);
    CHECK_EQ_STR(name, "alice");
    CHECK(rate.limit == 0);
    snprintf(hdr, sizeof hdr, "bearer   %s  ", key);
    CHECK(srv_keyring_check(kr, hdr, 1000, name, &rate) == SRV_AUTH_OK);
    CHECK(srv_keyring_check(kr, NULL, 1000, name, &rate) == SRV_AUTH_MISSING);
    CHECK(srv_keyring_check(kr, "Basic abc", 1000, name, &rate) == SRV_AUTH_MISSING);
    CHECK(srv_keyring_check(kr, "Bearer ", 1000, name, &rate) == SRV_AUTH_MISSING);
    CHECK(srv_keyring_check(kr, "Bearer zse-0000", 1000, name, &rate) == SRV_AUTH_UNKNOWN);
    CHECK(name[0] == '\0');
    snprintf(hdr, sizeof hdr, "Bearer %s", key2);
    CHECK(srv_keyring_check(kr, hdr, 1000, name, &rate) == SRV_AUTH_OK && rate.remaining == 1);
    CHECK(srv_keyring_check(kr, hdr, 1001, name, &rate) == SRV_AUTH_OK && rate.remaining == 0);
    CHECK(srv_keyring_check(kr, hdr, 1002, name, &rate) == SRV_AUTH_LIMITED);
    CHECK(rate.retry_after_s == 58 && rate.limit == 2);
    CHECK_EQ_STR(name, "bob");
    /* a reload with the same keys keeps the window's history */
    CHECK(srv_keyring_set(kr, keys, n) == 0);
    CHECK(srv_keyring_check(kr, hdr, 1003, name, &rate) == SRV_AUTH_LIMITED);
    free(keys);

    CHECK(srv_key_set_enabled(db, "alice", false) == 0);
    CHECK(srv_key_set_enabled(db, "nobody", false) == -1);
    CHECK(strstr(zse_error_message(), "no key named 'nobody'") != NULL);
    CHECK(srv_key_set_rate_limit(db, "bob", 5) == 0);
    CHECK(srv_key_list(db, &keys, &n) == 0 && n == 2);
    CHECK(!keys[0].enabled && keys[1].rate_limit == 5);
    CHECK(srv_keyring_set(kr, keys, n) == 0);
    free(keys);
    snprintf(hdr, sizeof hdr, "Bearer %s", key);
    CHECK(srv_keyring_check(kr, hdr, 1004, name, &rate) == SRV_AUTH_DISABLED);
    snprintf(hdr, sizeof hdr, "Bearer %s", key2);
    CHECK(srv_keyring_check(kr, hdr, 1004, name, &rate) == SRV_AUTH_OK); /* a new limit: a new window */
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
    CHECK(srv_key_create(db, "carol", 0, key) == 0);
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
    CHECK(srv_key_create(db, "dave", 0, key2) == 0);
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
    zse_buf out = {0};
    CHECK(srv_metrics_render(m, &st, true, 4, 1, &out) == 0);
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
    CHECK(strstr(t, "zse_queue_depth 3\n") != NULL);
    CHECK(strstr(t, "zse_running_sequences 5\n") != NULL);
    CHECK(strstr(t, "zse_kv_blocks_used 40\n") != NULL);
    CHECK(strstr(t, "zse_kv_blocks_free 60\n") != NULL);
    CHECK(strstr(t, "zse_http_requests_active 4\n") != NULL);
    CHECK(strstr(t, "# TYPE zse_time_per_output_token_seconds histogram\n") != NULL);
    zse_buf_free(&out);
    CHECK(srv_metrics_render(m, NULL, false, 0, 0, &out) == 0);
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
    test_audit();
    test_metrics();
    test_errors();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return test_main_end();
}
