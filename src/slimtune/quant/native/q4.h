/* The packed 4-bit weight the kernels read, and their entry points (q4_matmul.c). Other C
 * files compiled into the same library (slimtune.infer's decode step) call them through this. */
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

int slim_q4_matmul(const Weight4 *w, const float *x, int64_t batch, float *y, int threads,
                   int bf16);
int slim_q4_matmul_many(const Weight4 *const *w, int n, const float *x, int64_t batch,
                        float *const *y, int threads, int bf16);
int slim_f32_matmul(const float *w, int64_t out, int64_t in, const float *x, int64_t batch,
                    float *y, int threads);
#endif
