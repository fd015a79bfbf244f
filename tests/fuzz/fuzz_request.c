/* libFuzzer target: arbitrary bytes as the body of a chat, completions or TGI request (the
 * first byte picks which). Parsing must end in a request or an error naming a field; never
 * a crash, a leak or a hang. */
#include "server/server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    static const srv_model_facts facts = {"tiny", 2048, 2048, 0, true, NULL, 0};
    srv_api api = data[0] % 3 == 0 ? SRV_API_CHAT : data[0] % 3 == 1 ? SRV_API_COMPLETION : SRV_API_TGI;
    srv_request r;
    srv_error e;
    if (srv_request_parse(api, (const char *)data + 1, size - 1, &facts, &r, &e) == 0)
        srv_request_free(&r);
    return 0;
}
