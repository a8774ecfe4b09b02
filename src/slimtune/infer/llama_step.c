/* Decode steps and prefills of a LLaMA-family decoder in one call: every block of the model
 * for the call's tokens, from the embeddings to the final norm.
 *
 * At 135M parameters a decode step is hundreds of small operations, and from Python each
 * costs microseconds of dispatch, more in all than the arithmetic. This is the lean forward
 * of llama.py (same modules, same order of operations) written out in C: RMSNorm, the q/k/v
 * products from 4-bit codes (q4_matmul.c) with their biases and LoRA adapters (each row its
 * own: serving mixes adapters in a batch), the rotary embedding, the KV cache append,
 * attention over each row's cached positions, the output product, the gated SiLU MLP. A row
 * is one token of one sequence: a decode step has a row per sequence, a prefill a row per
 * prompt token. The products run on torch's OpenMP threads (q4_matmul.c), the rows of a call
 * read the codes once; the small operations between them are split by row (and head).
 *
 * Built into one library with q4_matmul.c by slimtune.infer.native_step.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "q4.h"

/* A LoRA adapter of one projection: y += scaling * B (A x). Rank 0: none there. Both factors
 * are kept transposed and their rank padded with zeros to a multiple of RANKS: A's product is
 * then, per input column, one vector of RANKS multiply-adds (no sums across lanes), and B's,
 * per rank, a row of contiguous multiply-adds into y. */
#define RANKS 16
typedef struct {
    const float *a_t; /* (in, rank) */
    const float *b_t; /* (rank, out) */
    int64_t rank;     /* a multiple of RANKS */
    float scaling;
} Adapter;

/* A 4-bit projection with what rides on it: bias, and an adapter per adapter slot. */
typedef struct {
    const Weight4 *weight;
    const float *bias;        /* (out), or NULL */
    const Adapter *adapters;  /* one per slot of the Decoder */
    int bf16;                 /* the layer computes in bfloat16: bfloat16 products where the
                                 CPU has them (q4_matmul.c), its output rounded to bfloat16 */
} Projection;

typedef struct {
    Projection q, k, v, o, gate, up, down;
    const float *input_norm, *post_norm; /* (hidden) */
} Block;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, blocks, slots;
    float eps, attention_scale;
    const Block *block;
    const float *final_norm;
    const float *embedding; /* (vocab, hidden) */
} Decoder;

/* The tokens of one call: row r is token tokens[r] of the cache's sequence sequence[r], at
 * its column column[r]; it sees that sequence's columns [start[r], column[r]] (sequences are
 * left-padded) and is at rotary position column[r] - start[r]. A decode step has one row per
 * sequence; a prefill, a row per prompt token: every row writes its keys and values before
 * any row attends, so rows of one sequence see each other causally. */
typedef struct {
    int64_t rows, sequences, capacity;
    float *const *keys, *const *values; /* per block: (sequences, kv_heads, capacity, head_dim) */
    const int64_t *tokens, *sequence, *column, *start, *slot; /* per row; slot -1: no adapter */
    const float *cos, *signed_sin; /* rotary tables, (positions, head_dim) */
} Batch;

/* Nearest even bfloat16, as torch rounds a float32 tensor to bfloat16. */
static inline float round_bf16(float v) { return bf16_float(bf16_bits(v)); }

/* Eight float lanes (one AVX2 register; half an AVX-512 one): the compiler does not vectorize a
 * float sum by itself, as that reorders it. */
typedef float lanes8 __attribute__((vector_size(32)));

static inline lanes8 load8(const float *p) {
    lanes8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    lanes8 acc[4] = {{0}};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 4; k++) acc[k] += load8(a + i + 8 * k) * load8(b + i + 8 * k);
    for (; i + 8 <= n; i += 8) acc[0] += load8(a + i) * load8(b + i);
    const lanes8 total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    float sum = 0.0f;
    for (int k = 0; k < 8; k++) sum += total[k];
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static void rms_norm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    const float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

/* gate = silu(gate) * up, as the gated MLP does. */
static void silu_mul(float *restrict gate, const float *restrict up, int64_t n) {
    for (int64_t i = 0; i < n; i++) gate[i] = gate[i] / (1.0f + exp_approx(-gate[i])) * up[i];
}

