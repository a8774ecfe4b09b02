/* Causal self-attention for training on the CPU, forward and backward (slimtune.models.attention).
 *
 * torch's CPU flash attention runs training's shapes (head width 64, a few hundred positions)
 * near 50 GFLOP/s, a third of the CPU's float32 matmuls, in bfloat16 no faster. Here every
 * product is float32 (bfloat16 inputs widen exactly, so the scores, the softmax and every
 * gradient sum in float32), over keys in blocks that stay in registers:
 *
 * - forward, per (sequence, head), rows ROWS at a time: the scores of keys up to the last row
 *   (K held transposed, KEYS keys per vector block), a softmax per row (exp_approx of q4.h; the
 *   log of its sum kept for backward), then the rows' outputs as sums of value rows;
 * - backward, per (sequence, key/value head), FlashAttention-2's recipe: the probabilities are
 *   recomputed from the scores and the kept logs, dP = dO V^T, dS = P (dP - rowsum(dO O)),
 *   dQ = dS K, and dK += dS^T Q, dV += P^T dO summed over the query heads that share the key
 *   and value head (grouped-query attention), so no thread writes another's rows.
 *
 * Tensors are read and written in place through strides (the head width contiguous), in
 * float32 or bfloat16; the output goes straight to the (sequence, position, head) layout the
 * model's output projection reads. The head width must be a multiple of KEYS. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "q4.h"

/* ROWS query rows x KEYS keys (or head-width values) of sums: 16 vector registers, half of
 * AVX-512's 32, all of AVX2's 16 but for the operands. Measured at SmolLM2's shapes: 8 x 32
 * beat 4 x 64 by ~15% on AVX-512 (fewer loads of the key block and of dK, dV per product);
 * on AVX2, 4 x 32 spilled and was no faster than torch's SDPA, 4 x 16 is 1.35x it. */
#ifdef __AVX512F__
#define KEYS 32
#define ROWS 8
#else
#define KEYS 16
#define ROWS 4
#endif

/* One tensor of (sequence, head, position, head width) in memory: element strides. */
typedef struct {
    void *data;
    int64_t sequence, head, position;
} View;

typedef struct {
    int64_t sequences, heads, kv_heads, length, width;
    float scale;
    int bf16;                         /* the tensors' dtype: 1 bfloat16, 0 float32 */
    View q, k, v, out, grad_out, grad_q, grad_k, grad_v;
    float *lse;                       /* (sequences, heads, length): log of each row's sum */
} Attention;

static inline const char *row_of(const View *t, int64_t s, int64_t h, int64_t i, int bf16) {
    int64_t at = s * t->sequence + h * t->head + i * t->position;
    return (const char *)t->data + at * (bf16 ? 2 : 4);
}

/* n rows of one head into float32 rows of `width` (row r at out + r * stride). */
static void load_rows(const Attention *a, const View *t, int64_t s, int64_t h, int64_t i,
                      int64_t n, float *out, int64_t stride) {
    for (int64_t r = 0; r < n; r++) {
        const char *src = row_of(t, s, h, i + r, a->bf16);
        float *dst = out + r * stride;
        if (a->bf16)
            for (int64_t d = 0; d < a->width; d++) dst[d] = bf16_float(((const uint16_t *)src)[d]);
        else
            memcpy(dst, src, a->width * sizeof(float));
    }
}

/* Transposed: out[d * stride + r] for n rows (keys as columns, for the score blocks). */
static void load_columns(const Attention *a, const View *t, int64_t s, int64_t h, int64_t n,
                         float *out, int64_t stride) {
    for (int64_t r = 0; r < n; r++) {
        const char *src = row_of(t, s, h, r, a->bf16);
        for (int64_t d = 0; d < a->width; d++)
            out[d * stride + r] = a->bf16 ? bf16_float(((const uint16_t *)src)[d])
                                          : ((const float *)src)[d];
    }
}

static void store_row(const Attention *a, const View *t, int64_t s, int64_t h, int64_t i,
                      const float *row) {
    char *dst = (char *)row_of(t, s, h, i, a->bf16);
    if (a->bf16)
        for (int64_t d = 0; d < a->width; d++) ((uint16_t *)dst)[d] = bf16_bits(row[d]);
    else
        memcpy(dst, row, a->width * sizeof(float));
}

static float *zeroed(int64_t n) {
    float *p = aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
    if (p) memset(p, 0, n * sizeof(float));
    return p;
}

