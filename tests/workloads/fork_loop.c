/* A parent that forks a child every 25 ms until its input closes, each child allocating one block and exiting,
 * and waits for each: if any child were left stopped, the parent would never finish. Prints "ready" first. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void *volatile sink;

static int input_closed(void) {
    char c;
    return read(0, &c, 1) == 0;
}

int main(void) {
    struct timespec pause = {0, 25 * 1000 * 1000};
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    printf("ready\n");
    fflush(stdout);
    while (!input_closed()) {
        pid_t child = fork();
        if (child == 0) {
            sink = malloc(1000);
            _exit(0);
        }
        int status;
        waitpid(child, &status, 0);
        nanosleep(&pause, NULL);
    }
    return 0;
}
