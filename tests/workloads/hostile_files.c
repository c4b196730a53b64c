/* Maps 4 KiB of each file named on its command line, private and executable, as a hostile container process
 * can: a device (/dev/zero), a sparse file of gigabytes, an ELF whose headers claim a gigabyte symbol table.
 * The tracer finds each mapping in /proc/PID/maps and must not read it whole. Prints "ready" once all are
 * mapped, then waits for its input to close. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        if (fd < 0) {
            perror(argv[i]);
            return 1;
        }
        if (mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        close(fd);
    }
    printf("ready\n");
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    return 0;
}
