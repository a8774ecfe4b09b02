/* Matmuls and decoding straight from packed 4-bit codes (bitsandbytes' layout), on a CPU.
 *
 *   slim_q4_matmul   y = x @ W.T for a few input rows (decode steps, short prompts)
 *   slim_q4_matmul_many  the same for weights sharing the input, in one parallel region
 *   slim_q4_decode   the float32 or bfloat16 values of rows of codes (training's bands)
 *   slim_f32_matmul  y = x @ W.T for a few rows against a big float32 W (the output layer)
 *   slim_bf16_matmul the same against a bfloat16 W (the output layer in bfloat16 compute)
 *
 * The matmuls from codes compute in float32, or, asked for bfloat16 on a CPU with AVX512_BF16,
 * as a bfloat16 decode-then-matmul does (see "Bfloat16 products" below).
 *
 * A weight is code_value[nibble] * absmax[block]. For every block the 16 code values are scaled
 * by the block's absmax once, kept in registers, and the nibbles index them with a vector
 * permute (AVX-512: one vpermps gives 16 weights; AVX2: two vpermps and a blend give 8; plain C
 * elsewhere). In the matmul each decoded vector of weights is multiplied into up to 16 input
 * rows before the next is decoded, so a batch of rows reads the codes once, and nothing the
 * size of a weight is ever written. AVX2 products of up to 7 input rows look the code values
 * up byte by byte instead (see "AVX2 products through byte-plane lookups").
 *
 * Packing: byte j of a row holds weight 2j in its high nibble and 2j + 1 in its low nibble. The
 * matmul therefore splits the input rows once per call into their even and odd columns (per
 * chunk of 2 * LANES columns), so that high nibbles meet even columns and low nibbles odd ones.
 *
 * Rows are split between torch's OpenMP threads (see run()).
 *
 * Built by slimtune.quant.native with the host compiler for the host CPU (-march=native).
 */
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "q4.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LANES 16
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
#else
#define LANES 1
#endif
#define CHUNK (2 * LANES) /* weights decoded per step: LANES bytes */
#define BF16_CHUNK 64    /* weights a step of the bfloat16 products: 32 bytes */
#define PLANE_CHUNK 64   /* weights a step of AVX2's byte-plane products: 32 bytes */
#define MAX_TILE 16      /* input rows multiplied per decoded vector */
#define MAX_WEIGHTS 8    /* weights sharing an input in one call */

typedef struct {
    const Weight4 *w;
    const float *x;          /* (batch, in) rearranged: per chunk LANES even then LANES odd */
    int64_t batch;
    float *y;                /* (batch, out) */
} Job;

#if LANES == 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
typedef struct { __m512 t; } Table;
static inline Table scaled_table(const float *lut, float s) {
    Table t = {_mm512_mul_ps(_mm512_loadu_ps(lut), _mm512_set1_ps(s))};
    return t;
}
/* 16 bytes -> the 16 high-nibble weights and the 16 low-nibble weights. */
static inline void decode(const uint8_t *p, const Table *t, vec *hi, vec *lo) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t->t);
    *lo = _mm512_permutexvar_ps(v, t->t); /* vpermps reads the index's low 4 bits only */
}
#elif LANES == 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
typedef struct { __m256 low8, high8; } Table; /* code values 0-7 and 8-15 */
static inline Table scaled_table(const float *lut, float s) {
    __m256 scale = _mm256_set1_ps(s);
    Table t = {_mm256_mul_ps(_mm256_loadu_ps(lut), scale),
               _mm256_mul_ps(_mm256_loadu_ps(lut + 8), scale)};
    return t;
}
/* vpermps reads the index's low 3 bits; bit 3 picks the table half, through the sign bit. */
static inline vec lookup(__m256i index, __m256i bit3_as_sign, const Table *t) {
    __m256 a = _mm256_permutevar8x32_ps(t->low8, index);
    __m256 b = _mm256_permutevar8x32_ps(t->high8, index);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(bit3_as_sign));
}
static inline void decode(const uint8_t *p, const Table *t, vec *hi, vec *lo) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *hi = lookup(_mm256_srli_epi32(v, 4), _mm256_slli_epi32(v, 24), t);
    *lo = lookup(v, _mm256_slli_epi32(v, 28), t);
}
#else
typedef float vec;
static inline vec vzero(void) { return 0.0f; }
static inline vec vload(const float *p) { return *p; }
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
static inline float vsum(vec a) { return a; }
typedef struct { float t[16]; } Table;
static inline Table scaled_table(const float *lut, float s) {
    Table t;
    for (int i = 0; i < 16; i++) t.t[i] = lut[i] * s;
    return t;
}
static inline void decode(const uint8_t *p, const Table *t, vec *hi, vec *lo) {
    *hi = t->t[*p >> 4];
    *lo = t->t[*p & 15];
}
#endif

/* out[i] = the sum of v[i]'s lanes, for i < count <= 16 (v holds 16; its tail is overwritten).
 * With AVX-512 and 8 or more, a tree of 15 additions and 31 shuffles that transposes as it
 * adds, where 16 separate sums take about 8 operations each. */
static inline void lane_sums(vec *v, int count, float *out) {
#if LANES == 16
    if (count >= 8) {
        for (int i = count; i < 16; i++) v[i] = vzero();
        __m512 pairs[8], quads[4], halves[2];
        for (int i = 0; i < 8; i++) /* 256-bit halves: v[2i]'s 8 partial sums, then v[2i+1]'s */
            pairs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                                     _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
        for (int i = 0; i < 4; i++) /* 128-bit quarters: 4 partial sums each of 4 vectors */
            quads[i] = _mm512_add_ps(_mm512_shuffle_f32x4(pairs[2 * i], pairs[2 * i + 1], 0x88),
                                     _mm512_shuffle_f32x4(pairs[2 * i], pairs[2 * i + 1], 0xDD));
        for (int i = 0; i < 2; i++) /* within each quarter: 2 partial sums each */
            halves[i] = _mm512_add_ps(_mm512_shuffle_ps(quads[2 * i], quads[2 * i + 1], 0x44),
                                      _mm512_shuffle_ps(quads[2 * i], quads[2 * i + 1], 0xEE));
        const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(halves[0], halves[1], 0x88),
                                          _mm512_shuffle_ps(halves[0], halves[1], 0xDD));
        /* lane l holds the sum of v[4 (l % 4) + l / 4] */
        const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        float all[16];
        _mm512_storeu_ps(all, _mm512_permutexvar_ps(order, sums));
        for (int i = 0; i < count; i++) out[i] = all[i];
        return;
    }
