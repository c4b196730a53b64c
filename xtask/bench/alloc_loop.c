/* The C workload of `cargo xtask bench`: `free(malloc(64))` in a loop, the cheapest allocator call pair glibc
 * has (a tcache hit), so the time measured is almost all probe cost.
 *
 * Both tracers the bench runs it under start it only once their probes are attached. It times only its loop,
 * with a monotonic clock, because the tracers differ in how long they take to start and to detach, and that
 * must not count; it prints `elapsed_ns=N ops=N` on stderr, ops being the allocator calls the loop made. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: alloc_loop ITERATIONS\n");
        return 2;
    }
    long iterations = atol(argv[1]);
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < iterations; i++) {
        void *block = malloc(64);
        /* GCC drops a malloc/free pair whose block is never used: make it look used. */
        __asm__ volatile("" : : "r"(block) : "memory");
        free(block);
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    long long elapsed = (end.tv_sec - start.tv_sec) * 1000000000LL + (end.tv_nsec - start.tv_nsec);
    fprintf(stderr, "elapsed_ns=%lld ops=%ld\n", elapsed, 2 * iterations);
    return 0;
}
