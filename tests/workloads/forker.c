/* A parent and the child it forks, each with its own site; with an argument, the child execs that program
 * instead. The child allocates (or execs) at once: the tracer holds it before its first instruction, and its
 * new image before its first, until its probes are in place. */
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static void *volatile keep[256];
static int kept;

/* 10 x 1000 bytes in the parent. */
NOINLINE void parent_site(void) { for (int i = 0; i < 10; i++) keep[kept++] = malloc(1000); }

/* 50 x 2000 bytes in the child. */
NOINLINE void child_site(void) { for (int i = 0; i < 50; i++) keep[kept++] = malloc(2000); }

int main(int argc, char **argv) {
    parent_site();
    pid_t child = fork();
    if (child == 0) {
        if (argc > 1) {
            execv(argv[1], argv + 1);
            _exit(127);
        }
        child_site();
        _exit(0);
    }
    int status;
    waitpid(child, &status, 0);
    return 0;
}