#endif
    for (int i = 0; i < count; i++) out[i] = vsum(v[i]);
}

/* ---- Decoding into memory (training's bands): LANES weights in their natural order. ---- */

#if LANES == 16
/* 8 bytes -> 16 weights: each byte twice, shifted right by 4 (high nibble) or 0 (low). */
static inline vec decode_natural(const uint8_t *p, const Table *t) {
    const __m128i twice = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    __m128i bytes = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)p), twice);
    __m512i index = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(bytes), shifts);
    return _mm512_permutexvar_ps(index, t->t);
}
static inline void store(float *out, vec v) { _mm512_storeu_ps(out, v); }
static inline __m512i round_to_bf16(vec v) { /* nearest even, on the top 16 bits */
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    return _mm512_srli_epi32(bits, 16);
}
static inline void store_bf16(uint16_t *out, vec v) {
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(round_to_bf16(v)));
}
#elif LANES == 8
static inline vec decode_natural(const uint8_t *p, const Table *t) {
    const __m128i twice = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    int32_t four;
    memcpy(&four, p, 4);
    __m128i bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(four), twice);
    __m256i index = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(bytes), shifts);
    return lookup(index, _mm256_slli_epi32(index, 28), t);
}
static inline void store(float *out, vec v) { _mm256_storeu_ps(out, v); }
static inline void store_bf16(uint16_t *out, vec v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
    _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(packed));
}
#else
static inline vec decode_natural(const uint8_t *p, const Table *t) { return t->t[*p >> 4]; }
static inline void store(float *out, vec v) { *out = v; }
static inline void store_bf16(uint16_t *out, vec v) { *out = bf16_bits(v); }
#endif

typedef struct {
    const uint8_t *codes;    /* (rows, width) bytes, rows `code_stride` apart */
    int64_t width, code_stride;
    const float *absmax;     /* (rows, blocks), rows `absmax_stride` apart */
    int64_t blocks, absmax_stride;
    const float *lut;
    void *out;               /* (rows, 2 * width) float32 or bfloat16 bits, contiguous */
    int bf16;
} DecodeJob;

static void decode_rows(const void *job, int64_t r0, int64_t r1) {
    const DecodeJob *j = job;
    const int64_t per_block = j->width / j->blocks; /* bytes */
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = j->codes + r * j->code_stride;
        for (int64_t k = 0; k < j->blocks; k++) {
            Table table = scaled_table(j->lut, j->absmax[r * j->absmax_stride + k]);
            for (int64_t b = k * per_block; b < (k + 1) * per_block; b += (LANES + 1) / 2) {
#if LANES == 1
                const vec values[2] = {table.t[row[b] >> 4], table.t[row[b] & 15]};
                for (int h = 0; h < 2; h++) {
                    const int64_t at = r * 2 * j->width + 2 * b + h;
                    if (j->bf16) store_bf16((uint16_t *)j->out + at, values[h]);
                    else store((float *)j->out + at, values[h]);
                }
#else
                const vec v = decode_natural(row + b, &table);
                const int64_t at = r * 2 * j->width + 2 * b;
                if (j->bf16) store_bf16((uint16_t *)j->out + at, v);
                else store((float *)j->out + at, v);
#endif
            }
        }
    }
}

/* Codes and scales of rows [row, row + n) of W fetched into the cache ahead of their products:
 * the hardware's prefetcher starts over at every weight and every 4 KiB page, and a product of
 * one or two input rows waits on it (a tenth of its time). Bigger tiles are bound by their
 * products and skip it. */
#define PREFETCH_ROWS 4
static inline void prefetch_rows(const Weight4 *w, int64_t row, int64_t n) {
    if (row + n > w->out) n = w->out - row;
    if (n <= 0) return;
    const int64_t bytes = w->in / 2, blocks = w->in / w->blocksize;
    const char *codes = (const char *)(w->packed + row * bytes);
    const char *scales = (const char *)(w->absmax + row * blocks);
    for (int64_t at = 0; at < n * bytes; at += 64) __builtin_prefetch(codes + at, 0, 3);
    for (int64_t at = 0; at < n * blocks * 4; at += 64) __builtin_prefetch(scales + at, 0, 3);
}

/* Rows [r0, r1) of W against input rows [b0, b0 + TILE). Inlined with TILE a constant, so the
 * accumulators live in registers. Small tiles keep two accumulators an input row (high and low
 * nibbles: two independent chains of multiply-adds in flight); big tiles have chains enough
 * and one accumulator each, so that they fit the register file. */
