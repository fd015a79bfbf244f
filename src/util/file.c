/* File mapping, whole-file reads, paths and SHA-256 of files. */
#include "util/util.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int zse_map_open(zse_map *m, const char *path)
{
    memset(m, 0, sizeof *m);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return zse_fail("cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return zse_fail("cannot stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return zse_fail("%s is not a regular file", path);
    }
    m->path = zse_strdup(path);
    if (!m->path) {
        close(fd);
        return -1;
    }
    m->size = (size_t)st.st_size;
    if (m->size > 0) {
        void *p = mmap(NULL, m->size, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            free(m->path);
            m->path = NULL;
            return zse_fail("cannot map %s: %s", path, strerror(e));
        }
        m->data = p;
    }
    close(fd); /* the mapping keeps the file alive */
    return 0;
}

void zse_map_close(zse_map *m)
{
    if (m->data)
        munmap((void *)m->data, m->size);
    free(m->path);
    memset(m, 0, sizeof *m);
}

char *zse_read_file(const char *path, size_t *size_out)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        zse_fail("cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    zse_buf b = {0};
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (zse_buf_append(&b, chunk, n) != 0) {
            fclose(f);
            zse_buf_free(&b);
            return NULL;
        }
    }
    if (ferror(f)) {
        zse_fail("cannot read %s: %s", path, strerror(errno));
        fclose(f);
        zse_buf_free(&b);
        return NULL;
    }
    fclose(f);
    if (!b.data && zse_buf_reserve(&b, 0) != 0)
        return NULL;
    b.data[b.len] = '\0';
    if (size_out)
        *size_out = b.len;
    return b.data;
}

bool zse_file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

char *zse_path_join(const char *dir, const char *name)
{
    zse_buf b = {0};
    size_t dl = strlen(dir);
    if (zse_buf_puts(&b, dir) != 0)
        return NULL;
    if (dl && dir[dl - 1] != '/' && zse_buf_puts(&b, "/") != 0) {
        zse_buf_free(&b);
        return NULL;
    }
    if (zse_buf_puts(&b, name) != 0) {
        zse_buf_free(&b);
        return NULL;
    }
    return b.data;
}

int zse_sha256_file(const char *path, char out_hex[65])
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return zse_fail("cannot open %s: %s", path, strerror(errno));
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        fclose(f);
        EVP_MD_CTX_free(ctx);
        return zse_fail("cannot initialise SHA-256");
    }
    static _Thread_local unsigned char chunk[1 << 20];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        EVP_DigestUpdate(ctx, chunk, n);
    int bad = ferror(f);
    fclose(f);
    unsigned char md[32];
    unsigned int mdlen = 0;
    EVP_DigestFinal_ex(ctx, md, &mdlen);
    EVP_MD_CTX_free(ctx);
    if (bad)
        return zse_fail("cannot read %s", path);
    for (int i = 0; i < 32; i++)
        snprintf(out_hex + 2 * i, 3, "%02x", md[i]);
    return 0;
}
