/* Sites built to earn each verdict over about 3 seconds: a leak (one block every 50 ms, never freed), a
 * lingering object (4 MiB kept from the start), churn (thousands of blocks a second, each freed at once), and a
 * steady burst (a few small blocks at the start, kept). */
#include <stdlib.h>
#include <time.h>

#define NOINLINE __attribute__((noinline))

static void *volatile keep[1024];
static int kept;

NOINLINE void leak_site(void) { keep[kept++] = malloc(1000); }
NOINLINE void lingering_site(void) { keep[kept++] = malloc(4 << 20); }
NOINLINE void churn_site(void) {
    for (int i = 0; i < 200; i++) {
        void *volatile p = malloc(256);
        free(p);
    }
}
NOINLINE void steady_site(void) {
    for (int i = 0; i < 10; i++) keep[kept++] = malloc(100);
}

int main(void) {
    struct timespec tick = {0, 50 * 1000 * 1000};
    lingering_site();
    steady_site();
    for (int i = 0; i < 60; i++) {
        leak_site();
        churn_site();
        nanosleep(&tick, NULL);
    }
    return 0;
}
