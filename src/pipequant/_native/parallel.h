/* Splitting a loop over independent items (rows, blocks) between threads, for the kernels here.
 *
 * Plain pthreads, started per call: a call covers a whole weight (milliseconds of work), so the
 * ~50 us of starting threads is noise, and no pool stays behind to compete with torch's own
 * OpenMP threads for the cores between calls. */
#ifndef PIPEQUANT_PARALLEL_H
#define PIPEQUANT_PARALLEL_H

#include <pthread.h>
#include <stdint.h>

#define PIPEQUANT_MAX_THREADS 64

typedef void (*range_fn)(void *context, int64_t begin, int64_t end);

typedef struct {
    range_fn fn;
    void *context;
    int64_t begin, end;
} pipequant_range;

static void *pipequant_run_range(void *argument) {
    pipequant_range *range = argument;
    range->fn(range->context, range->begin, range->end);
    return NULL;
}

/* fn(context, begin, end) over [0, count) in `threads` even shares; this thread takes the first
 * share, and the share of any thread that could not be started. */
static void run_parallel(range_fn fn, void *context, int64_t count, int threads) {
    if (threads > PIPEQUANT_MAX_THREADS) threads = PIPEQUANT_MAX_THREADS;
    if (threads > count) threads = (int)count;
    if (threads < 1) threads = 1;
    pipequant_range ranges[PIPEQUANT_MAX_THREADS];
    pthread_t handles[PIPEQUANT_MAX_THREADS];
    int started[PIPEQUANT_MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        ranges[t] = (pipequant_range){fn, context, count * t / threads, count * (t + 1) / threads};
    }
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&handles[t], NULL, pipequant_run_range, &ranges[t]) == 0;
    }
    pipequant_run_range(&ranges[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) {
            pthread_join(handles[t], NULL);
        } else {
            pipequant_run_range(&ranges[t]);
        }
    }
}

#endif
