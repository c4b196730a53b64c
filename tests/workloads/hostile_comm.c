/* A process whose names are not UTF-8: it renames itself "\xff\xfe" (prctl(PR_SET_NAME)), and its test gives it
 * an argument that is not UTF-8 either. Prints "ready", waits for a line, then keeps one block of 123457 bytes
 * and exits. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>

#define NOINLINE __attribute__((noinline))

static void *volatile kept;

NOINLINE void hostile_block(void) { kept = malloc(123457); }

static void wait_for_line(void) {
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return;
}

int main(void) {
    if (prctl(PR_SET_NAME, "\xff\xfe", 0, 0, 0) != 0) {
        perror("prctl(PR_SET_NAME)");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    wait_for_line();
    hostile_block();
    return 0;
}
