/* Sparse dropout on the CPU (float32): where the dropped values are, and the corrections that
 * take their share out of an adapter's products (see sparse_dropout.py).
 *
 * The drops of a training step are a few million positions, and the corrections a few million
 * rank-r multiply-adds: each small, together several percent of a step, and run one thread at a
 * time they leave the other cores idle. Here both run on torch's threads.
 *
 *   slim_drop_positions   the ascending flat indices to drop, each with probability p
 *   slim_remove_from_low  low[i] -= x[i, j] * A[:, j]       (the forward product)
 *   slim_remove_from_grad_a_t  grad_A.T[j] -= g_low[i] x[i, j]   (the gradient of A)
 *   slim_remove_from_grad_x    grad_x[i, j] -= g_low[i] . A[:, j] (the gradient of x)
 *   slim_zero_at          values[f] = 0
 *
 * Drops are drawn segment by segment, each from its own stream (splitmix64 seeded by the seed
 * and the segment's number), as gaps between drops: Geometric(p), by inversion. A gap process
 * restarted at a segment's start is still one independent Bernoulli(p) per value, and the
 * positions depend on the seed alone, not on how many threads draw them.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SEGMENT 65536 /* values a stream covers */
#define SERIAL 4096   /* fewer positions than this: one thread (a parallel region costs more) */

static inline uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Positions of segment `s` (values [s * SEGMENT, end)) appended to out[*count...]; out holds
 * `capacity`. Returns 0, or -1 when out is full (the count keeps growing, so the caller learns
 * how much room the draw needs). */
static int draw_segment(int64_t s, int64_t end, double per_log, uint64_t seed, int64_t *out,
                        int64_t capacity, int64_t *count) {
    uint64_t state = seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(s + 1));
    splitmix64(&state);
    int full = 0;
    for (int64_t at = s * SEGMENT - 1;;) {
        /* u in (0, 1] from 53 bits: P(gap > k) = P(u <= (1 - p)^k) = (1 - p)^k */
        const double u = (double)((splitmix64(&state) >> 11) + 1) * 0x1.0p-53;
        const double gap = floor(log(u) * per_log) + 1.0;
        if (gap >= (double)(end - at)) return full ? -1 : 0;
        at += (int64_t)gap;
        if (*count < capacity) out[*count] = at;
        else full = 1;
        (*count)++;
    }
}

/* The flat indices in [0, numel) to drop, each with probability p in (0, 1), ascending, into
 * out (room for `capacity`). Returns how many there are; more than `capacity` means out was too
 * small and holds nothing useful (call again with room for that many). */
int64_t slim_drop_positions(int64_t numel, double p, uint64_t seed, int64_t *out,
                            int64_t capacity, int threads) {
    const int64_t segments = (numel + SEGMENT - 1) / SEGMENT;
    const double per_log = 1.0 / log1p(-p);
    if (threads > segments) threads = (int)segments;
    if (threads < 1) threads = 1;
    int64_t totals[threads + 1];
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t first = segments * t / n, last = segments * (t + 1) / n;
        const int64_t span = last * SEGMENT < numel ? (last - first) * SEGMENT
                                                    : numel - first * SEGMENT;
        /* Room for the mean and 8 standard deviations: a draw that needs more starts over
         * with exact room (odds below 1e-15). */
        const double mean = span * p;
        int64_t room = (int64_t)(mean + 8.0 * sqrt(mean) + 64.0), count = 0;
        int64_t *mine = malloc(room * sizeof *mine);
        if (mine == NULL) failed = 1;
        for (int64_t s = first; mine != NULL && s < last; s++) {
            const int64_t end = (s + 1) * SEGMENT < numel ? (s + 1) * SEGMENT : numel;
            const int64_t before = count;
            if (draw_segment(s, end, per_log, seed, mine, room, &count) != 0) {
                room = count + (int64_t)(8.0 * sqrt(mean) + 64.0);
                int64_t *bigger = realloc(mine, room * sizeof *mine);
                if (bigger == NULL) {
                    free(mine);
                    mine = NULL;
                    failed = 1;
                    break;
                }
                mine = bigger;
                count = before;
                draw_segment(s, end, per_log, seed, mine, room, &count);
            }
        }
        totals[t + 1] = count;
#pragma omp barrier
#pragma omp single
        {
            totals[0] = 0;
            for (int i = 1; i <= n; i++) totals[i] += totals[i - 1];
        }
        if (!failed && totals[n] <= capacity)
            memcpy(out + totals[t], mine, (totals[t + 1] - totals[t]) * sizeof *out);
        free(mine);
    }
    return failed ? -1 : totals[threads];
}

