/* Memory that is not malloc'd, with known sizes at exit: anonymous mmap (also through a raw syscall), a partial
 * munmap, an mremap that grows and moves, brk growth and shrinking, a file mapping (not counted), and a large
 * malloc that glibc serves with its own mmap (counted once, as malloc). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
#define PAGE 4096

static void *volatile keep[16];
static int kept;

static void *anon(size_t len) {
    return mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

/* 4 pages, kept. */
NOINLINE void mmap_site(void) { keep[kept++] = anon(4 * PAGE); }

/* 8 pages, then pages 2 and 3 unmapped: 6 pages left, in two pieces. */
NOINLINE void partial_site(void) {
    char *p = anon(8 * PAGE);
    munmap(p + 2 * PAGE, 2 * PAGE);
    keep[kept++] = p;
}

/* 2 pages grown to 5 with MREMAP_MAYMOVE: 5 pages, still this site's. */
NOINLINE void remap_site(void) {
    void *p = anon(2 * PAGE);
    keep[kept++] = mremap(p, 2 * PAGE, 5 * PAGE, MREMAP_MAYMOVE);
}

/* 3 pages through syscall(2), bypassing libc's mmap. */
NOINLINE void raw_syscall_site(void) {
    keep[kept++] = (void *)syscall(SYS_mmap, NULL, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

/* A file mapping is page cache, not heap: not counted. */
NOINLINE void file_site(void) {
    int fd = open("/proc/self/exe", O_RDONLY);
    keep[kept++] = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
}

/* The break moved by 10000 then back by 4000: 6000 bytes. */
NOINLINE void brk_site(void) {
    sbrk(10000);
    sbrk(-4000);
}

/* 2 MiB from malloc, which glibc maps itself: one malloc block, no mmap site. */
NOINLINE void big_malloc_site(void) { keep[kept++] = malloc(2 << 20); }

int main(void) {
    mmap_site();
    partial_site();
    remap_site();
    raw_syscall_site();
    file_site();
    brk_site();
    big_malloc_site();
    return 0;
}
