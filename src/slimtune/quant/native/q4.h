/* The packed 4-bit weight the kernels read, and their entry points (q4_matmul.c). Other C
 * files compiled into the same library (slimtune.infer's decode step, slimtune.models'
 * attention) call them through this, and share its small helpers. */
#ifndef SLIMTUNE_Q4_H
#define SLIMTUNE_Q4_H
#include <stdint.h>
#include <string.h>

/* A packed 4-bit weight, described once per layer (mirrored by slimtune.quant.native). */
typedef struct {
    const uint8_t *packed;   /* (out, in / 2) */
    int64_t out, in, blocksize;
    const float *lut;        /* the 16 code values */
    const float *absmax;     /* (out, in / blocksize): double-quantized scales decoded once, as
                                a decode at every product costs as much as the block's products */
} Weight4;

/* Nearest even bfloat16 bits of a float32, as torch rounds (infinities and NaN kept). */
static inline uint16_t bf16_bits(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7f800000u) != 0x7f800000u) bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* The float32 a bfloat16 stands for (exact). */
static inline float bf16_float(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* condition ? then : otherwise, through bit masks. A float ternary stays a branch in GCC's
 * AVX2 loops (float compares may trap under its default -ftrapping-math, and AVX2 has no mask
 * registers), which keeps the loop from vectorizing; this form vectorizes everywhere. Both
 * values are computed whatever the condition. */
static inline float float_if(int condition, float then, float otherwise) {
    uint32_t a, b;
    memcpy(&a, &then, sizeof a);
    memcpy(&b, &otherwise, sizeof b);
    const uint32_t mask = -(uint32_t)(condition != 0), bits = (a & mask) | (b & ~mask);
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* e^x as Cephes' expf computes it: x = n ln2 + r with |r| <= ln2 / 2, a degree-5 polynomial in
 * r, times 2^n; within 2 ulp of expf. Only arithmetic and float_if, so that loops over it
 * vectorize (libm's expf is a call per value; floorf for n kept GCC from vectorizing, hence the
 * rounding by adding and taking away 1.5 x 2^23). */
static inline float exp_approx(float x) {
    x = float_if(x < -87.3f, -87.3f, x);
    x = float_if(x > 88.3f, 88.3f, x);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* nearest */
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;           /* ln2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

int slim_q4_matmul(const Weight4 *w, const float *x, int64_t batch, float *y, int threads,
                   int bf16);
int slim_q4_matmul_many(const Weight4 *const *w, int n, const float *x, int64_t batch,
                        float *const *y, int threads, int bf16);
int slim_f32_matmul(const float *w, int64_t out, int64_t in, const float *x, int64_t batch,
                    float *y, int threads);
#endif
