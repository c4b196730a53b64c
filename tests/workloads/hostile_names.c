/* A process that names itself with terminal escapes: its comm (set with PR_SET_NAME), its arguments (chosen by
 * the test), its executable's path (chosen by the test) and the symbol of the function that allocates all carry
 * a screen clear, a window-title change, a C1 control or a forged line. It allocates 10 blocks of 1000 bytes from
 * that function and keeps them. With --wait it first prints "ready" and waits for a line on stdin (so that a
 * tracer attaches by pid first); with --linger it then prints "allocated" and waits for a line (or end of
 * input) before exiting. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

/* ESC [2J clears the screen, ESC ]0;...BEL sets the window title, U+009B (UTF-8 C2 9B) is the C1 CSI. */
#define NOINLINE __attribute__((noinline))
NOINLINE void hostile_site(void) __asm__("\"hostile\x1b[2J\x1b]0;owned\x07\xc2\x9b" "31m_site\"");

static void *volatile keep[10];

void hostile_site(void) {
    for (int i = 0; i < 10; i++) keep[i] = malloc(1000);
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
    /* 11 bytes (the kernel keeps 15): a screen clear, a forged line, a window-title change. */
    if (prctl(PR_SET_NAME, "\x1b[2J\n\x1b]0;x\x07", 0, 0, 0) != 0) {
        perror("prctl");
        return 1;
    }
    if (wait) {
        printf("ready\n");
        fflush(stdout);
        wait_for_line();
    }
    hostile_site();
    if (linger) {
        printf("allocated\n");
        fflush(stdout);
        wait_for_line();
    }
    return 0;
}