static inline __attribute__((always_inline)) void tile_rows(const Job *j, int64_t r0,
                                                            int64_t r1, int64_t b0,
                                                            const int TILE) {
    const Weight4 *w = j->w;
    const int64_t in = w->in, bytes = in / 2, blocks = in / w->blocksize;
    const int64_t chunks = w->blocksize / CHUNK;
    for (int64_t r = r0; r < r1; r++) {
        if (TILE <= 2) prefetch_rows(w, r + PREFETCH_ROWS, 1);
        const uint8_t *row = w->packed + r * bytes;
        vec acc_hi[MAX_TILE], acc_lo[MAX_TILE];
        for (int t = 0; t < TILE; t++) acc_hi[t] = acc_lo[t] = vzero();
        const float *scale = w->absmax + r * blocks;
        for (int64_t k = 0; k < blocks; k++) {
            Table table = scaled_table(w->lut, scale[k]);
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t col = (k * chunks + c) * CHUNK;
                vec hi, lo;
                decode(row + col / 2, &table, &hi, &lo);
                for (int t = 0; t < TILE; t++) {
                    const float *x = j->x + (b0 + t) * in + col;
                    if (TILE <= 2) {
                        acc_hi[t] = vfma(hi, vload(x), acc_hi[t]);
                        acc_lo[t] = vfma(lo, vload(x + LANES), acc_lo[t]);
                    } else {
                        acc_hi[t] = vfma(lo, vload(x + LANES), vfma(hi, vload(x), acc_hi[t]));
                    }
                }
            }
        }
        for (int t = 0; t < TILE; t++)
            j->y[(b0 + t) * w->out + r] = vsum(acc_hi[t]) + vsum(acc_lo[t]);
    }
}

#if LANES == 16
/* Two rows of W against TILE input rows: each input vector loaded feeds two multiply-adds, so
 * big tiles are bound by the multiply-adds rather than by loads (32 registers hold 2 x TILE
 * accumulators for TILE up to 8), and one or two input rows get four independent chains of
 * multiply-adds each. Rows r0, r0 + 1 ... r1 - 1 with r1 - r0 even. */
static inline __attribute__((always_inline)) void tile_row_pairs(const Job *j, int64_t r0,
                                                                 int64_t r1, int64_t b0,
                                                                 const int TILE) {
    const Weight4 *w = j->w;
    const int64_t in = w->in, bytes = in / 2, blocks = in / w->blocksize;
    const int64_t chunks = w->blocksize / CHUNK;
    for (int64_t r = r0; r < r1; r += 2) {
        if (TILE <= 2) prefetch_rows(w, r + PREFETCH_ROWS, 2);
        const uint8_t *row0 = w->packed + r * bytes, *row1 = row0 + bytes;
        vec acc0[MAX_TILE], acc1[MAX_TILE], lo_acc0[2], lo_acc1[2]; /* lo_: small tiles */
        for (int t = 0; t < TILE; t++) acc0[t] = acc1[t] = vzero();
        lo_acc0[0] = lo_acc0[1] = lo_acc1[0] = lo_acc1[1] = vzero();
        const float *scale0 = w->absmax + r * blocks, *scale1 = scale0 + blocks;
        for (int64_t k = 0; k < blocks; k++) {
            Table table0 = scaled_table(w->lut, scale0[k]);
            Table table1 = scaled_table(w->lut, scale1[k]);
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t col = (k * chunks + c) * CHUNK;
                vec hi0, lo0, hi1, lo1;
                decode(row0 + col / 2, &table0, &hi0, &lo0);
                decode(row1 + col / 2, &table1, &hi1, &lo1);
                for (int t = 0; t < TILE; t++) {
                    const float *x = j->x + (b0 + t) * in + col;
                    const vec even = vload(x), odd = vload(x + LANES);
                    if (TILE <= 2) { /* four independent chains of multiply-adds an input row */
                        acc0[t] = vfma(hi0, even, acc0[t]);
                        lo_acc0[t] = vfma(lo0, odd, lo_acc0[t]);
                        acc1[t] = vfma(hi1, even, acc1[t]);
                        lo_acc1[t] = vfma(lo1, odd, lo_acc1[t]);
                    } else {
                        acc0[t] = vfma(lo0, odd, vfma(hi0, even, acc0[t]));
                        acc1[t] = vfma(lo1, odd, vfma(hi1, even, acc1[t]));
                    }
                }
            }
        }
        vec all[16];
        float sums[16];
        for (int t = 0; t < TILE; t++) {
            all[t] = TILE <= 2 ? _mm512_add_ps(acc0[t], lo_acc0[t]) : acc0[t];
            all[TILE + t] = TILE <= 2 ? _mm512_add_ps(acc1[t], lo_acc1[t]) : acc1[t];
        }
        lane_sums(all, 2 * TILE, sums);
        for (int t = 0; t < TILE; t++) {
            j->y[(b0 + t) * w->out + r] = sums[t];
            j->y[(b0 + t) * w->out + r + 1] = sums[TILE + t];
        }
    }
}
#endif

#if LANES == 16 && defined(__AVX512BF16__)
/* ---- Bfloat16 products (AVX512_BF16), for layers that compute in bfloat16. ----
 *
 * The weights a decode-then-matmul in bfloat16 multiplies: each code value times the block's
 * absmax, rounded to bfloat16; the input rounded to bfloat16; sums in float32. vdpbf16ps does
 * 32 multiply-adds an instruction (twice vfmadd231ps) and vpermw looks up 32 weights (twice
 * vpermps), so a step takes 64 weights: 32 bytes of codes. Its input is arranged per 64
 * columns as the 32 even columns, then the 32 odd ones (bfloat16 pairs), so that the
 * high-nibble weights (even columns) meet the even half, the low-nibble ones the odd half. */
#define HAVE_BF16_DOT 1

typedef struct {
    const Weight4 *w;
    const uint16_t *x;       /* (batch, in) bfloat16 bits, arranged as above */
    int64_t batch;
    float *y;                /* (batch, out) */
} Bf16Job;

/* The block's 16 scaled code values in bfloat16, twice over: vpermw reads an index's low 5
 * bits, and a byte's low 5 bits are its low nibble plus one bit of the high one. */
static inline __m512i bf16_table(const float *lut, float s) {
    const __m256bh t = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(lut), _mm512_set1_ps(s)));
    return _mm512_broadcast_i64x4((__m256i)t);
}

/* NW (1 or 2) rows of W at a time against TILE input rows. One or two input rows keep two
 * accumulators a pair (high and low nibbles): more independent chains of dot products. */
