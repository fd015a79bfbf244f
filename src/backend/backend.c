/* Backend selection by device name. */
#include "backend/backend.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

bool zse_backend_cuda_available(void)
{
#ifdef ZSE_HAVE_CUDA
    return zse_cuda_device_count() > 0;
#else
    return false;
#endif
}

int zse_backend_gpu_count(void)
{
#ifdef ZSE_HAVE_CUDA
    return zse_cuda_device_count();
#else
    return 0;
#endif
}

int zse_backend_gpu_info(int index, zse_gpu_info *out)
{
#ifdef ZSE_HAVE_CUDA
    return zse_cuda_device_info(index, out);
#else
    (void)index;
    (void)out;
    return zse_fail("this zse was built without CUDA");
#endif
}

const char *zse_backend_gpu_absence(void)
{
#ifdef ZSE_HAVE_CUDA
    /* without the kernel module the runtime's own words ("driver version is insufficient")
     * mislead: say what is missing */
    if (access("/proc/driver/nvidia/version", F_OK) != 0)
        return "no NVIDIA driver is loaded (/proc/driver/nvidia/version is absent)";
    return zse_cuda_absence();
#else
    return "this zse was built without CUDA (nvcc was not found, or -DZSE_CUDA=OFF)";
#endif
}

zse_backend *zse_backend_create(const char *device, int threads)
{
    if (!device)
        device = zse_backend_cuda_available() ? "cuda" : "cpu";
    if (strcmp(device, "cpu") == 0)
        return zse_cpu_backend_create(threads);
    if (strncmp(device, "cuda", 4) == 0) {
        int index = 0;
        if (device[4] == ':' && sscanf(device + 5, "%d", &index) != 1) {
            zse_fail("bad device '%s' (use cpu, cuda or cuda:N)", device);
            return NULL;
        }
        if (device[4] != '\0' && device[4] != ':') {
            zse_fail("unknown device '%s' (use cpu, cuda or cuda:N)", device);
            return NULL;
        }
#ifdef ZSE_HAVE_CUDA
        if (index < 0 || index >= zse_cuda_device_count()) {
            zse_fail("device %s is not present (%d CUDA devices found)", device, zse_cuda_device_count());
            return NULL;
        }
        return zse_cuda_backend_create(index);
#else
        (void)index;
        zse_fail("this zse was built without CUDA; rebuild where nvcc is installed or use --device cpu");
        return NULL;
#endif
    }
    zse_fail("unknown device '%s' (use cpu, cuda or cuda:N)", device);
    return NULL;
}

void zse_backend_destroy(zse_backend *be)
{
    if (be)
        be->ops->destroy(be);
}