/* out[r * out_stride + c] = sum over t < depth of a[r * a_stride + t] * b[t * b_stride + c], for
 * ROWS rows and columns c < `columns` (rounded up to KEYS: `b` must hold them), KEYS columns at
 * a time with their sums in registers. The scores are q . k (a: query rows, b: K transposed);
 * the outputs and dQ, sums of value or key rows (a: the rows' weights, b: the value rows). */
static void row_products(const float *a, int64_t a_stride, const float *b, int64_t b_stride,
                         int64_t depth, int64_t columns, float *out, int64_t out_stride) {
    for (int64_t c0 = 0; c0 < columns; c0 += KEYS) {
        float sums[ROWS][KEYS] = {{0}};
        for (int64_t t = 0; t < depth; t++) {
            const float *row = b + t * b_stride + c0;
            for (int r = 0; r < ROWS; r++) {
                const float x = a[r * a_stride + t];
#pragma omp simd
                for (int c = 0; c < KEYS; c++) sums[r][c] += x * row[c];
            }
        }
        for (int r = 0; r < ROWS; r++) memcpy(out + r * out_stride + c0, sums[r], sizeof sums[r]);
    }
}

/* into[j] += sum_r weights[r * stride + j] * rows[r] for keys [0, keys): dK and dV. */
static void add_outer(const float *weights, int64_t stride, const float *rows, int64_t width,
                      int64_t keys, float *into) {
    for (int64_t j = 0; j < keys; j++) {
        float w[ROWS];
        for (int r = 0; r < ROWS; r++) w[r] = weights[r * stride + j];
        float *dst = into + j * width;
        for (int64_t d0 = 0; d0 < width; d0 += KEYS) {
#pragma omp simd
            for (int d = 0; d < KEYS; d++) {
                float sum = dst[d0 + d];
                for (int r = 0; r < ROWS; r++) sum += w[r] * rows[r * width + d0 + d];
                dst[d0 + d] = sum;
            }
        }
    }
}

/* Probabilities of rows first..first+ROWS-1 in place of their scores: row i sees keys <= i.
 * `lse` given: use it (backward); else compute it into `lse_out`. */
static void softmax_rows(float *scores, int64_t stride, int64_t first, int64_t length,
                         float scale, const float *lse, float *lse_out) {
    for (int r = 0; r < ROWS; r++) {
        const int64_t i = first + r, keys = first + ROWS;
        float *s = scores + r * stride;
        if (i >= length) {  /* a row past the end: no weight anywhere */
            memset(s, 0, keys * sizeof(float));
            continue;
        }
        float shift;
        if (lse) {
            shift = lse[i];
        } else {  /* per-lane maxima, so the loop vectorizes without reordering a reduction */
            float top[16];
            for (int l = 0; l < 16; l++) top[l] = -INFINITY;
            for (int64_t j0 = 0; j0 <= i; j0 += 16)
                for (int l = 0; l < 16; l++) {
                    const float v = float_if(j0 + l <= i, s[j0 + l], -INFINITY);
                    top[l] = float_if(v > top[l], v, top[l]);
                }
            for (int l = 1; l < 16; l++) top[0] = top[l] > top[0] ? top[l] : top[0];
            shift = top[0] * scale;
        }
        const int64_t blocks = (keys + 15) / 16 * 16;  /* within the row: KEYS is a multiple */
        for (int64_t j = 0; j < blocks; j++)
            s[j] = float_if(j <= i, exp_approx(s[j] * scale - shift), 0.0f);
        float part[16] = {0}, total = 0.0f;
        for (int64_t j0 = 0; j0 < blocks; j0 += 16)
            for (int l = 0; l < 16; l++) part[l] += s[j0 + l];
        for (int l = 0; l < 16; l++) total += part[l];
        if (!lse) {
            const float inverse = 1.0f / total;
            for (int64_t j = 0; j <= i; j++) s[j] *= inverse;
            lse_out[i] = shift + logf(total);
        }
    }
}

static int64_t padded(int64_t n) { return (n + KEYS - 1) / KEYS * KEYS; }