static inline __attribute__((always_inline)) void bf16_tile(const Bf16Job *j, int64_t r0,
                                                            int64_t r1, int64_t b0,
                                                            const int NW, const int TILE) {
    const Weight4 *w = j->w;
    const int64_t in = w->in, bytes = in / 2, blocks = in / w->blocksize;
    const int64_t steps = w->blocksize / BF16_CHUNK;
    for (int64_t r = r0; r + NW <= r1; r += NW) {
        if (TILE <= 2) prefetch_rows(w, r + PREFETCH_ROWS, NW);
        __m512 acc[2][MAX_TILE], lo_acc[2][2];
        for (int n = 0; n < NW; n++) {
            for (int t = 0; t < TILE; t++) acc[n][t] = _mm512_setzero_ps();
            lo_acc[n][0] = lo_acc[n][1] = _mm512_setzero_ps();
        }
        const float *scale[2] = {w->absmax + r * blocks, w->absmax + (r + 1) * blocks};
        for (int64_t k = 0; k < blocks; k++) {
            __m512i table[2];
            for (int n = 0; n < NW; n++) table[n] = bf16_table(w->lut, scale[n][k]);
            for (int64_t c = 0; c < steps; c++) {
                const int64_t col = (k * steps + c) * BF16_CHUNK;
                __m512bh hi[2], lo[2];
                for (int n = 0; n < NW; n++) {
                    const uint8_t *p = w->packed + (r + n) * bytes + col / 2;
                    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
                    hi[n] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table[n]);
                    lo[n] = (__m512bh)_mm512_permutexvar_epi16(v, table[n]);
                }
                for (int t = 0; t < TILE; t++) {
                    const uint16_t *x = j->x + (b0 + t) * in + col;
                    const __m512bh even = (__m512bh)_mm512_loadu_si512(x);
                    const __m512bh odd = (__m512bh)_mm512_loadu_si512(x + 32);
                    for (int n = 0; n < NW; n++) {
                        if (TILE <= 2) {
                            acc[n][t] = _mm512_dpbf16_ps(acc[n][t], hi[n], even);
                            lo_acc[n][t] = _mm512_dpbf16_ps(lo_acc[n][t], lo[n], odd);
                        } else {
                            acc[n][t] = _mm512_dpbf16_ps(
                                _mm512_dpbf16_ps(acc[n][t], hi[n], even), lo[n], odd);
                        }
                    }
                }
            }
        }
        vec all[16];
        float sums[16];
        for (int n = 0; n < NW; n++)
            for (int t = 0; t < TILE; t++)
                all[n * TILE + t] = TILE <= 2 ? _mm512_add_ps(acc[n][t], lo_acc[n][t]) : acc[n][t];
        lane_sums(all, NW * TILE, sums);
        for (int t = 0; t < TILE; t++)
            for (int n = 0; n < NW; n++) j->y[(b0 + t) * w->out + r + n] = sums[n * TILE + t];
    }
}

static void bf16_rows(const void *job, int64_t r0, int64_t r1) {
    const Bf16Job *j = job;
    const int64_t even = r0 + (r1 - r0) / 2 * 2;
    int64_t b = 0;
    while (b < j->batch) {
        const int64_t left = j->batch - b;
        if (left >= 16) { /* two tiles of 8 a pair of rows: the pair's codes stay in L1 for the
                             second (a tile over all the rows, then the next, took 11% longer) */
            for (int64_t r = r0; r < even; r += 2) {
                bf16_tile(j, r, r + 2, b, 2, 8);
                bf16_tile(j, r, r + 2, b + 8, 2, 8);
            }
            bf16_tile(j, even, r1, b, 1, 8);
            bf16_tile(j, even, r1, b + 8, 1, 8);
            b += 16;
            continue;
        }
        const int tile = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        switch (tile) {
        case 8: bf16_tile(j, r0, even, b, 2, 8); bf16_tile(j, even, r1, b, 1, 8); break;
        case 4: bf16_tile(j, r0, even, b, 2, 4); bf16_tile(j, even, r1, b, 1, 4); break;
        case 2: bf16_tile(j, r0, even, b, 2, 2); bf16_tile(j, even, r1, b, 1, 2); break;
        default: bf16_tile(j, r0, even, b, 2, 1); bf16_tile(j, even, r1, b, 1, 1);
        }
        b += tile;
    }
}
#endif

#if LANES == 8
/* ---- AVX2 products through byte-plane lookups ----
 *
 * vpermps looks up in a table of 8 floats, so the lookups above take two and a blend for every
 * 8 weights, and on AMD Zen 3 vpermps issues once a cycle: the lookups, not memory, bound them.
 * vpshufb looks up 32 bytes at once in tables of 16 bytes. Byte k of the 16 code values' float32
 * bits makes one such table (a "plane"); four vpshufb give the four bytes of 32 weights and two
 * rounds of unpacking put them together. The planes hold the code values unscaled (scaled ones
 * would be rebuilt every block), so a block's products are summed and then multiplied by its
 * absmax. For up to 7 input rows (decode steps), in blocks of a multiple of 64 weights; tiles
 * of 8 are bound by their multiply-adds and keep the path above. Measured on AMD Zen 3 only:
 * slimtune.quant.native turns them off on other vendors' CPUs (slim_q4_byte_planes), as
 * Intel cores before Ice Lake issue vpshufb, the unpacks and vpermps all on one port. */
typedef struct { __m256i byte[4]; } Planes;

/* Whether AVX2 products of up to 7 rows take the byte-plane lookups (set through
 * slim_q4_byte_planes when slimtune.quant.native opens the library), or the vpermps tiles. */
static int byte_planes_on = 1;

static inline Planes byte_planes(const float *lut) {
    uint8_t bytes[4][32];
    for (int i = 0; i < 32; i++) {
        uint32_t bits;
        memcpy(&bits, lut + i % 16, sizeof bits);
        for (int k = 0; k < 4; k++) bytes[k][i] = (uint8_t)(bits >> (8 * k));
    }
    Planes p;
    for (int k = 0; k < 4; k++) p.byte[k] = _mm256_loadu_si256((const __m256i *)bytes[k]);
    return p;
}

