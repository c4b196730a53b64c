/* A parent and the child it forks, each with its own site; with an argument, the child execs that program
 * instead. The child waits a second first, so that its probes are in place before it allocates, and so that the
 * tracer, busy attaching to the child it just saw forked, reads the exec'd image's maps before it exits: with
 * parallel tests loading the machine, 0.3 s was once not enough, and the exec'd sites went unnamed. */
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
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
        struct timespec wait = {1, 0};
        nanosleep(&wait, NULL);
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
