/* Built static: its allocator is its own. Keeps one block of 4096 bytes and exits at once. */
#include <stdlib.h>

#define NOINLINE __attribute__((noinline))

static void *volatile keep;

NOINLINE void static_site(void) { keep = malloc(4096); }

int main(void) {
    static_site();
    return 0;
}