/* 32 code indices, one a byte -> their 32 code values, in the order plane_column gives. */
static inline void plane_lookup(__m256i index, const Planes *p, vec *w) {
    const __m256i b0 = _mm256_shuffle_epi8(p->byte[0], index);
    const __m256i b1 = _mm256_shuffle_epi8(p->byte[1], index);
    const __m256i b2 = _mm256_shuffle_epi8(p->byte[2], index);
    const __m256i b3 = _mm256_shuffle_epi8(p->byte[3], index);
    /* bytes 0-1 and 2-3 of each value side by side, then the two pairs */
    const __m256i first = _mm256_unpacklo_epi8(b0, b1), second = _mm256_unpackhi_epi8(b0, b1);
    const __m256i top_first = _mm256_unpacklo_epi8(b2, b3);
    const __m256i top_second = _mm256_unpackhi_epi8(b2, b3);
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(first, top_first));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(first, top_first));
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(second, top_second));
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(second, top_second));
}

/* 32 bytes -> the 32 unscaled code values of their high nibbles (half 0) or low ones (1). */
static inline void decode_half(const uint8_t *p, int half, const Planes *planes, vec w[4]) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i *)p), nibble = _mm256_set1_epi8(15);
    plane_lookup(_mm256_and_si256(half ? bytes : _mm256_srli_epi16(bytes, 4), nibble), planes, w);
}

/* The column of a 64-column step whose weight the byte-plane lookups put at position i:
 * positions 0-31 hold the high nibbles' (even columns), 32-63 the low ones' (odd). Unpacking
 * works within 128-bit halves, so vector v of a half holds bytes 4v..4v+3, then 16+4v..16+4v+3. */
static inline int64_t plane_column(int64_t i) {
    const int64_t low_nibble = i / 32, v = i % 32 / 8, lane = i % 8;
    const int64_t byte = (lane < 4 ? 0 : 12) + 4 * v + lane;
    return 2 * byte + low_nibble;
}

/* Rows [r0, r1) of W against input rows [b0, b0 + TILE) for TILE 1 to 4, as tile_rows: each
 * block summed apart in chains of multiply-adds (four for one input row: a multiply-add's
 * latency would bind two), then multiplied by its absmax. */
static inline __attribute__((always_inline)) void plane_tile(const Job *j, int64_t r0,
                                                             int64_t r1, int64_t b0,
                                                             const int TILE) {
    const Weight4 *w = j->w;
    const int64_t in = w->in, bytes = in / 2, blocks = in / w->blocksize;
    const int64_t steps = w->blocksize / PLANE_CHUNK;
    const int chains = TILE == 1 ? 4 : TILE == 2 ? 2 : 1; /* TILE * chains <= 4 */
    const Planes planes = byte_planes(w->lut);
    for (int64_t r = r0; r < r1; r++) {
        prefetch_rows(w, r + PREFETCH_ROWS, 1);
        const uint8_t *row = w->packed + r * bytes;
        const float *scale = w->absmax + r * blocks;
        vec acc[4], block[4];
        for (int a = 0; a < 4; a++) acc[a] = vzero();
        for (int64_t k = 0; k < blocks; k++) {
            for (int a = 0; a < 4; a++) block[a] = vzero();
            for (int64_t c = 0; c < steps; c++) {
                const int64_t col = (k * steps + c) * PLANE_CHUNK;
                for (int half = 0; half < 2; half++) {
                    vec v[4];
                    decode_half(row + col / 2, half, &planes, v);
                    for (int i = 0; i < 4; i++)
                        for (int t = 0; t < TILE; t++) {
                            const int a = t * chains + i % chains;
                            const float *x = j->x + (b0 + t) * in + col + 32 * half + 8 * i;
                            block[a] = vfma(v[i], vload(x), block[a]);
                        }
                }
            }
            const vec s = _mm256_set1_ps(scale[k]);
            for (int a = 0; a < 4; a++) acc[a] = vfma(block[a], s, acc[a]);
        }
        for (int t = 0; t < TILE; t++) {
            vec sum = acc[t * chains];
            for (int c = 1; c < chains; c++) sum = _mm256_add_ps(sum, acc[t * chains + c]);
            j->y[(b0 + t) * w->out + r] = vsum(sum);
        }
    }
}

/* Tiles of 4 input rows, then the 1 to 3 left (slim_q4_matmul_many takes this path for
 * batches under 8 only: tiles of 8 are bound by their multiply-adds, and the vpermps tiles do
 * as well there). */
static void plane_rows(const void *job, int64_t r0, int64_t r1) {
    const Job *j = job;
    int64_t b = 0;
    for (; j->batch - b >= 4; b += 4) plane_tile(j, r0, r1, b, 4);
    switch (j->batch - b) {
    case 3: plane_tile(j, r0, r1, b, 3); break;
    case 2: plane_tile(j, r0, r1, b, 2); break;
    case 1: plane_tile(j, r0, r1, b, 1); break;
    default: break;
    }
}
#endif

/* Tiles of input rows, biggest first. With AVX-512 W is taken two rows at a time (an odd last
 * row alone), in tiles of up to 8 input rows. */
static void q4_rows(const void *job, int64_t r0, int64_t r1) {
    const Job *j = job;
    int64_t b = 0;
    while (b < j->batch) {
        const int64_t left = j->batch - b;
#if LANES == 16
        {
            const int64_t even = r0 + (r1 - r0) / 2 * 2;
            const int tile = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            switch (tile) {
            case 8: tile_row_pairs(j, r0, even, b, 8); break;
            case 4: tile_row_pairs(j, r0, even, b, 4); break;
            case 2: tile_row_pairs(j, r0, even, b, 2); break;
            default: tile_row_pairs(j, r0, even, b, 1);
            }
            if (even < r1) {
                switch (tile) {
                case 8: tile_rows(j, even, r1, b, 8); break;
                case 4: tile_rows(j, even, r1, b, 4); break;
                case 2: tile_rows(j, even, r1, b, 2); break;
                default: tile_rows(j, even, r1, b, 1);
                }
            }
            b += tile;
            continue;
        }
#endif
        /* At most 8: AVX2's 16 registers cannot hold 16 accumulators beside the table and the
         * decoded weights (16 rows spilled, and took 1.5x as long as two tiles of 8). */
        if (left >= 8) { tile_rows(j, r0, r1, b, 8); b += 8; }
        else if (left >= 4) { tile_rows(j, r0, r1, b, 4); b += 4; }
        else if (left >= 2) { tile_rows(j, r0, r1, b, 2); b += 2; }
        else { tile_rows(j, r0, r1, b, 1); b += 1; }
    }
}