/* [*begin, *end) of the positions that fall in rows [r0, r1) of a (rows, width) tensor. */
static void rows_span(const int64_t *positions, int64_t n, int64_t width, int64_t r0, int64_t r1,
                      int64_t *begin, int64_t *end) {
    int64_t lo = 0, hi = n;
    while (lo < hi) { /* first position >= r0 * width */
        const int64_t mid = lo + (hi - lo) / 2;
        if (positions[mid] < r0 * width) lo = mid + 1;
        else hi = mid;
    }
    *begin = lo;
    for (hi = n; lo < hi;) { /* first position >= r1 * width */
        const int64_t mid = lo + (hi - lo) / 2;
        if (positions[mid] < r1 * width) lo = mid + 1;
        else hi = mid;
    }
    *end = lo;
}

static inline int team(int threads, int64_t n) { return n < SERIAL ? 1 : threads; }

/* low[i, :] -= x[i, j] * a_t[j, :] for every dropped (i, j); low (rows, r), x (rows, width),
 * a_t (width, r). Threads take whole rows, so no two write the same row of low. */
int slim_remove_from_low(float *low, const float *x, const float *a_t, const int64_t *positions,
                         int64_t n, int64_t rows, int64_t width, int64_t r, int threads) {
    threads = team(threads, n);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        int64_t begin, end;
        rows_span(positions, n, width, rows * t / count, rows * (t + 1) / count, &begin, &end);
        for (int64_t q = begin; q < end; q++) {
            const int64_t f = positions[q], i = f / width, j = f - i * width;
            const float v = x[f];
            float *row = low + i * r;
            const float *a = a_t + j * r;
            for (int64_t k = 0; k < r; k++) row[k] -= v * a[k];
        }
    }
    return 0;
}

/* grad_x[i, j] -= g_low[i, :] . a_t[j, :] for every dropped (i, j); grad_x (rows, width). */
int slim_remove_from_grad_x(float *grad_x, const float *g_low, const float *a_t,
                            const int64_t *positions, int64_t n, int64_t width, int64_t r,
                            int threads) {
    threads = team(threads, n);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t q = 0; q < n; q++) {
        const int64_t f = positions[q], i = f / width, j = f - i * width;
        const float *g = g_low + i * r, *a = a_t + j * r;
        float total = 0.0f;
        for (int64_t k = 0; k < r; k++) total += g[k] * a[k];
        grad_x[f] -= total;
    }
    return 0;
}

/* grad_a_t[j, :] -= g_low[i, :] * x[i, j] for every dropped (i, j); grad_a_t (width, r). Any
 * two positions may share a column j, so each further thread sums into its own zeroed copy,
 * taken away at the end. */
int slim_remove_from_grad_a_t(float *grad_a_t, const float *x, const float *g_low,
                              const int64_t *positions, int64_t n, int64_t width, int64_t r,
                              int threads) {
    threads = team(threads, n);
    const int64_t size = width * r;
    float *spare = threads > 1 ? calloc((size_t)(threads - 1) * size, sizeof *spare) : NULL;
    if (spare == NULL) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t begin = n * t / count, end = n * (t + 1) / count;
        float *into = t == 0 ? grad_a_t : spare + (t - 1) * size;
        const float sign = t == 0 ? -1.0f : 1.0f; /* the copies are taken away below */
        for (int64_t q = begin; q < end; q++) {
            const int64_t f = positions[q], i = f / width, j = f - i * width;
            const float v = sign * x[f];
            const float *g = g_low + i * r;
            float *a = into + j * r;
            for (int64_t k = 0; k < r; k++) a[k] += g[k] * v;
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t e = 0; e < size; e++)
            for (int c = 0; c < count - 1; c++) grad_a_t[e] -= spare[c * size + e];
    }
    free(spare);
    return 0;
}

/* values[f] = 0 at every position. */
int slim_zero_at(float *values, const int64_t *positions, int64_t n, int threads) {
    threads = team(threads, n);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t q = 0; q < n; q++) values[positions[q]] = 0.0f;
    return 0;
}
