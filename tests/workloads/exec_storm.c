/* An exec storm: forks N children one after the other, each exec'ing PROGRAM at once, and waits for each.
 * Usage: exec_storm PROGRAM N */
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int n = atoi(argv[2]);
    for (int i = 0; i < n; i++) {
        pid_t child = fork();
        if (child == 0) {
            execl(argv[1], argv[1], (char *)NULL);
            _exit(127);
        }
        int status;
        waitpid(child, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return 1;
    }
    return 0;
}
