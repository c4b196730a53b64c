/* Memory mapped by application functions through libc's wrappers, which glibc builds without frame pointers:
 * the kernel's frame-pointer walk stops in `sbrk` and loses its caller; the stack window unwound with the
 * CFI names it. Two functions call `sbrk` with the same wrapper frames: they must stay two sites. Sizes are
 * known to the byte: 1 MiB and 3 MiB of break, 5 pages mapped. */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
#define MIB (1 << 20)
#define PAGE 4096

/* Results are stored, so that no call is a tail call (which would leave the caller's frame). */
static void *volatile keep[3];

NOINLINE void grow_break(void) { keep[0] = sbrk(MIB); }

NOINLINE void grow_break_more(void) { keep[1] = sbrk(3 * MIB); }

NOINLINE void map_directly(void) {
    keep[2] = mmap(NULL, 5 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

int main(void) {
    grow_break();
    grow_break_more();
    map_directly();
    return 0;
}
