/* Heap blocks allocated from code built as distributions build it (-O2 -fomit-frame-pointer): the kernel's
 * frame-pointer walk from `allocate` goes on through whatever its callers left in rbp (with Debian's gcc 12,
 * the start of their job array: the walk reads a job's callback as a return address, and the two callers
 * became two sites named after functions that never called). alloctrace must cut the stack at `allocate`,
 * whose CFI says it keeps no frame pointer, and say so: all 5,000 blocks in one site, 3,000 x 100 +
 * 2,000 x 1,000 = 2,300,000 bytes, all kept to the end. */
#include <stdlib.h>

/* Neither inlined nor cloned: each function keeps its own frame and return addresses. */
#define NOINLINE __attribute__((noipa))
#define FIRST_CALLS 3000
#define SECOND_CALLS 2000
#define FIRST_SIZE 100
#define SECOND_SIZE 1000

struct job {
    size_t size;
    void (*then)(void);
};

/* Volatile and global, so that the blocks are kept and no call is optimized away. */
void *volatile kept[FIRST_CALLS + SECOND_CALLS];
static unsigned next_kept;
static struct job first_jobs[FIRST_CALLS], second_jobs[SECOND_CALLS];
volatile unsigned ticks, tocks;

NOINLINE void tick(void) { ticks++; }
NOINLINE void tock(void) { tocks++; }

NOINLINE void allocate(size_t size) { kept[next_kept++] = malloc(size); }

/* Two callers of the same shape: each walks its jobs from the end, which stays in a callee-saved register. */
NOINLINE void from_first(const struct job *jobs, unsigned count) {
    for (const struct job *end = jobs + count; end != jobs;) {
        end--;
        allocate(end->size);
        end->then();
    }
}

NOINLINE void from_second(const struct job *jobs, unsigned count) {
    for (const struct job *end = jobs + count; end != jobs;) {
        end--;
        allocate(end->size);
        end->then();
    }
}

int main(void) {
    for (unsigned i = 0; i < FIRST_CALLS; i++)
        first_jobs[i] = (struct job){FIRST_SIZE, i % 2 ? tick : tock};
    for (unsigned i = 0; i < SECOND_CALLS; i++)
        second_jobs[i] = (struct job){SECOND_SIZE, i % 2 ? tock : tick};
    from_first(first_jobs, FIRST_CALLS);
    from_second(second_jobs, SECOND_CALLS);
    return 0;
}
