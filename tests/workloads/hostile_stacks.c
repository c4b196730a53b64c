/* A target that makes ever new stacks while holding nothing: 2^16 distinct call paths, each 16 levels of two
 * functions chosen by a bit of the path's number, each path allocating 16 bytes and freeing them at once. */
#include <stdlib.h>

#define NOINLINE __attribute__((noinline))

static void *volatile sink;

NOINLINE static void leaf(void) {
    sink = malloc(16);
    free(sink);
}

#define LEVEL(n, next)                                                                                        \
    NOINLINE static void level##n##_a(unsigned path);                                                         \
    NOINLINE static void level##n##_b(unsigned path);                                                         \
    NOINLINE static void level##n##_a(unsigned path) { next(path); __asm__ volatile(""); }                   \
    NOINLINE static void level##n##_b(unsigned path) { next(path); __asm__ volatile(""); }                   \
    NOINLINE static void level##n(unsigned path) {                                                            \
        if (path & (1u << n)) level##n##_a(path);                                                             \
        else level##n##_b(path);                                                                              \
    }

NOINLINE static void level_end(unsigned path) { (void)path; leaf(); }
LEVEL(15, level_end)
LEVEL(14, level15)
LEVEL(13, level14)
LEVEL(12, level13)
LEVEL(11, level12)
LEVEL(10, level11)
LEVEL(9, level10)
LEVEL(8, level9)
LEVEL(7, level8)
LEVEL(6, level7)
LEVEL(5, level6)
LEVEL(4, level5)
LEVEL(3, level4)
LEVEL(2, level3)
LEVEL(1, level2)
LEVEL(0, level1)

int main(void) {
    for (unsigned path = 0; path < (1u << 16); path++) level0(path);
    return 0;
}
