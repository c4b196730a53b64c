/* A process that is already allocating at full speed when the tracer attaches: it churns malloc(16)/free
 * without pause. It prints "ready" once churning; after a line arrives on stdin it keeps one 1000-byte block
 * every 10,000 iterations, 100 in all (100000 bytes live at keep_site), still churning in between, prints
 * "kept", and churns on until killed. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static void *volatile sink;
static void *volatile keep[100];

NOINLINE void churn_site(void) {
    sink = malloc(16);
    free(sink);
}

NOINLINE void keep_site(int i) { keep[i] = malloc(1000); }

static int line_arrived(void) {
    char c;
    return read(0, &c, 1) == 1;
}

int main(void) {
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    printf("ready\n");
    fflush(stdout);
    int kept = -1;
    for (long n = 1;; n++) {
        churn_site();
        if (n % 10000 != 0) continue;
        if (kept < 0 && line_arrived()) kept = 0;
        if (kept >= 0 && kept < 100) {
            keep_site(kept++);
            if (kept == 100) {
                printf("kept\n");
                fflush(stdout);
            }
        }
    }
}
