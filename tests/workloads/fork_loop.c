/* A parent that forks a child every 25 ms for the given seconds, each child allocating one block and exiting,
 * and waits for each: if any child were left stopped, the parent would never finish. Prints "ready" first. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void *volatile sink;

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 4.0;
    struct timespec start, now, pause = {0, 25 * 1000 * 1000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    printf("ready\n");
    fflush(stdout);
    do {
        pid_t child = fork();
        if (child == 0) {
            sink = malloc(1000);
            _exit(0);
        }
        int status;
        waitpid(child, &status, 0);
        nanosleep(&pause, NULL);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return 0;
}