/* ---- Float32 weights (the output layer): the same tiling, the weight read as it is. ---- */

typedef struct {
    const float *w;          /* (out, in) */
    int64_t out, in;
    const float *x;          /* (batch, in) */
    int64_t batch;
    float *y;                /* (batch, out) */
} DenseJob;

static inline __attribute__((always_inline)) void dense_tile(const DenseJob *j, int64_t r0,
                                                             int64_t r1, int64_t b0,
                                                             const int TILE) {
    const int64_t in = j->in, body = in / LANES * LANES;
    for (int64_t r = r0; r < r1; r++) {
        const float *row = j->w + r * in;
        vec acc[MAX_TILE];
        for (int t = 0; t < TILE; t++) acc[t] = vzero();
        for (int64_t c = 0; c < body; c += LANES) {
            vec w = vload(row + c);
            for (int t = 0; t < TILE; t++) acc[t] = vfma(w, vload(j->x + (b0 + t) * in + c), acc[t]);
        }
        float sums[16];
        lane_sums(acc, TILE, sums);
        for (int t = 0; t < TILE; t++) {
            float sum = sums[t];
            for (int64_t c = body; c < in; c++) sum += row[c] * j->x[(b0 + t) * in + c];
            j->y[(b0 + t) * j->out + r] = sum;
        }
    }
}

#if LANES == 16
/* Two rows of W against 8 input rows, for every 8 of the batch before the next pair: each
 * vector of x loaded feeds two multiply-adds (one a row of W per input row bounds the kernel
 * by loads), and the pair, read from memory once, stays in the cache for every 8. */
static void dense_pairs(const DenseJob *j, int64_t r0, int64_t r1, int64_t batch) {
    const int64_t in = j->in, body = in / LANES * LANES;
    for (int64_t r = r0; r + 2 <= r1; r += 2) {
        const float *row0 = j->w + r * in, *row1 = row0 + in;
        for (int64_t b0 = 0; b0 + 8 <= batch; b0 += 8) {
            vec acc[16];
            for (int t = 0; t < 16; t++) acc[t] = vzero();
            for (int64_t c = 0; c < body; c += LANES) {
                const vec w0 = vload(row0 + c), w1 = vload(row1 + c);
                for (int t = 0; t < 8; t++) {
                    const vec x = vload(j->x + (b0 + t) * in + c);
                    acc[t] = vfma(w0, x, acc[t]);
                    acc[8 + t] = vfma(w1, x, acc[8 + t]);
                }
            }
            float sums[16];
            lane_sums(acc, 16, sums);
            for (int t = 0; t < 8; t++) {
                float s0 = sums[t], s1 = sums[8 + t];
                const float *x = j->x + (b0 + t) * in;
                for (int64_t c = body; c < in; c++) s0 += row0[c] * x[c], s1 += row1[c] * x[c];
                j->y[(b0 + t) * j->out + r] = s0;
                j->y[(b0 + t) * j->out + r + 1] = s1;
            }
        }
    }
}
#endif

static void dense_rows(const void *job, int64_t r0, int64_t r1) {
    const DenseJob *j = job;
    int64_t b = 0;
#if LANES == 16
    if (j->batch >= 8) { /* whole eights of the batch by pairs of W's rows, the rest below */
        const int64_t even = r0 + (r1 - r0) / 2 * 2, eights = j->batch / 8 * 8;
        dense_pairs(j, r0, even, eights);
        if (even < r1)
            for (int64_t e = 0; e < eights; e += 8) dense_tile(j, even, r1, e, 8);
        b = eights;
    }
#endif
    while (b < j->batch) {
        int64_t left = j->batch - b;
        if (left >= 16) { dense_tile(j, r0, r1, b, 16); b += 16; }
        else if (left >= 8) { dense_tile(j, r0, r1, b, 8); b += 8; }
        else if (left >= 4) { dense_tile(j, r0, r1, b, 4); b += 4; }
        else if (left >= 2) { dense_tile(j, r0, r1, b, 2); b += 2; }
        else { dense_tile(j, r0, r1, b, 1); b += 1; }
    }
}

#ifdef HAVE_BF16_DOT
/* ---- Bfloat16 weights (the output layer in bfloat16 compute): pairs of columns per lane. ---- */

typedef struct {
    const uint16_t *w;       /* (out, in) bfloat16 bits */
    int64_t out, in;
    const uint16_t *x;       /* (batch, in) bfloat16 bits */
    int64_t batch;
    float *y;                /* (batch, out) */
} Bf16DenseJob;

static inline __m512bh load_pairs(const uint16_t *p, int64_t left) {
    if (left >= 32) return (__m512bh)_mm512_loadu_si512(p);
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), p);
}