static void forward_head(const Attention *a, int64_t s, int64_t h) {
    const int64_t L = a->length, W = a->width, P = padded(L) + KEYS;
    const int64_t kv = h / (a->heads / a->kv_heads);
    float *columns = zeroed(W * P), *values = zeroed(P * W), *rows = zeroed(ROWS * W);
    float *scores = zeroed(ROWS * P), *out = zeroed(ROWS * W);
    load_columns(a, &a->k, s, kv, L, columns, P);
    load_rows(a, &a->v, s, kv, 0, L, values, W);
    float *lse = a->lse + (s * a->heads + h) * L;
    for (int64_t i = 0; i < L; i += ROWS) {
        const int64_t n = L - i < ROWS ? L - i : ROWS, keys = i + ROWS;
        memset(rows, 0, ROWS * W * sizeof(float));
        load_rows(a, &a->q, s, h, i, n, rows, W);
        row_products(rows, W, columns, P, W, keys, scores, P);
        softmax_rows(scores, P, i, L, a->scale, NULL, lse);
        row_products(scores, P, values, W, keys < L ? keys : L, W, out, W);
        for (int64_t r = 0; r < n; r++) store_row(a, &a->out, s, h, i + r, out + r * W);
    }
    free(columns), free(values), free(rows), free(scores), free(out);
}

static void backward_group(const Attention *a, int64_t s, int64_t kv) {
    const int64_t L = a->length, W = a->width, P = padded(L) + KEYS;
    const int64_t group = a->heads / a->kv_heads;
    float *k_columns = zeroed(W * P), *v_columns = zeroed(W * P), *keys_rows = zeroed(P * W);
    float *grad_k = zeroed(P * W), *grad_v = zeroed(P * W);
    float *q = zeroed(ROWS * W), *o = zeroed(ROWS * W), *g = zeroed(ROWS * W);
    float *prob = zeroed(ROWS * P), *grad_s = zeroed(ROWS * P), *grad_q = zeroed(ROWS * W);
    load_columns(a, &a->k, s, kv, L, k_columns, P);
    load_columns(a, &a->v, s, kv, L, v_columns, P);
    load_rows(a, &a->k, s, kv, 0, L, keys_rows, W);
    for (int64_t h = kv * group; h < (kv + 1) * group; h++) {
        const float *lse = a->lse + (s * a->heads + h) * L;
        for (int64_t i = 0; i < L; i += ROWS) {
            const int64_t n = L - i < ROWS ? L - i : ROWS, keys = i + ROWS;
            const int64_t seen = keys < L ? keys : L;
            memset(q, 0, ROWS * W * sizeof(float));
            memset(o, 0, ROWS * W * sizeof(float));
            memset(g, 0, ROWS * W * sizeof(float));
            load_rows(a, &a->q, s, h, i, n, q, W);
            load_rows(a, &a->out, s, h, i, n, o, W);
            load_rows(a, &a->grad_out, s, h, i, n, g, W);
            row_products(q, W, k_columns, P, W, keys, prob, P);
            softmax_rows(prob, P, i, L, a->scale, lse, NULL);
            row_products(g, W, v_columns, P, W, keys, grad_s, P);  /* dP = dO V^T */
            for (int r = 0; r < ROWS; r++) {
                float dot = 0.0f;  /* rowsum(dO * O) */
                for (int64_t d = 0; d < W; d++) dot += g[r * W + d] * o[r * W + d];
                float *ds = grad_s + r * P;
                const float *p = prob + r * P;
#pragma omp simd
                for (int64_t j = 0; j < keys; j++) ds[j] = p[j] * (ds[j] - dot) * a->scale;
            }
            row_products(grad_s, P, keys_rows, W, seen, W, grad_q, W);
            for (int64_t r = 0; r < n; r++) store_row(a, &a->grad_q, s, h, i + r, grad_q + r * W);
            add_outer(grad_s, P, q, W, seen, grad_k);
            add_outer(prob, P, g, W, seen, grad_v);
        }
    }
    for (int64_t j = 0; j < L; j++) {
        store_row(a, &a->grad_k, s, kv, j, grad_k + j * W);
        store_row(a, &a->grad_v, s, kv, j, grad_v + j * W);
    }
    free(k_columns), free(v_columns), free(keys_rows), free(grad_k), free(grad_v);
    free(q), free(o), free(g), free(prob), free(grad_s), free(grad_q);
}

int slim_attention_forward(const Attention *a, int threads) {
    if (a->width % KEYS) return 1;
    const int64_t tasks = a->sequences * a->heads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < tasks; t++) forward_head(a, t / a->heads, t % a->heads);
    return 0;
}

int slim_attention_backward(const Attention *a, int threads) {
    if (a->width % KEYS) return 1;
    const int64_t tasks = a->sequences * a->kv_heads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < tasks; t++) backward_group(a, t / a->kv_heads, t % a->kv_heads);
    return 0;
}

int slim_attention_chunk(void) { return KEYS; }
