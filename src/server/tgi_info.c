/* TGI's GET /info: what text-generation-inference reports about the model it serves and
 * its limits, read by text-generation-router clients, huggingface_hub's
 * InferenceClient.get_endpoint_info() and LoRAX tooling. Both the field names of TGI 1.x
 * (max_input_length) and 2.x/3.x (max_input_tokens) are given; every number is this
 * server's own. */
#include "server/server.h"

#include <string.h>

json_t *srv_tgi_info(const zse_model *m, const srv_model_facts *mf, const srv_tgi_limits *lim)
{
    zse_model_info info;
    zse_model_get_info(m, &info);
    json_t *o = json_pack("{s:s, s:n, s:s, s:s, s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:s, s:s, s:n, s:n}",
                          "model_id", mf->name, "model_sha", "model_dtype", info.quant ? info.quant : "",
                          "model_device_type", info.device ? info.device : "cpu", "model_pipeline_tag",
                          "text-generation", "max_concurrent_requests", lim->max_concurrent_requests, "max_best_of",
                          lim->max_best_of, "max_stop_sequences", lim->max_stop_sequences, "max_input_tokens",
                          mf->ctx_size - 1, "max_input_length", mf->ctx_size - 1, "max_total_tokens", mf->ctx_size,
                          "max_batch_size", lim->max_batch_size, "validation_workers", lim->validation_workers,
                          "max_client_batch_size", 1, "router", "zse", "version", zse_version(), "sha",
                          "docker_label");
    if (o && lim->max_batch_total_tokens > 0)
        json_object_set_new(o, "max_batch_total_tokens", json_integer(lim->max_batch_total_tokens));
    return o;
}