static float sum(const float *x, int64_t n) {
    lanes8 acc = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc += load8(x + i);
    float total = 0.0f;
    for (int k = 0; k < 8; k++) total += acc[k];
    for (; i < n; i++) total += x[i];
    return total;
}

/* Rows of one adapter in a LoRA tile: their sums of 16 lanes in registers. AVX2's 16 registers
 * hold 4 rows' (with 8 they spilled, and a 16-row step over 3 adapters took 7% longer). */
#ifdef __AVX512F__
#define LORA_TILE 8
#else
#define LORA_TILE 4
#endif

/* Sixteen float lanes: one AVX-512 register, two AVX2 ones. */
typedef float lanes16 __attribute__((vector_size(64)));

static inline lanes16 load16(const float *p) {
    lanes16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* y_k += scaling * B (A x_k) for N rows of one adapter: each column of A (a vector of RANKS) is
 * read once for the N rows, each row of B once per 16 outputs of the N rows, whose sums stay
 * in registers across the ranks. Sums are in the order of a plain loop over the columns, then
 * over the ranks. */
static inline __attribute__((always_inline)) void lora_tile(const Adapter *a, int64_t in,
                                                            int64_t out, const float *const *x,
                                                            float *const *y, const int N) {
    for (int64_t r0 = 0; r0 < a->rank; r0 += RANKS) {
        lanes16 u[8] = {{0}};
        for (int64_t i = 0; i < in; i++) {
            const lanes16 column = load16(a->a_t + i * a->rank + r0);
            for (int k = 0; k < N; k++) u[k] += x[k][i] * column;
        }
        float low[8][RANKS];
        for (int k = 0; k < N; k++) {
            const lanes16 scaled = u[k] * a->scaling;
            memcpy(low[k], &scaled, sizeof low[k]);
        }
        const float *b = a->b_t + r0 * out;
        int64_t c = 0;
        for (; c + 16 <= out; c += 16) {
            lanes16 sums[8];
            for (int k = 0; k < N; k++) sums[k] = load16(y[k] + c);
            for (int r = 0; r < RANKS; r++) {
                const lanes16 row = load16(b + r * out + c);
                for (int k = 0; k < N; k++) sums[k] += low[k][r] * row;
            }
            for (int k = 0; k < N; k++) memcpy(y[k] + c, &sums[k], sizeof sums[k]);
        }
        for (; c < out; c++)
            for (int k = 0; k < N; k++)
                for (int r = 0; r < RANKS; r++) y[k][c] += low[k][r] * b[r * out + c];
    }
}

/* The adapters of `count` rows (`rows`, indices in order of their slot) for one projection:
 * each run of rows with one adapter in tiles of up to LORA_TILE. x: (rows, in); y: (rows,
 * out). */
static void lora_rows(const Projection *p, const Batch *b, const int64_t *rows, int64_t count,
                      const float *x, float *y) {
    const int64_t in = p->weight->in, out = p->weight->out;
    for (int64_t i = 0; i < count;) {
        const int64_t slot = b->slot[rows[i]];
        const Adapter *a = slot >= 0 ? p->adapters + slot : NULL;
        int n = 0;
        const float *xs[8];
        float *ys[8];
        for (; i < count && n < LORA_TILE && b->slot[rows[i]] == slot; i++, n++) {
            xs[n] = x + rows[i] * in;
            ys[n] = y + rows[i] * out;
        }
        if (!a || a->rank == 0) continue;
        switch (n) {
        case 1: lora_tile(a, in, out, xs, ys, 1); break;
        case 2: lora_tile(a, in, out, xs, ys, 2); break;
        case 3: lora_tile(a, in, out, xs, ys, 3); break;
        case 4: lora_tile(a, in, out, xs, ys, 4); break;
        case 5: lora_tile(a, in, out, xs, ys, 5); break;
        case 6: lora_tile(a, in, out, xs, ys, 6); break;
        case 7: lora_tile(a, in, out, xs, ys, 7); break;
        default: lora_tile(a, in, out, xs, ys, 8);
        }
    }
}

/* The bias of a product y = W x, and its rounding where the layer computes in bfloat16. */
static void add_bias(const Projection *p, float *y) {
    const int64_t out = p->weight->out;
    if (p->bf16)
        for (int64_t i = 0; i < out; i++) y[i] = round_bf16(y[i]);
    if (p->bias)
        for (int64_t i = 0; i < out; i++)
            y[i] = p->bf16 ? round_bf16(y[i] + round_bf16(p->bias[i])) : y[i] + p->bias[i];
}

/* y_i = W_i x + bias + each row's adapter, for n projections of one input (q/k/v; gate/up),
 * every row: the products in one parallel region, reading the codes once for all rows; then
 * each thread the rest for its share of the rows in order of slot (one adapter's rows
 * together). x: (rows, in); y_i: (rows, out_i). */
static int project(const Batch *b, const int64_t *by_slot, const Projection *const *p, int n,
                   const float *x, float *const *y, int threads) {
    const Weight4 *w[3];
    for (int i = 0; i < n; i++) w[i] = p[i]->weight;
    if (slim_q4_matmul_many(w, n, x, b->rows, y, threads, p[0]->bf16) != 0) return -1;
    const int64_t rows = b->rows;
#pragma omp parallel num_threads(threads) if (rows > 1 && threads > 1)
    {
        const int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
        const int64_t first = rows * part / parts, last = rows * (part + 1) / parts;
        for (int i = 0; i < n; i++) {
            for (int64_t r = first; r < last; r++)
                add_bias(p[i], y[i] + by_slot[r] * p[i]->weight->out);
            lora_rows(p[i], b, by_slot + first, last - first, x, y[i]);
        }
    }
    return 0;
}

/* x * cos + rotate_half(x) * sin for each head of `x`: rotate_half(x) * sin equals
 * roll(x, half) * signed_sin (the first half of sin negated). */
static void rotate(float *x, int64_t heads, int64_t head_dim, const float *cos,
                   const float *signed_sin) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * head_dim, rolled[head_dim];
        /* rolled[j] = v[(j + half) % head_dim]: the upper half, then the lower one */
        memcpy(rolled, v + half, (size_t)(head_dim - half) * sizeof(float));
        memcpy(rolled + head_dim - half, v, (size_t)half * sizeof(float));
        for (int64_t j = 0; j < head_dim; j++) v[j] = v[j] * cos[j] + rolled[j] * signed_sin[j];
    }
}

