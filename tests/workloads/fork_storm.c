/* A fork storm: keeps ALIVE children alive at once, each allocating 10 blocks of 1000 bytes at once and living
 * LIFETIME_US microseconds, and forks a new one as each exits, until it is killed.
 *
 * Every fork is logged to LOG (opened O_APPEND: each record is one write, so records never interleave): the
 * parent writes "forked PID" as fork returns, and each child "child PID held|free" as its first action. A child
 * the tracer held before its first instruction was continued with SIGCONT, whose handler (inherited across fork)
 * runs before the child's first instruction: so "held" says the tracer had the child stopped, "free" that it
 * did not (holding was off: the trace had ended).
 *
 * Usage: fork_storm ALIVE LIFETIME_US LOG. Prints "ready" once the first children are forked. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static volatile sig_atomic_t continued;

static void on_sigcont(int signal) {
    (void)signal;
    continued = 1;
}

static void *volatile keep[10];

/* 10 x 1000 bytes, kept until the child exits. */
NOINLINE void storm_child_site(void) {
    for (int i = 0; i < 10; i++) keep[i] = malloc(1000);
}

static void record(int log, const char *what, pid_t pid, const char *tail) {
    char line[64];
    int n = snprintf(line, sizeof line, "%s %d%s\n", what, (int)pid, tail);
    if (write(log, line, (size_t)n) != n) _exit(3);
}

static void child(int log, long lifetime_us) {
    record(log, "child", getpid(), continued ? " held" : " free");
    storm_child_site();
    struct timespec life = {lifetime_us / 1000000, (lifetime_us % 1000000) * 1000};
    nanosleep(&life, NULL);
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: fork_storm ALIVE LIFETIME_US LOG\n");
        return 2;
    }
    int alive_max = atoi(argv[1]);
    long lifetime_us = atol(argv[2]);
    int log = open(argv[3], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (log < 0) {
        perror(argv[3]);
        return 2;
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigcont;
    sigaction(SIGCONT, &action, NULL);
    int alive = 0;
    int ready = 0;
    struct timespec pause = {0, 1000 * 1000};
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) alive--;
        if (alive < alive_max) {
            pid_t pid = fork();
            if (pid == 0) child(log, lifetime_us);
            if (pid < 0) {
                nanosleep(&pause, NULL);
                continue;
            }
            record(log, "forked", pid, "");
            alive++;
            continue;
        }
        if (!ready) {
            printf("ready\n");
            fflush(stdout);
            ready = 1;
        }
        nanosleep(&pause, NULL);
    }
}
