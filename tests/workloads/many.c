/* Scale and loss: `many N` keeps N blocks of 16 bytes live; `storm THREADS N` has each thread allocate and free
 * N blocks as fast as it can; `handoff N` allocates N blocks of 24 bytes in one thread while a second thread,
 * on the other CPU if there is one, frees them as they come, all but one in every 1,000. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static void **handoff_blocks;
static long handoff_count;
static atomic_long handoff_published;

static void *free_handed_off(void *unused) {
    (void)unused;
    long freed = 0;
    while (freed < handoff_count) {
        long ready = atomic_load(&handoff_published);
        for (; freed < ready; freed++)
            if (freed % 1000 != 0) free(handoff_blocks[freed]);
    }
    return NULL;
}

static void *storm(void *arg) {
    long n = (long)arg;
    for (long i = 0; i < n; i++) {
        void *volatile p = malloc(48);
        free(p);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "many")) {
        long n = atol(argv[2]);
        void **keep = malloc(n * sizeof *keep);
        for (long i = 0; i < n; i++) keep[i] = malloc(16);
        return keep[n - 1] == NULL;
    }
    if (argc == 4 && !strcmp(argv[1], "storm")) {
        int threads = atoi(argv[2]);
        long n = atol(argv[3]);
        pthread_t t[64];
        for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, storm, (void *)n);
        for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "handoff")) {
        handoff_count = atol(argv[2]);
        handoff_blocks = malloc(handoff_count * sizeof *handoff_blocks);
        pthread_t consumer;
        pthread_create(&consumer, NULL, free_handed_off, NULL);
        for (long i = 0; i < handoff_count; i++) {
            handoff_blocks[i] = malloc(24);
            atomic_store(&handoff_published, i + 1);
        }
        pthread_join(consumer, NULL);
        return 0;
    }
    return 2;
}