/* One row of W at a time against TILE input rows; small tiles alternate two accumulators. */
static inline __attribute__((always_inline)) void bf16_dense_tile(const Bf16DenseJob *j,
                                                                  int64_t r0, int64_t r1,
                                                                  int64_t b0, const int TILE) {
    const int64_t in = j->in;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *row = j->w + r * in;
        __m512 acc[MAX_TILE], other[2];
        for (int t = 0; t < TILE; t++) acc[t] = _mm512_setzero_ps();
        other[0] = other[1] = _mm512_setzero_ps();
        for (int64_t c = 0; c < in; c += 32) {
            const __m512bh w = load_pairs(row + c, in - c);
            for (int t = 0; t < TILE; t++) {
                const __m512bh x = load_pairs(j->x + (b0 + t) * in + c, in - c);
                if (TILE <= 2 && (c / 32) % 2) other[t] = _mm512_dpbf16_ps(other[t], w, x);
                else acc[t] = _mm512_dpbf16_ps(acc[t], w, x);
            }
        }
        float sums[16];
        if (TILE <= 2)
            for (int t = 0; t < TILE; t++) acc[t] = _mm512_add_ps(acc[t], other[t]);
        lane_sums(acc, TILE, sums);
        for (int t = 0; t < TILE; t++) j->y[(b0 + t) * j->out + r] = sums[t];
    }
}

/* dense_pairs' tiling for a bfloat16 W: two of its rows against 8 input rows. */
static void bf16_dense_pairs(const Bf16DenseJob *j, int64_t r0, int64_t r1, int64_t batch) {
    const int64_t in = j->in;
    for (int64_t r = r0; r + 2 <= r1; r += 2) {
        const uint16_t *row0 = j->w + r * in, *row1 = row0 + in;
        for (int64_t b0 = 0; b0 + 8 <= batch; b0 += 8) {
            __m512 acc[16];
            for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
            for (int64_t c = 0; c < in; c += 32) {
                const __m512bh w0 = load_pairs(row0 + c, in - c), w1 = load_pairs(row1 + c, in - c);
                for (int t = 0; t < 8; t++) {
                    const __m512bh x = load_pairs(j->x + (b0 + t) * in + c, in - c);
                    acc[t] = _mm512_dpbf16_ps(acc[t], w0, x);
                    acc[8 + t] = _mm512_dpbf16_ps(acc[8 + t], w1, x);
                }
            }
            float sums[16];
            lane_sums(acc, 16, sums);
            for (int t = 0; t < 8; t++) {
                j->y[(b0 + t) * j->out + r] = sums[t];
                j->y[(b0 + t) * j->out + r + 1] = sums[8 + t];
            }
        }
    }
}

static void bf16_dense_rows(const void *job, int64_t r0, int64_t r1) {
    const Bf16DenseJob *j = job;
    int64_t b = 0;
    if (j->batch >= 16) { /* as dense_rows; from 16 rows (at 8 the single rows are faster) */
        const int64_t even = r0 + (r1 - r0) / 2 * 2, eights = j->batch / 8 * 8;
        bf16_dense_pairs(j, r0, even, eights);
        if (even < r1)
            for (int64_t e = 0; e < eights; e += 8) bf16_dense_tile(j, even, r1, e, 8);
        b = eights;
    }
    while (b < j->batch) {
        const int64_t left = j->batch - b;
        if (left >= 16) { bf16_dense_tile(j, r0, r1, b, 16); b += 16; }
        else if (left >= 8) { bf16_dense_tile(j, r0, r1, b, 8); b += 8; }
        else if (left >= 4) { bf16_dense_tile(j, r0, r1, b, 4); b += 4; }
        else if (left >= 2) { bf16_dense_tile(j, r0, r1, b, 2); b += 2; }
        else { bf16_dense_tile(j, r0, r1, b, 1); b += 1; }
    }
}
#endif

/* Rows of W split evenly between the threads of one OpenMP region. The kernel is linked
 * against libgomp.so.1, the soname of the OpenMP runtime torch ships and loads first, so these
 * are torch's own threads: no second pool competing for the cores. */
static void run(void (*rows)(const void *, int64_t, int64_t), const void *job, int64_t out_rows,
                int threads) {
    if (threads < 1 || out_rows < 2 * threads) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int parts = omp_get_num_threads(), part = omp_get_thread_num();
        const int64_t step = (out_rows + parts - 1) / parts;
        const int64_t r0 = part * step < out_rows ? part * step : out_rows;
        const int64_t r1 = r0 + step < out_rows ? r0 + step : out_rows;
        if (r0 < r1) rows(job, r0, r1);
    }
}

/* ---- Entry point ---- */

int slim_q4_lanes(void) { return LANES; }

/* Byte-plane lookups for AVX2 products of up to 7 rows: on (1), off (0), or as they are (-1).
 * Returns whether they are on (never where LANES is not 8). */
int slim_q4_byte_planes(int on) {
#if LANES == 8
    if (on >= 0) byte_planes_on = on != 0;
    return byte_planes_on;
#else
    (void)on;
    return 0;
#endif
}

/* Weights that read one input (q/k/v, gate/up): their rows split between the threads as one
 * stack of rows, in one parallel region. */
typedef struct {
    const Weight4 *const *w;
    int n;
    const void *x;           /* arranged as in Job, or as in Bf16Job (bf16) */
    int bf16, planes;        /* planes: AVX2's byte-plane products (x arranged for them) */
    int64_t batch;
    float *const *y;
    int64_t start[MAX_WEIGHTS + 1]; /* first row of each weight in the stack */
} StackJob;

static void stack_rows(const void *job, int64_t r0, int64_t r1) {
    const StackJob *s = job;
    for (int i = 0; i < s->n; i++) {
        const int64_t a = r0 > s->start[i] ? r0 : s->start[i];
        const int64_t b = r1 < s->start[i + 1] ? r1 : s->start[i + 1];
        if (a >= b) continue;
#ifdef HAVE_BF16_DOT
        if (s->bf16) {
            const Bf16Job j = {s->w[i], s->x, s->batch, s->y[i]};
            bf16_rows(&j, a - s->start[i], b - s->start[i]);
            continue;
        }
#endif
        const Job j = {s->w[i], s->x, s->batch, s->y[i]};
#if LANES == 8
        if (s->planes) {
            plane_rows(&j, a - s->start[i], b - s->start[i]);
            continue;
        }
#endif
        q4_rows(&j, a - s->start[i], b - s->start[i]);
    }
}