/* One vector of the lane sums of v[0..15], in order: a tree of 15 pairings, each two shuffles
 * and an add, where 16 separate sums take 15 dependent additions each. */
typedef int32_t index16 __attribute__((vector_size(64)));

static inline lanes16 lane_sums16(const lanes16 *v) {
    const index16 halves[2] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                               {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};
    const index16 quarters[2] = {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
                                 {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}};
    const index16 pairs[2] = {{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
                              {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}};
    const index16 ones[2] = {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
                             {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};
    lanes16 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* vectors 2i, 2i+1: 8 partial sums each */
        a[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], halves[0]) +
               __builtin_shuffle(v[2 * i], v[2 * i + 1], halves[1]);
    for (int i = 0; i < 4; i++) /* vectors 4i..4i+3: 4 each */
        b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], quarters[0]) +
               __builtin_shuffle(a[2 * i], a[2 * i + 1], quarters[1]);
    for (int i = 0; i < 2; i++) /* vectors 8i..8i+7: 2 each */
        c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], pairs[0]) +
               __builtin_shuffle(b[2 * i], b[2 * i + 1], pairs[1]);
    return __builtin_shuffle(c[0], c[1], ones[0]) + __builtin_shuffle(c[0], c[1], ones[1]);
}

/* scores[t] = scale * (query . key t) for HD columns: 16 keys at a time, each key's products
 * in one vector, their lanes summed together (lane_sums16); the keys left over one by one. */
