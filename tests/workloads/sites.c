/* Allocation sites whose live bytes are known to the byte. With --wait it prints "ready" and allocates only
 * after a line arrives on stdin (so a tracer can attach by pid first); with --linger it then waits for a second
 * line (or end of input) before exiting, so the trace can end while it still runs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline))

static void *volatile keep[256];
static int kept;

/* 100 x 1000 bytes, all kept: 100000 live. */
NOINLINE void leak_site(void) { for (int i = 0; i < 100; i++) keep[kept++] = malloc(1000); }

/* 10 x calloc(250, 4), all kept: 10000 live. */
NOINLINE void calloc_site(void) { for (int i = 0; i < 10; i++) keep[kept++] = calloc(250, 4); }

/* One 8 MiB block, kept. */
NOINLINE void large_site(void) { keep[kept++] = malloc(8 << 20); }

/* 1000 x 64 bytes, each freed at once: nothing live. */
NOINLINE void freed_site(void) {
    for (int i = 0; i < 1000; i++) {
        void *volatile p = malloc(64);
        free(p);
    }
}

/* 50 x 2048 bytes, every other one freed: 25 blocks, 51200 live of 102400 allocated. */
NOINLINE void half_freed_site(void) {
    void *blocks[50];
    for (int i = 0; i < 50; i++) blocks[i] = malloc(2048);
    for (int i = 0; i < 50; i++) {
        if (i % 2 == 0) free(blocks[i]);
        else keep[kept++] = blocks[i];
    }
}

/* realloc(NULL, 100) then grown to 5000 and kept: the growing call holds 5000 bytes in one block. */
NOINLINE void realloc_site(void) {
    void *p = realloc(NULL, 100);
    keep[kept++] = realloc(p, 5000);
}

static void wait_for_line(void) {
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return;
}

int main(int argc, char **argv) {
    int wait = 0, linger = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--wait")) wait = 1;
        if (!strcmp(argv[i], "--linger")) linger = 1;
    }
    if (wait) {
        printf("ready\n");
        fflush(stdout);
        wait_for_line();
    }
    leak_site();
    calloc_site();
    large_site();
    freed_site();
    half_freed_site();
    realloc_site();
    if (linger) {
        printf("allocated\n");
        fflush(stdout);
        wait_for_line();
    }
    return 0;
}
