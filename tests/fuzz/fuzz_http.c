/* libFuzzer target: the HTTP request path end to end — libmicrohttpd's parser, the framing
 * checks (Content-Length / Transfer-Encoding / Host), routing, API keys, body buffering,
 * request parsing and preparation on the workers, fair admission, rendering and the
 * answer — over a fake connection: the input is written into one end of a socketpair
 * whose other end is handed to a server that has no listening socket. The engine is
 * scripted (each sequence gets one token and ends, on the admission thread), so every
 * input finishes quickly. Whatever the bytes, the server must answer or close, never
 * crash, hang or leak.
 *
 * The model is tests/fixtures/tiny-llama (ZSE_FUZZ_TOKENIZER names its folder; fuzz_model.h),
 * converted once into a temporary file. Requests may carry "Authorization: Bearer zse-fuzz-key" to
 * pass --auth (the seed corpus does). */
#include "format/format.h"
#include "fuzz_model.h"
#include "server/server.h"

#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define KEY "zse-fuzz-key"

static srv_server *server;
static uint64_t next_id;

/* the scripted engine: one token, then the end, before submit returns */
static int fake_submit(void *ctx, const char *tenant, const int32_t *prompt, size_t n, const zse_sampling *s,
                       int priority, zse_token_cb cb, void *user, uint64_t *id)
{
    (void)ctx;
    (void)tenant;
    (void)priority;
    *id = ++next_id;
    int32_t top[2] = {prompt[0], prompt[n - 1]};
    float top_lp[2] = {-0.5f, -1.5f};
    zse_token_event ev = {.token = prompt[n - 1], .text = "x", .logprob = -0.5f,
                          .n_top = s->top_logprobs > 2 ? 2 : s->top_logprobs, .top_ids = top, .top_logprobs = top_lp,
                          .prompt_tokens = (int)n, .completion_tokens = 1};
    if (cb(user, &ev)) {
        ev.text = "";
        ev.finish = ZSE_FINISH_LENGTH;
        cb(user, &ev);
    } else {
        zse_token_event end = {.token = -1, .text = "", .finish = ZSE_FINISH_CANCELLED, .prompt_tokens = (int)n,
                               .completion_tokens = 1};
        cb(user, &end);
    }
    return 0;
}

static void fake_cancel(void *ctx, uint64_t id)
{
    (void)ctx;
    (void)id;
}

static void fake_stats(void *ctx, zse_engine_stats *out)
{
    (void)ctx;
    memset(out, 0, sizeof *out);
}

static void start(void)
{
    zse_log_set_level(ZSE_LOG_ERROR);
    zse_model *m = fuzz_load_model("fuzz_http");
    static srv_keyring *kr;
    kr = srv_keyring_new();
    srv_key k = {.name = "fuzz", .enabled = true, .priority = -10};
    srv_key_hash(KEY, strlen(KEY), k.hash);
    if (!kr || srv_keyring_set(kr, &k, 1) != 0)
        abort();
    srv_config c;
    srv_config_default(&c);
    c.listen = false;
    c.model_id = "tiny";
    c.auth = true;
    c.keyring = kr;
    c.log_requests = false;
    c.http_threads = 1;
    c.workers = 1;
    c.max_body = 64 * 1024;
    c.refused_per_min = 0; /* every refusal answered: inputs do not depend on earlier ones */
    c.engine_slots = 4;
    if (!(server = srv_start(&c)))
        abort();
    static srv_engine engine = {NULL, fake_submit, fake_cancel, fake_stats, NULL};
    srv_set_ready(server, m, &engine);
}

/* writes what it can of the input, reading the answer meanwhile so neither side blocks */
static void exchange(int fd, const uint8_t *data, size_t size)
{
    size_t sent = 0;
    bool shut = false;
    double end = zse_now() + 5;
    char buf[65536];
    while (zse_now() < end) {
        if (sent == size && !shut) {
            shutdown(fd, SHUT_WR);
            shut = true;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN | (shut ? 0 : POLLOUT)};
        if (poll(&p, 1, 100) < 0)
            break;
        if (p.revents & POLLIN) {
            ssize_t k = recv(fd, buf, sizeof buf, 0);
            if (k <= 0)
                return; /* the server closed: done */
        }
        if (!shut && (p.revents & POLLOUT)) {
            ssize_t k = send(fd, data + sent, size - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (k > 0)
                sent += (size_t)k;
            else if (k < 0)
                sent = size; /* the server stopped reading (it answered early) */
        }
        if (p.revents & (POLLHUP | POLLERR))
            return;
    }
    fprintf(stderr, "fuzz_http: the server neither answered nor closed within 5 s\n");
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!server)
        start();
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        abort();
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(40000)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (srv_adopt_connection(server, sv[1], (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(sv[0]);
        return 0; /* libmicrohttpd closed sv[1] */
    }
    exchange(sv[0], data, size);
    close(sv[0]);
    /* the request ends on the server's threads; the next input starts after it */
    double end = zse_now() + 5;
    while (srv_active_requests(server) > 0 && zse_now() < end)
        usleep(200);
    return 0;
}
