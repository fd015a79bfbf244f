/* open.c — a tokenizer from where models keep one: an HF directory (tokenizer.json and
 * tokenizer_config.json), a .zse file, or a .gguf file (by its magic). */
#include "tokenizer/tokenizer_internal.h"

zse_tokenizer *zse_tokenizer_from_dir(const char *dir)
{
    char *path = zse_path_join(dir, "tokenizer.json");
    char *cfg_path = zse_path_join(dir, "tokenizer_config.json");
    zse_tokenizer *t = NULL;
    size_t len;
    char *text = path ? zse_read_file(path, &len) : NULL;
    json_t *cfg = NULL;
    if (text && cfg_path && zse_file_exists(cfg_path)) {
        json_error_t err;
        cfg = json_load_file(cfg_path, JSON_DECODE_INT_AS_REAL, &err); /* model_max_length can be 1e30 */
        if (!cfg)
            zse_log(ZSE_LOG_WARN, "%s: %s (line %d); bos/eos come from tokenizer.json alone", cfg_path, err.text,
                    err.line);
    }
    if (text) {
        t = zse_tokenizer_from_json(text, len, cfg);
        if (!t)
            zse_error_prefix("%s", path);
    }
    json_decref(cfg);
    free(text);
    free(path);
    free(cfg_path);
    return t;
}

zse_tokenizer *zse_tokenizer_from_zse(const zse_file *f)
{
    size_t len;
    const char *json = zse_file_tokenizer_json(f, &len);
    if (!json)
        return NULL;
    zse_tokenizer *t = zse_tokenizer_from_json(json, len, zse_file_tokenizer_config(f));
    if (!t)
        zse_error_prefix("%s", zse_file_path(f));
    return t;
}

zse_tokenizer *zse_tokenizer_open(const char *path)
{
    if (zse_file_exists(path)) {
        /* a GGUF file by its magic, whatever its name */
        char magic[4] = {0};
        FILE *fp = fopen(path, "rb");
        size_t got = fp ? fread(magic, 1, 4, fp) : 0;
        if (fp)
            fclose(fp);
        if (got == 4 && memcmp(magic, "GGUF", 4) == 0)
            return zse_tokenizer_from_gguf(path);
        zse_file *f = zse_file_open(path);
        if (!f)
            return NULL;
        zse_tokenizer *t = zse_tokenizer_from_zse(f);
        zse_file_close(f);
        return t;
    }
    return zse_tokenizer_from_dir(path);
}