/* `size` bytes, 64-byte aligned: every vector load of an input within one cache line (a load
 * split across two lines costs two; 16-row products ran 8-10% slower from malloc's 16-byte
 * alignment). */
static void *aligned_input(size_t size) { return aligned_alloc(64, (size + 63) / 64 * 64); }

/* The column of a `chunk`-column step that arranged position i holds: the even columns then
 * the odd ones, or AVX2's byte-plane order. */
static inline int64_t source_column(int64_t i, int64_t chunk, int planes) {
#if LANES == 8
    if (planes) return plane_column(i);
#endif
    (void)planes;
    return i < chunk / 2 ? 2 * i : 2 * (i - chunk / 2) + 1;
}

/* The input rows rearranged per step of `chunk` columns in the order the products read them. */
static void *arrange(const float *x, int64_t batch, int64_t in, int64_t chunk, int bf16,
                     int planes) {
    void *out = aligned_input((size_t)(batch * in) * (bf16 ? sizeof(uint16_t) : sizeof(float)));
    if (!out) return NULL;
    for (int64_t i = 0; i < batch * in; i += chunk)
        for (int64_t l = 0; l < chunk; l++) {
            const float v = x[i + source_column(l, chunk, planes)];
            if (bf16) ((uint16_t *)out)[i + l] = bf16_bits(v);
            else ((float *)out)[i + l] = v;
        }
    return out;
}

/* y[i] (batch, out_i) = x (batch, in) @ W_i.T for n <= MAX_WEIGHTS weights of one `in`,
 * float32, contiguous. bf16: the products of a bfloat16 decode-then-matmul (weights and input
 * rounded to bfloat16, sums in float32) where the CPU multiplies bfloat16 (slim_q4_bf16_dot),
 * float32 products elsewhere. Returns 0, or -1 when the shapes do not fit the kernel (the
 * caller falls back). */
int slim_q4_matmul_many(const Weight4 *const *w, int n, const float *x, int64_t batch,
                        float *const *y, int threads, int bf16) {
    if (n < 1 || n > MAX_WEIGHTS || batch < 1) return -1;
    const int64_t in = w[0]->in;
    StackJob s = {w, n, NULL, 0, slim_q4_byte_planes(-1) && batch < 8, batch, y, {0}};
#ifdef HAVE_BF16_DOT
    s.bf16 = bf16;
#endif
    for (int i = 0; i < n; i++) {
        if (w[i]->in != in || w[i]->blocksize % CHUNK != 0 || in % w[i]->blocksize != 0)
            return -1;
        if (w[i]->blocksize % BF16_CHUNK != 0) s.bf16 = 0;
        if (w[i]->blocksize % PLANE_CHUNK != 0) s.planes = 0;
        s.start[i + 1] = s.start[i] + w[i]->out;
    }
    const int64_t chunk = s.bf16 ? BF16_CHUNK : s.planes ? PLANE_CHUNK : CHUNK;
    void *arranged = arrange(x, batch, in, chunk, s.bf16, s.planes);
    if (!arranged) return -1;
    s.x = arranged;
    run(stack_rows, &s, s.start[n], threads);
    free(arranged);
    return 0;
}

/* Whether bf16 products run in bfloat16 here (AVX512_BF16). */
int slim_q4_bf16_dot(void) {
#ifdef HAVE_BF16_DOT
    return 1;
#else
    return 0;
#endif
}

/* y (batch, out) = x (batch, in) @ W.T, float32, contiguous. Returns 0, or -1 when the shapes
 * do not fit the kernel (the caller falls back). */
int slim_q4_matmul(const Weight4 *w, const float *x, int64_t batch, float *y, int threads,
                   int bf16) {
    return slim_q4_matmul_many(&w, 1, x, batch, &y, threads, bf16);
}

/* y (batch, out) = x (batch, in) @ W.T for a float32 W (out, in), all contiguous. */
int slim_f32_matmul(const float *w, int64_t out, int64_t in, const float *x, int64_t batch,
                    float *y, int threads) {
    if (batch < 1) return -1;
    DenseJob j = {w, out, in, x, batch, y};
    run(dense_rows, &j, out, threads);
    return 0;
}

/* y (batch, out) = x (batch, in) @ W.T for a bfloat16 W (out, in), x float32 rounded to
 * bfloat16, sums in float32; all contiguous. Returns -1 where the CPU does not multiply
 * bfloat16 (slim_q4_bf16_dot). */
int slim_bf16_matmul(const uint16_t *w, int64_t out, int64_t in, const float *x, int64_t batch,
                     float *y, int threads) {
#ifdef HAVE_BF16_DOT
    if (batch < 1) return -1;
    uint16_t *rounded = aligned_input((size_t)(batch * in) * sizeof(uint16_t));
    if (!rounded) return -1;
    for (int64_t i = 0; i < batch * in; i++) rounded[i] = bf16_bits(x[i]);
    Bf16DenseJob j = {w, out, in, rounded, batch, y};
    run(bf16_dense_rows, &j, out, threads);
    free(rounded);
    return 0;
#else
    (void)w, (void)out, (void)in, (void)x, (void)batch, (void)y, (void)threads;
    return -1;
#endif
}

/* Decode `rows` rows of codes into float32 (bf16 = 0) or bfloat16 bits (bf16 = 1), each
 * value the float32 product code_value * absmax, rounded to nearest even for bfloat16.
 * Returns -1 when a block's bytes are not a whole number of decode steps. */
int slim_q4_decode(const uint8_t *codes, int64_t rows, int64_t width, int64_t code_stride,
                   const float *absmax, int64_t blocks, int64_t absmax_stride, const float *lut,
                   void *out, int bf16, int threads) {
    if (blocks < 1 || width % blocks != 0 || (width / blocks) % ((LANES + 1) / 2) != 0) return -1;
    DecodeJob j = {codes, width, code_stride, absmax, blocks, absmax_stride, lut, out, bf16};
    run(decode_rows, &j, rows, threads);
    return 0;
}
