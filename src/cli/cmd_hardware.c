/* zse hardware — what this machine offers for inference, and (--fit) what a model needs of it. */
#include "cli/cli.h"

#include "backend/backend.h"
#include "util/util.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

const char cmd_hardware_summary[] = "show CPU features, cores, memory and GPUs; --fit MODEL.zse: what fits where";

static void usage(FILE *out)
{
    fprintf(out, "usage: zse hardware [--fit MODEL.zse] [--json]\n\n"
                 "Prints CPU features, physical cores, memory and every GPU (name, memory, compute\n"
                 "capability, driver). With --fit, for each GPU and the CPU: how the model runs there\n"
                 "(resident; on a GPU too small, with its experts in host memory or layers streamed\n"
                 "from it, and how many) and the longest context it gets with an f16 or an int8 KV\n"
                 "cache; a GPU that cannot run it at all says the least memory that would.\n\n"
                 "  --fit MODEL.zse   what fits where (also: zse info MODEL.zse --fit)\n"
                 "  --json            machine-readable output\n");
}

static void print_cpu_flags(void)
{
    __builtin_cpu_init();
    printf("cpu features:   ");
    if (__builtin_cpu_supports("avx2")) printf(" avx2");
    if (__builtin_cpu_supports("fma")) printf(" fma");
    if (__builtin_cpu_supports("f16c")) printf(" f16c");
    if (__builtin_cpu_supports("avx512f")) printf(" avx512f");
    if (__builtin_cpu_supports("avx512bw")) printf(" avx512bw");
    if (__builtin_cpu_supports("avx512vnni")) printf(" avx512vnni");
    printf("\n");
}

/* the NVIDIA kernel driver's version ("580.65.06"), from the module's own report */
static void nvidia_driver(char *out, size_t n)
{
    snprintf(out, n, "unknown");
    FILE *fp = fopen("/proc/driver/nvidia/version", "r");
    char line[512];
    if (fp && fgets(line, sizeof line, fp)) {
        const char *k = strstr(line, "Kernel Module");
        char v[64];
        if (k && sscanf(k + strlen("Kernel Module"), " %63s", v) == 1)
            snprintf(out, n, "%s", v);
    }
    if (fp)
        fclose(fp);
}

static json_t *gpus(bool as_json)
{
    json_t *arr = as_json ? json_array() : NULL;
    int n = zse_backend_gpu_count();
    char driver[64];
    nvidia_driver(driver, sizeof driver);
    for (int i = 0; i < n; i++) {
        zse_gpu_info g;
        if (zse_backend_gpu_info(i, &g) != 0) {
            if (as_json)
                json_array_append_new(arr, json_pack("{s:i, s:s}", "index", i, "error", zse_error_message()));
            else
                printf("gpu %d:          %s\n", i, zse_error_message());
            continue;
        }
        int dv = g.cuda_driver_version, rv = g.cuda_runtime_version;
        char cc[16], cd[16], cr[16];
        snprintf(cc, sizeof cc, "%d.%d", g.cc_major, g.cc_minor);
        snprintf(cd, sizeof cd, "%d.%d", dv / 1000, dv % 1000 / 10);
        snprintf(cr, sizeof cr, "%d.%d", rv / 1000, rv % 1000 / 10);
        if (as_json) {
            json_array_append_new(arr, json_pack("{s:i, s:s, s:I, s:o, s:s, s:i, s:s, s:s, s:s}", "index", i, "name",
                                                 g.name, "memory_bytes", (json_int_t)g.total_bytes, "free_bytes",
                                                 g.free_known ? json_integer((json_int_t)g.free_bytes) : json_null(),
                                                 "compute_capability", cc, "sm_count", g.sm_count, "driver", driver,
                                                 "cuda_driver", cd, "cuda_runtime", cr));
            continue;
        }
        printf("gpu %d:          %s, %.1f GiB", i, g.name, (double)g.total_bytes / (1024.0 * 1024 * 1024));
        if (g.free_known)
            printf(" (%.1f GiB free)", (double)g.free_bytes / (1024.0 * 1024 * 1024));
        printf(", compute capability %s, %d SMs\n", cc, g.sm_count);
        printf("                driver %s (CUDA %s), zse built with CUDA %s\n", driver, cd, cr);
    }
    if (n == 0 && !as_json)
        printf("gpus:           none (%s)\n", zse_backend_gpu_absence());
    return arr;
}

int cmd_hardware(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *fit = NULL;
    bool as_json = false;
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a)) {
        if (cli_is(&a, NULL, "--fit"))
            fit = cli_value(&a);
        else if (cli_is(&a, NULL, "--json"))
            as_json = true;
        else
            return cli_unknown(&a);
    }
    if (a.failed)
        return 2;
    if (fit)
        return cli_print_fit(fit, as_json);
    long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
    double mem = (double)pages * (double)psize / (1024.0 * 1024 * 1024);
    if (as_json) {
        json_t *o = json_pack("{s:i, s:I, s:f, s:o}", "physical_cores", zse_physical_cores(), "logical_cpus",
                              (json_int_t)sysconf(_SC_NPROCESSORS_ONLN), "memory_gib", mem, "gpus", gpus(true));
        if (zse_backend_gpu_count() == 0)
            json_object_set_new(o, "no_gpu", json_string(zse_backend_gpu_absence()));
        char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        if (s)
            printf("%s\n", s);
        free(s);
        json_decref(o);
        return 0;
    }
    printf("physical cores: %d\n", zse_physical_cores());
    printf("logical cpus:   %ld\n", sysconf(_SC_NPROCESSORS_ONLN));
    printf("memory:         %.1f GiB\n", mem);
    print_cpu_flags();
    gpus(false);
    return 0;
}
