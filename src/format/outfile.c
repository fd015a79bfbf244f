/* The output file of zse convert and zse convert-adapter.
 *
 * Written as an anonymous file (O_TMPFILE) in OUT's directory and given its name only
 * when complete, so nothing is left behind even if the process is killed outright; where
 * the filesystem lacks O_TMPFILE, a named temp file OUT.tmp.PID that every failure path
 * removes. Without --force the name is given with link(), which fails rather than
 * replace a file that appeared meanwhile. */
#include "format/format.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return zse_strdup(".");
    return slash == path ? zse_strdup("/") : zse_strndup(path, (size_t)(slash - path));
}

static char *temp_name(const char *out_path)
{
    zse_buf b = {0};
    if (zse_buf_printf(&b, "%s.tmp.%d", out_path, (int)getpid()) != 0)
        return NULL;
    return b.data;
}

int zse_out_create(zse_out_file *f, const char *out_path)
{
    f->fd = -1;
    f->tmp = NULL;
    if (!(f->dir = dir_of(out_path)))
        return -1;
    f->fd = open(f->dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
    if (f->fd >= 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
        return zse_fail("cannot create %s in %s: %s", out_path, f->dir, strerror(errno));
    if (!(f->tmp = temp_name(out_path)))
        return -1;
    f->fd = open(f->tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (f->fd < 0)
        return zse_fail("cannot create %s: %s", f->tmp, strerror(errno));
    return 0;
}

/* gives the anonymous file the name `name` */
static int out_link(zse_out_file *f, const char *name)
{
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", f->fd);
    if (linkat(AT_FDCWD, proc, AT_FDCWD, name, AT_SYMLINK_FOLLOW) == 0 ||
        linkat(f->fd, "", AT_FDCWD, name, AT_EMPTY_PATH) == 0)
        return 0;
    return zse_fail(errno == EEXIST ? "%s already exists; pass --force to overwrite it"
                                    : "cannot create %s: %s", name, strerror(errno));
}

int zse_out_commit(zse_out_file *f, const char *out_path, bool force)
{
    int rc = 0;
    if (!f->tmp && !force) {
        rc = out_link(f, out_path);
    } else {
        if (!f->tmp && (!(f->tmp = temp_name(out_path)) || out_link(f, f->tmp) != 0))
            return -1;
        if (force ? rename(f->tmp, out_path) != 0 : link(f->tmp, out_path) != 0)
            rc = zse_fail(errno == EEXIST ? "%s already exists; pass --force to overwrite it"
                                          : "cannot create %s: %s", out_path, strerror(errno));
        unlink(f->tmp); /* after a rename it is gone already; after a link, the extra name */
    }
    if (rc == 0) {
        /* the new directory entry itself must reach the disk */
        int dfd = open(f->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
    }
    return rc;
}

void zse_out_close(zse_out_file *f, bool remove_tmp)
{
    if (f->fd >= 0)
        close(f->fd);
    if (remove_tmp && f->tmp)
        unlink(f->tmp);
    free(f->tmp);
    free(f->dir);
    f->fd = -1;
    f->tmp = NULL;
    f->dir = NULL;
}
