/* Runs until it is killed: prints "ready PID", then forks a child for each line it reads, and prints
 * "forked PID" once fork returns. Each child allocates a block and lives until it is killed or continued past
 * a pause of a minute. The parent never waits for its children, and blocks SIGCHLD: a ptraced process stops at
 * each signal until its tracer lets it go, and the test stops the tracer. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void *volatile sink;

int main(void) {
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        pid_t child = fork();
        if (child == 0) {
            sink = malloc(1000);
            sleep(60);
            _exit(0);
        }
        printf("forked %d\n", (int)child);
        fflush(stdout);
    }
    for (;;) pause();
}
