/* Errors in the shapes clients parse: OpenAI's {"error":{...}} and TGI's {"error",
 * "error_type"}; and the duration syntax flags share ("15m", "1h", "7d"). */
#include "server/server.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static void set_param(srv_error *e, const char *param)
{
    param = param ? param : "";
    srv_text_clean(e->param, sizeof e->param, param, strlen(param), 0);
}

int srv_error_set(srv_error *e, int status, const char *type, const char *code, const char *param,
                  const char *fmt, ...)
{
    e->status = status;
    e->type = type;
    e->code = code;
    e->retry_after = 0;
    set_param(e, param);
    /* formatted in full first, then made valid UTF-8 and cut on a character boundary: a
     * message quoting a client's bytes ("Unknown request URL: GET /\xff") must still
     * encode as JSON, or the client would get no answer at all */
    char full[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(full, sizeof full, fmt, ap);
    va_end(ap);
    srv_text_clean(e->message, sizeof e->message, full, strlen(full), 0);
    return -1;
}

int srv_error_invalid(srv_error *e, const char *param, const char *fmt, ...)
{
    char msg[2048];     /* whole, so the cut below lands on a character boundary */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return srv_error_set(e, 400, "invalid_request_error", NULL, param, "%s", msg);
}

static char *dump_and_free(json_t *j)
{
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!s)
        zse_fail("out of memory formatting an error");
    return s;
}

char *srv_error_openai_json(const srv_error *e)
{
    json_t *inner = json_pack("{s:s, s:s, s:o, s:o}", "message", e->message, "type",
                              e->type ? e->type : "server_error", "param",
                              e->param[0] ? json_string(e->param) : json_null(), "code",
                              e->code ? json_string(e->code) : json_null());
    return dump_and_free(inner ? json_pack("{s:o}", "error", inner) : NULL);
}

/* TGI's error_type vocabulary: validation, generation, overloaded, incomplete_generation */
static const char *tgi_type(const srv_error *e)
{
    if (e->status == 429 || e->status == 503)
        return "overloaded";
    if (e->status == 400 || e->status == 413 || e->status == 422)
        return "validation";
    if (e->status == 401)
        return "authentication";
    if (e->status == 404)
        return "not_found";
    return "generation";
}

char *srv_error_tgi_json(const srv_error *e)
{
    return dump_and_free(json_pack("{s:s, s:s}", "error", e->message, "error_type", tgi_type(e)));
}

bool srv_parse_duration(const char *s, double *seconds)
{
    if (!s || !*s)
        return false;
    size_t n = strlen(s);
    double unit = 1;
    char last = s[n - 1];
    if (last == 's' || last == 'm' || last == 'h' || last == 'd' || last == 'w') {
        unit = last == 's' ? 1 : last == 'm' ? 60 : last == 'h' ? 3600 : last == 'd' ? 86400 : 604800;
        n--;
    }
    char num[32];
    if (n == 0 || n >= sizeof num)
        return false;
    memcpy(num, s, n);
    num[n] = '\0';
    double v;
    if (!zse_parse_f64(num, &v) || v < 0 || v > 1e12)
        return false;
    *seconds = v * unit;
    return true;
}
