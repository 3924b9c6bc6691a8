/* The experts' AdamW step in one pass over each element: read p, g, m, v; write p, m, v (28 bytes per
 * float32 parameter).  The same operations in the same order as the numpy rule in host_adamw.py, each
 * rounded to float32 (built with -ffp-contract=off, no fast-math), so the results are bitwise equal.
 * The touched rows' elements are cut into `threads` contiguous ranges, one POSIX thread each (the caller
 * runs the last); each element is independent, so any cut gives the same bits.  Plain threads rather
 * than OpenMP: OpenMP's workers spin after each region, taking the cores from MindSpore's own threads. */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

enum { MOST_THREADS = 256, LEAST_PER_THREAD = 65536 /* elements: below that a thread costs more than it saves */ };

static int64_t thread_count(int64_t threads, int64_t elements) {
    if (threads > elements / LEAST_PER_THREAD) threads = elements / LEAST_PER_THREAD;
    if (threads > MOST_THREADS) threads = MOST_THREADS;
    return threads < 1 ? 1 : threads;
}

/* Run `task` on each of `count` items (item t at items + t * size), the last on the calling thread. */
static void run_in_threads(void *(*task)(void *), char *items, size_t size, int64_t count) {
    pthread_t started[MOST_THREADS];
    int64_t running = 0;
    for (int64_t t = 0; t + 1 < count; ++t) {
        if (pthread_create(&started[running], 0, task, items + t * size) == 0) {
            ++running;
        } else {
            task(items + t * size); /* no thread to be had: do its range here */
        }
    }
    task(items + (count - 1) * size);
    for (int64_t t = 0; t < running; ++t) pthread_join(started[t], 0);
}

typedef struct {
    float *param, *moment1, *moment2;
    const float *grad;
    const int64_t *rows, *grad_rows; /* the i-th updated row is store row rows[i], gradient row grad_rows[i] */
    int64_t row_size, begin, end; /* elements [begin, end) of the touched rows, row-major */
    float beta1, beta2, eps, rate, decay, grad_scale; /* the gradient is g * grad_scale (the step's unscale and clip) */
} Update;

static void update(float *restrict p, float *restrict m, float *restrict v, const float *restrict g, int64_t count,
                   const Update *u) {
    const float one_minus_beta1 = 1.0f - u->beta1, one_minus_beta2 = 1.0f - u->beta2;
    const float beta1 = u->beta1, beta2 = u->beta2, eps = u->eps, rate = u->rate, decay = u->decay;
    const float grad_scale = u->grad_scale;
    for (int64_t i = 0; i < count; ++i) {
        const float gi = g[i] * grad_scale;
        const float mi = m[i] * beta1 + gi * one_minus_beta1;
        const float vi = v[i] * beta2 + (gi * gi) * one_minus_beta2;
        float step = mi / (sqrtf(vi) + eps);
        if (decay != 0.0f) step = step + decay * p[i];
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] - step * rate;
    }
}

static void *update_range(void *argument) {
    const Update *u = (const Update *)argument;
    for (int64_t at = u->begin; at < u->end;) {
        const int64_t index = at / u->row_size, offset = at % u->row_size;
        const int64_t count = u->row_size - offset < u->end - at ? u->row_size - offset : u->end - at;
        const int64_t base = u->rows[index] * u->row_size + offset;
        update(u->param + base, u->moment1 + base, u->moment2 + base,
               u->grad + u->grad_rows[index] * u->row_size + offset, count, u);
        at += count;
    }
    return 0;
}

void adamw_rows(float *param, float *moment1, float *moment2, const float *grad, const int64_t *rows,
                const int64_t *grad_rows, int64_t row_count, int64_t row_size, float beta1, float beta2, float eps, float rate, float decay,
                float grad_scale, int64_t threads) {
    const int64_t total = row_count * row_size, count = thread_count(threads, total);
    Update work[MOST_THREADS];
    for (int64_t t = 0; t < count; ++t) {
        work[t] = (Update){param, moment1, moment2, grad, rows, grad_rows, row_size, total * t / count, total * (t + 1) / count,
                           beta1, beta2, eps, rate, decay, grad_scale};
    }
    run_in_threads(update_range, (char *)work, sizeof(Update), count);
}

/* The memory's streaming bandwidth for the update's own pattern (read four arrays, write three), with no
 * arithmetic to speak of: the speed the update would have if it cost nothing but its memory traffic. */
typedef struct {
    float *a, *b, *c;
    const float *d;
    int64_t begin, end;
} Stream;

static void stream(float *restrict a, float *restrict b, float *restrict c, const float *restrict d, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
        a[i] += d[i];
        b[i] += d[i];
        c[i] += d[i];
    }
}

static void *stream_range(void *argument) {
    const Stream *s = (const Stream *)argument;
    stream(s->a + s->begin, s->b + s->begin, s->c + s->begin, s->d + s->begin, s->end - s->begin);
    return 0;
}

void stream_update(float *a, float *b, float *c, const float *d, int64_t elements, int64_t threads) {
    const int64_t count = thread_count(threads, elements);
    Stream work[MOST_THREADS];
    for (int64_t t = 0; t < count; ++t) {
        work[t] = (Stream){a, b, c, d, elements * t / count, elements * (t + 1) / count};
    }
    run_in_threads(stream_range, (char *)work, sizeof(Stream), count);
}
