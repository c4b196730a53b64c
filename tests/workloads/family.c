/* One site per member of the allocator family and per realloc edge case, each holding a known number of bytes
 * at exit. Function names are what the tests look sites up by. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define NOINLINE __attribute__((noinline))

static void *volatile keep[64];
static int kept;

/* reallocarray(NULL, 10, 100): 1000 bytes. */
NOINLINE void reallocarray_site(void) { keep[kept++] = reallocarray(NULL, 10, 100); }

/* posix_memalign(64, 3000): 3000 bytes, through the result pointer. */
NOINLINE void posix_memalign_site(void) {
    void *p = NULL;
    if (posix_memalign(&p, 64, 3000) == 0) keep[kept++] = p;
}

/* aligned_alloc(256, 4096): 4096 bytes. */
NOINLINE void aligned_alloc_site(void) { keep[kept++] = aligned_alloc(256, 4096); }

/* memalign(128, 2000): 2000 bytes. */
NOINLINE void memalign_site(void) { keep[kept++] = memalign(128, 2000); }

/* valloc(5000) and pvalloc(5000): the requested 5000 bytes each. */
NOINLINE void valloc_site(void) { keep[kept++] = valloc(5000); }
NOINLINE void pvalloc_site(void) { keep[kept++] = pvalloc(5000); }

/* realloc(NULL, 300) is malloc: 300 bytes at the realloc call. The NULL goes through a volatile, or the
 * compiler turns the call into malloc itself. */
NOINLINE void realloc_null_site(void) {
    void *volatile null = NULL;
    keep[kept++] = realloc(null, 300);
}

/* malloc(700) then realloc(p, 0), which frees it: nothing anywhere. */
NOINLINE void realloc_zero_site(void) {
    void *p = malloc(700);
    void *volatile q = realloc(p, 0);
    (void)q;
}

/* malloc(4000) shrunk to 40 in place: 40 bytes at the realloc call, nothing at the malloc. */
NOINLINE void realloc_shrink_site(void) {
    void *p = malloc(4000);
    keep[kept++] = realloc(p, 40);
}

/* malloc(100) grown to 1 MiB, which moves it: 1 MiB at the realloc call. */
NOINLINE void realloc_move_site(void) {
    void *p = malloc(100);
    keep[kept++] = realloc(p, 1 << 20);
}

/* malloc(600), then a realloc that must fail: the 600 bytes stay with the malloc. */
NOINLINE void realloc_fail_site(void) {
    void *p = malloc(600);
    void *q = realloc(p, SIZE_MAX / 2);
    keep[kept++] = q ? q : p;
}

/* free(NULL) is a no-op, and free's probe sits past that check. */
NOINLINE void free_null_site(void) {
    for (int i = 0; i < 1000; i++) free(NULL);
}

int main(void) {
    reallocarray_site();
    posix_memalign_site();
    aligned_alloc_site();
    memalign_site();
    valloc_site();
    pvalloc_site();
    realloc_null_site();
    realloc_zero_site();
    realloc_shrink_site();
    realloc_move_site();
    realloc_fail_site();
    free_null_site();
    return 0;
}