static inline __attribute__((always_inline)) void key_scores(const float *query,
                                                             const float *keys, int64_t length,
                                                             float scale, float *scores,
                                                             const int HD) {
    lanes16 q[HD / 16];
    for (int c = 0; c < HD / 16; c++) q[c] = load16(query + 16 * c);
    int64_t t = 0;
    for (; t + 16 <= length; t += 16) {
        lanes16 products[16];
        for (int k = 0; k < 16; k++) {
            const float *key = keys + (t + k) * HD;
            products[k] = q[0] * load16(key);
            for (int c = 1; c < HD / 16; c++) products[k] += q[c] * load16(key + 16 * c);
        }
        const lanes16 sums = lane_sums16(products) * scale;
        memcpy(scores + t, &sums, sizeof sums);
    }
    for (; t < length; t++) scores[t] = dot(query, keys + t * HD, HD) * scale;
}

/* o = sum over t of (scores[t] / total) values[t] for HD columns, the sums held in registers
 * across the positions (in the order of the plain loop for any head width). */
static inline __attribute__((always_inline)) void weighted_values(const float *scores,
                                                                  float total,
                                                                  const float *values,
                                                                  int64_t length, float *o,
                                                                  const int HD) {
    lanes16 sums[HD / 16];
    for (int c = 0; c < HD / 16; c++) sums[c] = (lanes16){0};
    for (int64_t t = 0; t < length; t++) {
        const float p = scores[t] / total;
        for (int c = 0; c < HD / 16; c++) sums[c] += p * load16(values + t * HD + 16 * c);
    }
    memcpy(o, sums, sizeof sums);
}

/* Softmax attention of each row's query heads over its cached positions, [start, column]
 * (grouped-query: `heads / kv_heads` query heads share one key/value head). q, out: (rows,
 * heads * head_dim). `longest`: the most positions a row sees. */
static void attend(const Decoder *d, const Batch *b, int64_t block, const float *q, float *out,
                   int64_t longest, int threads) {
    const int64_t hd = d->head_dim, group = d->heads / d->kv_heads, items = b->rows * d->heads;
    const int parallel = threads > 1 && items * longest * hd >= (1 << 15);
#pragma omp parallel for num_threads(threads) if (parallel)
    for (int64_t item = 0; item < items; item++) {
        const int64_t r = item / d->heads, h = item % d->heads, first = b->start[r];
        const int64_t length = b->column[r] + 1 - first;
        const int64_t kv_row = b->sequence[r] * d->kv_heads + h / group;
        const int64_t at = (kv_row * b->capacity + first) * hd;
        const float *keys = b->keys[block] + at, *values = b->values[block] + at;
        const float *query = q + item * hd;
        float *scores = malloc((size_t)length * sizeof(float)), top = -INFINITY;
        const float scale = d->attention_scale;
        if (hd == 64) key_scores(query, keys, length, scale, scores, 64);
        else if (hd == 128) key_scores(query, keys, length, scale, scores, 128);
        else
            for (int64_t t = 0; t < length; t++) scores[t] = dot(query, keys + t * hd, hd) * scale;
        for (int64_t t = 0; t < length; t++) top = scores[t] > top ? scores[t] : top;
        for (int64_t t = 0; t < length; t++) scores[t] = exp_approx(scores[t] - top);
        const float total = sum(scores, length);
        float *o = out + item * hd;
        if (hd == 64) weighted_values(scores, total, values, length, o, 64);
        else if (hd == 128) weighted_values(scores, total, values, length, o, 128);
        else {
            memset(o, 0, (size_t)hd * sizeof(float));
            for (int64_t t = 0; t < length; t++) {
                const float p = scores[t] / total;
                for (int64_t j = 0; j < hd; j++) o[j] += p * values[t * hd + j]; /* vectorized */
            }
        }
        free(scores);
    }
}

/* Scratch of one row, in floats. */
static int64_t row_scratch(const Decoder *d) {
    const int64_t width = d->heads * d->head_dim, kv = d->kv_heads * d->head_dim;
    return 2 * d->hidden + 2 * width + 2 * kv + 2 * d->intermediate;
}

