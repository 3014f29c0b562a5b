/* Splitting a loop over independent items (rows, blocks) between threads, for the kernels here.
 *
 * Plain pthreads, started per call: a call covers a whole weight (milliseconds of work), so the
 * ~50 us of starting threads is noise, and no pool stays behind to compete with torch's own
 * OpenMP threads for the cores between calls. The threads take small chunks from a shared
 * counter rather than fixed shares: on a 2-core machine a thread descheduled for a few tens of
 * milliseconds (by any other process) would otherwise hold up the whole call with its share,
 * while here the others take over the chunks it has not started (measured: fixed halves had
 * 40-50 ms stalls on a 6 ms dequantization, several calls in ten). */
#ifndef PIPEQUANT_PARALLEL_H
#define PIPEQUANT_PARALLEL_H

#include <pthread.h>
#include <stdint.h>

#define PIPEQUANT_MAX_THREADS 64
#define PIPEQUANT_CHUNKS_PER_THREAD 16

typedef void (*range_fn)(void *context, int64_t begin, int64_t end);

typedef struct {
    range_fn fn;
    void *context;
    int64_t count, chunk;
    int64_t next; /* the first item no thread has taken yet; updated atomically */
} pipequant_work;

static void *pipequant_take_chunks(void *argument) {
    pipequant_work *work = argument;
    for (;;) {
        int64_t begin = __atomic_fetch_add(&work->next, work->chunk, __ATOMIC_RELAXED);
        if (begin >= work->count) return NULL;
        int64_t end = begin + work->chunk < work->count ? begin + work->chunk : work->count;
        work->fn(work->context, begin, end);
    }
}

/* fn(context, begin, end) over [0, count), in chunks, on up to `threads` threads (this one included) */
static void run_parallel(range_fn fn, void *context, int64_t count, int threads) {
    if (threads > PIPEQUANT_MAX_THREADS) threads = PIPEQUANT_MAX_THREADS;
    if (threads > count) threads = (int)count;
    if (threads < 1) threads = 1;
    int64_t chunk = count / ((int64_t)threads * PIPEQUANT_CHUNKS_PER_THREAD);
    pipequant_work work = {fn, context, count, chunk > 0 ? chunk : 1, 0};
    pthread_t handles[PIPEQUANT_MAX_THREADS];
    int started[PIPEQUANT_MAX_THREADS] = {0};
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&handles[t], NULL, pipequant_take_chunks, &work) == 0;
    }
    pipequant_take_chunks(&work); /* if a thread could not start, the others take its chunks */
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(handles[t], NULL);
    }
}

#endif
