/* The web dashboard: its files (compiled in from src/server/dashboard/ by
 * cmake/embed_assets.cmake), the headers that confine them, and GET /ui/session, which
 * tells the page who its key is and what is served.
 *
 * The page is plain HTML, CSS and JavaScript written for zse (no third-party code, nothing
 * fetched from elsewhere). It keeps the API key in the tab's sessionStorage and sends it as
 * "Authorization: Bearer", never as a cookie, so another site cannot make a browser call the
 * API (or the admin routes) with it: cross-site requests carry no such header, and a
 * preflight for one is answered only with --cors. The Content-Security-Policy allows
 * scripts, styles and fetches from this origin only and no inline code, so text a client
 * put in the audit log cannot run even if the page mishandled it (it writes every text
 * with textContent, never as markup). */
#include "server/server.h"

#include <string.h>

const char *const srv_dashboard_headers[][2] = {
    {"Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
     "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"},
    {"X-Content-Type-Options", "nosniff"},
    {"X-Frame-Options", "DENY"},
    {"Referrer-Policy", "no-referrer"},
    {"Cache-Control", "no-cache"},
};
const size_t srv_dashboard_n_headers = sizeof srv_dashboard_headers / sizeof srv_dashboard_headers[0];

const srv_asset *srv_dashboard_asset(const char *url)
{
    for (size_t i = 0; i < srv_dashboard_n_assets; i++)
        if (strcmp(srv_dashboard_assets[i].path, url) == 0)
            return &srv_dashboard_assets[i];
    return NULL;
}

static json_t *model_json(const zse_model *m, const char *model_id)
{
    zse_model_info info;
    zse_model_get_info(m, &info);
    return json_pack("{s:s, s:s?, s:s?, s:s?, s:i, s:i, s:i, s:i, s:b}", "id", model_id, "arch", info.arch, "quant",
                     info.quant, "device", info.device, "ctx_size", info.ctx_size, "n_layers", info.n_layers,
                     "hidden_size", info.hidden_size, "vocab_size", info.vocab_size, "chat_template",
                     info.has_chat_template);
}

json_t *srv_dashboard_session(const zse_model *m, const char *model_id, long long started, bool ready, bool auth,
                              const char *key, bool admin)
{
    bool named = key && key[0];
    json_t *model = m ? model_json(m, model_id) : json_null();
    if (!model)
        return NULL;
    /* without --auth there is no key and no admin: keys are managed with --auth only */
    return json_pack("{s:b, s:s?, s:s?, s:b, s:s, s:I, s:o}", "auth", auth, "key", named ? key : NULL, "role",
                     named ? (admin ? "admin" : "user") : NULL, "ready", ready, "version", zse_version(),
                     "started", (json_int_t)started, "model", model);
}