/* The block's output added to `hidden` (rows, hidden): the residual stream. */
static int block_step(const Decoder *d, const Batch *b, const int64_t *by_slot, int64_t longest,
                      int64_t index, float *hidden, float *scratch, int threads) {
    const Block *blk = d->block + index;
    const int64_t rows = b->rows, hd = d->head_dim, width = d->heads * hd;
    const int64_t kv = d->kv_heads * hd, n = d->hidden, inter = d->intermediate;
    float *x = scratch, *mixed = x + rows * n, *q = mixed + rows * n, *k = q + rows * width,
          *v = k + rows * kv, *attended = v + rows * kv, *gate = attended + rows * width,
          *up = gate + rows * inter;
    for (int64_t r = 0; r < rows; r++) rms_norm(hidden + r * n, blk->input_norm, n, d->eps, x + r * n);
    const Projection *qkv[] = {&blk->q, &blk->k, &blk->v}, *gate_up[] = {&blk->gate, &blk->up};
    if (project(b, by_slot, qkv, 3, x, (float *[]){q, k, v}, threads)) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t position = b->column[r] - b->start[r];
        const float *cos = b->cos + position * hd, *sin = b->signed_sin + position * hd;
        rotate(q + r * width, d->heads, hd, cos, sin);
        rotate(k + r * kv, d->kv_heads, hd, cos, sin);
        for (int64_t g = 0; g < d->kv_heads; g++) {
            const int64_t kv_row = b->sequence[r] * d->kv_heads + g;
            const int64_t at = (kv_row * b->capacity + b->column[r]) * hd;
            memcpy(b->keys[index] + at, k + r * kv + g * hd, hd * sizeof(float));
            memcpy(b->values[index] + at, v + r * kv + g * hd, hd * sizeof(float));
        }
    }
    attend(d, b, index, q, attended, longest, threads);
    if (project(b, by_slot, (const Projection *[]){&blk->o}, 1, attended, &mixed, threads))
        return -1;
    for (int64_t i = 0; i < rows * n; i++) hidden[i] += mixed[i];
    for (int64_t r = 0; r < rows; r++) rms_norm(hidden + r * n, blk->post_norm, n, d->eps, x + r * n);
    if (project(b, by_slot, gate_up, 2, x, (float *[]){gate, up}, threads)) return -1;
    silu_mul(gate, up, rows * inter);
    if (project(b, by_slot, (const Projection *[]){&blk->down}, 1, gate, &mixed, threads))
        return -1;
    for (int64_t i = 0; i < rows * n; i++) hidden[i] += mixed[i];
    return 0;
}

/* The final-norm hidden states `out` (rows, hidden) of the batch's rows, their keys and values
 * written to their columns of every block's cache (the columns before them must hold their
 * sequence's earlier tokens, or be written by rows of this call). Returns 0, or -1 where a
 * row does not fit the cache or a shape does not fit the kernels. */
int slim_llama_step(const Decoder *d, const Batch *b, float *out, int threads) {
    if (b->rows < 1) return -1;
    int64_t longest = 0;
    for (int64_t r = 0; r < b->rows; r++) {
        if (b->sequence[r] < 0 || b->sequence[r] >= b->sequences || b->start[r] < 0 ||
            b->start[r] > b->column[r] || b->column[r] >= b->capacity || b->slot[r] < -1 ||
            b->slot[r] >= d->slots)
            return -1;
        const int64_t seen = b->column[r] + 1 - b->start[r];
        longest = seen > longest ? seen : longest;
    }
    const int64_t n = d->hidden;
    float *hidden = malloc((size_t)(b->rows * (n + row_scratch(d))) * sizeof(float));
    int64_t *by_slot = malloc((size_t)b->rows * sizeof(int64_t));
    if (!hidden || !by_slot) {
        free(hidden);
        free(by_slot);
        return -1;
    }
    int64_t sorted = 0; /* the rows in order of slot (-1 first), in order within a slot */
    for (int64_t slot = -1; slot < d->slots; slot++)
        for (int64_t r = 0; r < b->rows; r++)
            if (b->slot[r] == slot) by_slot[sorted++] = r;
    for (int64_t r = 0; r < b->rows; r++)
        memcpy(hidden + r * n, d->embedding + b->tokens[r] * n, (size_t)n * sizeof(float));
    int status = 0;
    for (int64_t i = 0; i < d->blocks && status == 0; i++)
        status = block_step(d, b, by_slot, longest, i, hidden, hidden + b->rows * n, threads);
    for (int64_t r = 0; r < b->rows && status == 0; r++)
        rms_norm(hidden + r * n, d->final_norm, n, d->eps, out + r * n);
    free(hidden);
    free(by_slot);
    return status;
}
