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

/* Chunk c covers items [c * chunk, (c + 1) * chunk), clipped to [0, count); or, when
 * `out_item_bytes` is set, the items whose output starts in huge page c of the output (see
 * run_parallel_paged). */
typedef struct {
    range_fn fn;
    void *context;
    int64_t count, chunk;
    uintptr_t out, out_item_bytes;
    int64_t next; /* the first chunk no thread has taken yet; updated atomically */
} pipequant_work;

#define PIPEQUANT_HUGE_PAGE ((uintptr_t)2 << 20)

/* the first item of chunk c (count when c is past the end) */
static int64_t pipequant_chunk_start(const pipequant_work *work, int64_t c) {
    int64_t start;
    if (c == 0) return 0;
    if (work->out_item_bytes) { /* the first item whose output starts at or after huge page c */
        uintptr_t page = (work->out & ~(PIPEQUANT_HUGE_PAGE - 1)) + (uintptr_t)c * PIPEQUANT_HUGE_PAGE;
        start = (int64_t)((page - work->out + work->out_item_bytes - 1) / work->out_item_bytes);
    } else {
        start = c * work->chunk;
    }
    return start < work->count ? start : work->count;
}

static void *pipequant_take_chunks(void *argument) {
    pipequant_work *work = argument;
    for (;;) {
        int64_t c = __atomic_fetch_add(&work->next, 1, __ATOMIC_RELAXED);
        int64_t begin = pipequant_chunk_start(work, c);
        if (begin >= work->count) return NULL;
        int64_t end = pipequant_chunk_start(work, c + 1);
        if (end > begin) work->fn(work->context, begin, end);
    }
}

static void pipequant_run(pipequant_work *work, int threads) {
    if (threads > PIPEQUANT_MAX_THREADS) threads = PIPEQUANT_MAX_THREADS;
    if (threads < 1) threads = 1;
    pthread_t handles[PIPEQUANT_MAX_THREADS];
    int started[PIPEQUANT_MAX_THREADS] = {0};
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&handles[t], NULL, pipequant_take_chunks, work) == 0;
    }
    pipequant_take_chunks(work); /* if a thread could not start, the others take its chunks */
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(handles[t], NULL);
    }
}

/* fn(context, begin, end) over [0, count), in chunks, on up to `threads` threads (this one included) */
static void run_parallel(range_fn fn, void *context, int64_t count, int threads) {
    if (threads > count) threads = (int)count;
    int64_t chunk = count / ((int64_t)(threads > 1 ? threads : 1) * PIPEQUANT_CHUNKS_PER_THREAD);
    chunk = chunk > 0 ? chunk : 1;
    pipequant_work work = {fn, context, count, chunk, 0, 0, 0};
    pipequant_run(&work, threads);
}

/* run_parallel for a loop whose cost is writing a large fresh output (`out`, out_item_bytes per
 * item): one chunk per 2 MiB huge page of it, so that no page is written by two threads. numpy
 * asks for transparent huge pages on large arrays, and the kernel zeroes such a page when it is
 * first touched; with chunks that end inside a page, both threads fault on the same pages and
 * one waits for the other's zeroing. Measured on 2 cores, float16 / bfloat16 / Q8_0 into a fresh
 * 36 MB float32 array, alternating runs: 1.2-1.4x the speed of count-based chunks, which were
 * no faster than one thread. */
static void run_parallel_paged(range_fn fn, void *context, int64_t count, int threads, void *out, size_t out_item_bytes) {
    if ((uint64_t)count * out_item_bytes < 2 * PIPEQUANT_HUGE_PAGE) {
        run_parallel(fn, context, count, threads);
        return;
    }
    pipequant_work work = {fn, context, count, 0, (uintptr_t)out, out_item_bytes, 0};
    pipequant_run(&work, threads);
}

#endif
