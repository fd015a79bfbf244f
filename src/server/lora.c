/* LoRA adapters in the API: a request's adapter by OpenAI `model` or TGI/LoRAX `adapter_id`,
 * the adapters in /v1/models (with `parent`), vLLM's /v1/load_lora_adapter and
 * /v1/unload_lora_adapter, and the adapter tiers' metrics. The engine does the rest
 * (src/engine/lora.c): this file only names and counts. */
#include "server/server.h"

#include <stdio.h>
#include <string.h>

/* the names a request may use, for a 404: "a, b, c" (at most 40, then how many more) */
static void list_names(zse_model *m, char *out, size_t cap)
{
    size_t n = 0;
    char **names = zse_adapter_list(m, &n);
    zse_buf b = {0};
    for (size_t i = 0; names && i < n; i++) {
        if (i < 40)
            zse_buf_printf(&b, "%s'%s'", i ? ", " : "", names[i]);
        zse_free(names[i]);
    }
    if (n > 40)
        zse_buf_printf(&b, " and %zu more", n - 40);
    zse_free(names);
    snprintf(out, cap, "%s", n ? zse_buf_str(&b) : "none");
    zse_buf_free(&b);
}

int srv_request_adapter(srv_request *r, zse_model *m, const srv_model_facts *mf, srv_error *e)
{
    if (!r->adapter_id)
        return 0;
    const bool tgi = r->api == SRV_API_TGI;
    zse_adapter *a = zse_adapter_get(m, r->adapter_id);
    if (!a) {
        char why[ZSE_ERROR_MAX];
        snprintf(why, sizeof why, "%s", zse_last_error());
        if (!strstr(why, "no adapter named"))
            return srv_error_set(e, 400, tgi ? "validation" : "invalid_request_error", "adapter_invalid",
                                 tgi ? "parameters.adapter_id" : "model", "%s", why);
        char names[400];
        list_names(m, names, sizeof names);
        return srv_error_set(e, 404, tgi ? "not_found" : "invalid_request_error",
                             tgi ? "adapter_not_found" : "model_not_found", tgi ? "parameters.adapter_id" : "model",
                             "The %s '%s' does not exist: this server serves the model '%s' and the LoRA adapters %s",
                             tgi ? "adapter" : "model", r->adapter_id, mf->name, names);
    }
    r->adapter = a;
    r->sampling.adapter = a;
    return 0;
}

static json_t *adapter_object(const char *name, const srv_model_facts *mf, long long created)
{
    return json_pack("{s:s, s:s, s:I, s:s, s:s, s:i}", "id", name, "object", "model", "created", (json_int_t)created,
                     "owned_by", "zse", "parent", mf->name, "max_model_len", mf->ctx_size);
}

int srv_lora_models(zse_model *m, const srv_model_facts *mf, long long created, json_t *data)
{
    size_t n = 0;
    char **names = zse_adapter_list(m, &n);
    if (!names)
        return -1;
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        if (rc == 0 && strcmp(names[i], mf->name) != 0)
            rc = json_array_append_new(data, adapter_object(names[i], mf, created));
        zse_free(names[i]);
    }
    zse_free(names);
    return rc;
}

json_t *srv_lora_model(zse_model *m, const srv_model_facts *mf, long long created, const char *id)
{
    zse_adapter *a = mf->adapters ? zse_adapter_get(m, id) : NULL;
    if (!a)
        return NULL;
    json_t *o = adapter_object(zse_adapter_name(a), mf, created);
    zse_adapter_release(a);
    return o;
}

/* the body of a load/unload request: an object with lora_name (and lora_path) and nothing
 * this server would ignore */
static json_t *admin_body(const char *body, size_t len, bool load, const char **name, const char **path, srv_error *e)
{
    json_error_t err;
    json_t *o = json_loadb(body, len, 0, &err);
    if (!json_is_object(o)) {
        json_decref(o);
        srv_error_invalid(e, NULL, "the body must be a JSON object with lora_name%s", load ? " and lora_path" : "");
        return NULL;
    }
    /* vLLM's fields; load_inplace only false (replacing a loaded adapter is unload, then load) */
    static const char *const load_fields[] = {"lora_name", "lora_path", "load_inplace", NULL};
    static const char *const unload_fields[] = {"lora_name", NULL};
    if (srv_check_fields(o, load ? load_fields : unload_fields, "",
                         load ? "/v1/load_lora_adapter" : "/v1/unload_lora_adapter", e)) {
        json_decref(o);
        return NULL;
    }
    json_t *inplace = json_object_get(o, "load_inplace");
    if (inplace && !json_is_null(inplace) && !json_is_boolean(inplace)) {
        srv_error_invalid(e, "load_inplace", "'load_inplace' must be true or false");
        json_decref(o);
        return NULL;
    }
    if (json_is_true(inplace)) {
        srv_error_invalid(e, "load_inplace", "'load_inplace': true is not supported: unload the adapter first, then "
                                             "load it again");
        json_decref(o);
        return NULL;
    }
    *name = json_string_value(json_object_get(o, "lora_name"));
    *path = json_string_value(json_object_get(o, "lora_path"));
    if (!*name || !**name || (load && (!*path || !**path))) {
        srv_error_invalid(e, !*name || !**name ? "lora_name" : "lora_path", "'%s' must be a non-empty string",
                          !*name || !**name ? "lora_name" : "lora_path");
        json_decref(o);
        return NULL;
    }
    return o;
}

