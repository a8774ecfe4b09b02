/* One decode step of a LLaMA-family decoder for one stream, in one call: every block of the
 * model for the one new token, from its embedding to the final norm.
 *
 * At 135M parameters a decode step is hundreds of small operations, and from Python each
 * costs microseconds of dispatch, more in all than the arithmetic. This is the lean forward
 * of llama.py (same modules, same order of operations) written out in C for batch 1:
 * RMSNorm, the q/k/v products from 4-bit codes (q4_matmul.c) with their biases and LoRA
 * adapters, the rotary embedding, the KV cache append, attention over the cache, the output
 * product, the gated SiLU MLP. The products run on torch's OpenMP threads (q4_matmul.c);
 * the small operations between them on the calling thread.
 *
 * Built into one library with q4_matmul.c by slimtune.infer.native_step.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "q4.h"

/* A 4-bit projection with what rides on it: bias and at most one LoRA adapter. */
typedef struct {
    const Weight4 *weight;
    const float *bias;     /* (out), or NULL */
    const float *lora_a;   /* (rank, in), or NULL */
    const float *lora_b;   /* (out, rank) */
    int64_t rank;
    float scaling;
    int bf16;              /* the layer computes in bfloat16: its output rounded to it */
} Projection;

typedef struct {
    Projection q, k, v, o, gate, up, down;
    const float *input_norm, *post_norm; /* (hidden) */
    float *keys, *values;                /* (kv_heads, capacity, head_dim) */
} Block;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, capacity, blocks, max_rank;
    float eps, attention_scale;
    const Block *block;
    const float *final_norm;
} Decoder;

/* Nearest even bfloat16, as torch rounds a float32 tensor to bfloat16. */
static inline float round_bf16(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7f800000u) != 0x7f800000u) bits += 0x7fffu + ((bits >> 16) & 1u);
    bits &= 0xffff0000u;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static void rms_norm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    const float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

/* y = W x (+ bias) + scaling * B (A x). `lora` holds rank floats of scratch. */
static int project(const Projection *p, const float *x, float *y, float *lora, int threads) {
    const int64_t out = p->weight->out, in = p->weight->in;
    if (slim_q4_matmul(p->weight, x, 1, y, threads) != 0) return -1;
    if (p->bf16)
        for (int64_t i = 0; i < out; i++) y[i] = round_bf16(y[i]);
    if (p->bias)
        for (int64_t i = 0; i < out; i++)
            y[i] = p->bf16 ? round_bf16(y[i] + round_bf16(p->bias[i])) : y[i] + p->bias[i];
    if (p->lora_a) {
        for (int64_t r = 0; r < p->rank; r++) lora[r] = dot(p->lora_a + r * in, x, in);
        for (int64_t i = 0; i < out; i++)
            y[i] += p->scaling * dot(p->lora_b + i * p->rank, lora, p->rank);
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
        for (int64_t j = 0; j < head_dim; j++) rolled[j] = v[(j + half) % head_dim];
        for (int64_t j = 0; j < head_dim; j++) v[j] = v[j] * cos[j] + rolled[j] * signed_sin[j];
    }
}

/* Softmax attention of each query head over the first `length` cached positions of its
 * key/value head (grouped-query: `heads / kv_heads` query heads share one). */
static void attend(const Decoder *d, const Block *b, const float *q, int64_t length, float *out,
                   int threads) {
    const int64_t hd = d->head_dim, group = d->heads / d->kv_heads;
    const int parallel = threads > 1 && length * d->heads * hd >= (1 << 15);
#pragma omp parallel for num_threads(threads) if (parallel)
    for (int64_t h = 0; h < d->heads; h++) {
        const float *keys = b->keys + (h / group) * d->capacity * hd;
        const float *values = b->values + (h / group) * d->capacity * hd;
        float *scores = malloc((size_t)length * sizeof(float)), top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < length; t++) {
            scores[t] = dot(q + h * hd, keys + t * hd, hd) * d->attention_scale;
            top = scores[t] > top ? scores[t] : top;
        }
        for (int64_t t = 0; t < length; t++) total += scores[t] = expf(scores[t] - top);
        float *o = out + h * hd;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int64_t t = 0; t < length; t++) {
            const float p = scores[t] / total;
            for (int64_t j = 0; j < hd; j++) o[j] += p * values[t * hd + j];
        }
        free(scores);
    }
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* Scratch of one step, in floats. */
static int64_t scratch_size(const Decoder *d) {
    const int64_t width = d->heads * d->head_dim, kv = d->kv_heads * d->head_dim;
    return 3 * d->hidden + 2 * width + 2 * kv + 2 * d->intermediate + d->max_rank;
}

/* The block's output added to `hidden` (the residual stream). */
static int block_step(const Decoder *d, const Block *b, float *hidden, int64_t position,
                      const float *cos, const float *signed_sin, float *scratch, int threads) {
    const int64_t hd = d->head_dim, width = d->heads * hd, kv = d->kv_heads * hd;
    float *x = scratch, *mixed = x + d->hidden, *q = mixed + d->hidden, *k = q + width,
          *v = k + kv, *attended = v + kv, *gate = attended + width, *up = gate + d->intermediate,
          *lora = up + d->intermediate;
    rms_norm(hidden, b->input_norm, d->hidden, d->eps, x);
    if (project(&b->q, x, q, lora, threads) || project(&b->k, x, k, lora, threads) ||
        project(&b->v, x, v, lora, threads))
        return -1;
    rotate(q, d->heads, hd, cos, signed_sin);
    rotate(k, d->kv_heads, hd, cos, signed_sin);
    for (int64_t g = 0; g < d->kv_heads; g++) {
        memcpy(b->keys + (g * d->capacity + position) * hd, k + g * hd, hd * sizeof(float));
        memcpy(b->values + (g * d->capacity + position) * hd, v + g * hd, hd * sizeof(float));
    }
    attend(d, b, q, position + 1, attended, threads);
    if (project(&b->o, attended, mixed, lora, threads)) return -1;
    for (int64_t i = 0; i < d->hidden; i++) hidden[i] += mixed[i];
    rms_norm(hidden, b->post_norm, d->hidden, d->eps, x);
    if (project(&b->gate, x, gate, lora, threads) || project(&b->up, x, up, lora, threads))
        return -1;
    for (int64_t i = 0; i < d->intermediate; i++) gate[i] = silu(gate[i]) * up[i];
    if (project(&b->down, gate, mixed, lora, threads)) return -1;
    for (int64_t i = 0; i < d->hidden; i++) hidden[i] += mixed[i];
    return 0;
}

/* The final-norm hidden state (hidden) of the token whose embedding is `embedding`, at
 * `position` (its keys and values written to that column of every block's cache; earlier
 * columns must hold the tokens before it). `cos`/`signed_sin`: the rotary tables' row for
 * the position. Returns 0, or -1 where a shape does not fit the kernels. */
int slim_llama_step(const Decoder *d, const float *embedding, int64_t position, const float *cos,
                    const float *signed_sin, float *out, int threads) {
    if (position < 0 || position >= d->capacity) return -1;
    float *hidden = malloc((size_t)(d->hidden + scratch_size(d)) * sizeof(float));
    if (!hidden) return -1;
    memcpy(hidden, embedding, (size_t)d->hidden * sizeof(float));
    int status = 0;
    for (int64_t i = 0; i < d->blocks && status == 0; i++)
        status = block_step(d, d->block + i, hidden, position, cos, signed_sin,
                            hidden + d->hidden, threads);
    if (status == 0) rms_norm(hidden, d->final_norm, d->hidden, d->eps, out);
    free(hidden);
    return status;
}
