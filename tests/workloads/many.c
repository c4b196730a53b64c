/* Scale and loss: `many N` keeps N blocks of 16 bytes live; `storm THREADS N` has each thread allocate and free
 * N blocks as fast as it can. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

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
    return 2;
}