int srv_lora_load(zse_model *m, const srv_model_facts *mf, const char *body, size_t len, char **message, srv_error *e)
{
    const char *name, *path;
    json_t *o = admin_body(body, len, true, &name, &path, e);
    if (!o)
        return -1;
    int rc = 0;
    if (strcmp(name, mf->name) == 0) {
        rc = srv_error_invalid(e, "lora_name", "'%s' is the base model's name", name);
    } else if (zse_adapter_register(m, name, path, 1.0f) != 0) {
        rc = srv_error_set(e, 400, "invalid_request_error", strstr(zse_last_error(), "already") ? "adapter_exists" : "adapter_invalid",
                           "lora_path", "%s", zse_last_error());
    } else {
        zse_buf b = {0};
        zse_buf_printf(&b, "Success: LoRA adapter '%s' added successfully.", name);
        *message = b.data;
        rc = b.data ? 0 : srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    }
    json_decref(o);
    return rc;
}

int srv_lora_unload(zse_model *m, const char *body, size_t len, char **message, srv_error *e)
{
    const char *name, *path;
    json_t *o = admin_body(body, len, false, &name, &path, e);
    if (!o)
        return -1;
    int rc = 0;
    if (zse_adapter_unregister(m, name) != 0) {
        rc = srv_error_set(e, 404, "invalid_request_error", "adapter_not_found", "lora_name",
                           "The LoRA adapter '%s' cannot be found", name);
    } else {
        zse_buf b = {0};
        zse_buf_printf(&b, "Success: LoRA adapter '%s' removed successfully.", name);
        *message = b.data;
        rc = b.data ? 0 : srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    }
    json_decref(o);
    return rc;
}

int srv_lora_metrics(zse_model *m, zse_buf *out)
{
    zse_adapter_stats st;
    zse_adapter_get_stats(m, &st);
    if (!st.slots)
        return 0;
    int rc = 0;
    rc |= zse_buf_printf(out,
                         "# HELP zse_lora_slots Adapter slots (--max-gpu-loras) and host slots (--max-cpu-loras).\n"
                         "# TYPE zse_lora_slots gauge\n"
                         "zse_lora_slots{tier=\"slot\"} %d\nzse_lora_slots{tier=\"host\"} %d\n",
                         st.slots, st.host_slots);
    rc |= zse_buf_printf(out,
                         "# HELP zse_lora_adapters Adapters each tier holds now; registered: every name known.\n"
                         "# TYPE zse_lora_adapters gauge\n"
                         "zse_lora_adapters{tier=\"slot\"} %d\nzse_lora_adapters{tier=\"host\"} %d\n"
                         "zse_lora_adapters{tier=\"registered\"} %d\n"
                         "# HELP zse_lora_adapters_pinned Adapters running sequences use (never evicted).\n"
                         "# TYPE zse_lora_adapters_pinned gauge\nzse_lora_adapters_pinned %d\n",
                         st.in_slots, st.in_host, st.registered, st.pinned);
    rc |= zse_buf_printf(out,
                         "# HELP zse_lora_hits_total Requests by the tier their adapter was found in.\n"
                         "# TYPE zse_lora_hits_total counter\n"
                         "zse_lora_hits_total{tier=\"slot\"} %llu\nzse_lora_hits_total{tier=\"host\"} %llu\n"
                         "zse_lora_hits_total{tier=\"disk\"} %llu\n",
                         (unsigned long long)st.hits_slot, (unsigned long long)st.hits_host,
                         (unsigned long long)st.hits_disk);
    rc |= zse_buf_printf(out,
                         "# HELP zse_lora_loads_total Adapters loaded into a tier: host (read from disk), slot "
                         "(copied from host).\n# TYPE zse_lora_loads_total counter\n"
                         "zse_lora_loads_total{tier=\"host\"} %llu\nzse_lora_loads_total{tier=\"slot\"} %llu\n"
                         "# HELP zse_lora_load_seconds_total Time spent loading adapters into each tier.\n"
                         "# TYPE zse_lora_load_seconds_total counter\n"
                         "zse_lora_load_seconds_total{tier=\"host\"} %.6f\nzse_lora_load_seconds_total{tier=\"slot\"} %.6f\n",
                         (unsigned long long)st.loads_host, (unsigned long long)st.loads_slot, st.load_host_seconds,
                         st.load_slot_seconds);
    rc |= zse_buf_printf(out,
                         "# HELP zse_lora_evictions_total Adapters evicted from a tier (least recently used, never "
                         "one in use).\n# TYPE zse_lora_evictions_total counter\n"
                         "zse_lora_evictions_total{tier=\"slot\"} %llu\nzse_lora_evictions_total{tier=\"host\"} %llu\n"
                         "# HELP zse_lora_load_failures_total Adapter loads that failed (missing or bad files).\n"
                         "# TYPE zse_lora_load_failures_total counter\nzse_lora_load_failures_total %llu\n",
                         (unsigned long long)st.evictions_slot, (unsigned long long)st.evictions_host,
                         (unsigned long long)st.failures);
    rc |= zse_buf_printf(out,
                         "# HELP zse_lora_waits_total Requests that waited for their adapter to reach a slot.\n"
                         "# TYPE zse_lora_waits_total counter\nzse_lora_waits_total %llu\n"
                         "# HELP zse_lora_wait_seconds_total Time those requests waited, in all.\n"
                         "# TYPE zse_lora_wait_seconds_total counter\nzse_lora_wait_seconds_total %.6f\n",
                         (unsigned long long)st.waits, st.wait_seconds);
    return rc ? -1 : 0;
}
