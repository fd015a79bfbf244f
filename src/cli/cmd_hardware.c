/* zse hardware — what this machine offers for inference. */
#include "cli/cli.h"

#include "util/util.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

const char cmd_hardware_summary[] = "show CPU features, cores, memory and GPUs";

static void print_cpu_flags(void)
{
    __builtin_cpu_init();
    printf("cpu features:");
    if (__builtin_cpu_supports("avx2")) printf(" avx2");
    if (__builtin_cpu_supports("fma")) printf(" fma");
    if (__builtin_cpu_supports("f16c")) printf(" f16c");
    if (__builtin_cpu_supports("avx512f")) printf(" avx512f");
    if (__builtin_cpu_supports("avx512bw")) printf(" avx512bw");
    if (__builtin_cpu_supports("avx512vnni")) printf(" avx512vnni");
    printf("\n");
}

int cmd_hardware(int argc, char **argv)
{
    if (cli_wants_help(argc, argv)) {
        printf("usage: zse hardware\n\nPrints CPU features, physical cores and memory.\n");
        return 0;
    }
    cli_args a = cli_begin(argc, argv);
    while (cli_next(&a))
        return cli_unknown(&a);
    long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
    printf("physical cores: %d\n", zse_physical_cores());
    printf("logical cpus:   %ld\n", sysconf(_SC_NPROCESSORS_ONLN));
    printf("memory:         %.1f GiB\n", (double)pages * (double)psize / (1024.0 * 1024 * 1024));
    print_cpu_flags();
    return 0;
}
