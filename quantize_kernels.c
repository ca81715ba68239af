/* quantize.py's own CPU kernels: y = x W^T with W in int8 or 4-bit codes, for batch-1 decode.

Why: at batch 1 every weight is read once per token, so a kernel is as fast as the bytes it reads per
second. torch's weight-only kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) turn each weight
back into a float before multiplying and reach about half the memory bandwidth here; these read the
weights in a few parallel streams and never make them floats:

  1. the activations are quantized too, as llama.cpp's q8_0 does: each block of BLOCK = 32 inputs of a
     row gets its absmax scale and int8 codes (quantize_blocks), so a dot product is integer work;
  2. AVX-512 VNNI's vpdpbusd multiplies 64 uint8 x int8 pairs and adds each 4 into one of 16 int32
     sums in one instruction: 16 outputs x 4 inputs per step, so W is stored in tiles of 16 outputs,
     4 consecutive inputs of one output side by side ([N/16][K/4][16][4] bytes);
  3. S tiles are read at once, S separate memory streams (one stream reads ~12 GB/s here, several
     ~16), and OpenMP splits the groups of S tiles over the threads (torch's own OpenMP runtime);
  4. each block's int32 sums become floats once per block: sum_k x_k w_k = scale_x * sum_k q_k w_k.

vpdpbusd wants one unsigned operand: int8 weights are stored + 128 (uint8) and the block's sum of
activation codes times 128 is taken off again; 4-bit codes are unsigned already (0..15, two a byte),
and their zero point meets the group's summed activations: sum_k x_k s (c_k - z) = s (sum_k x_k c_k
- z sum_k x_k). quantize.py packs the weights (pack_int8_tiles, pack_int4_tiles), checks these against
a plain PyTorch emulation (tests/test_quantize.py) and builds this file with the system compiler on
first use; without a compiler or VNNI it uses torch's kernels. */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define S 8      /* tiles of 16 outputs read side by side */
#define BLOCK 32 /* inputs per activation scale */

/* One row x (K floats) -> codes q (Kp int8, zero past K), per block its scale and its sum of codes. */
static void quantize_blocks(const float *x, int K, int Kp, int8_t *q, float *scale, int32_t *sum) {
    for (int b = 0; b < Kp / BLOCK; b++) {
        float amax = 0.f;
        for (int k = b * BLOCK; k < b * BLOCK + BLOCK && k < K; k++) amax = fmaxf(amax, fabsf(x[k]));
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        int total = 0;
        for (int k = b * BLOCK; k < b * BLOCK + BLOCK; k++) {
            int code = k < K ? (int)nearbyintf(x[k] * inv) : 0;
            q[k] = (int8_t)code;
            total += code;
        }
        scale[b] = amax / 127.f;
        sum[b] = total;
    }
}

static void quantize_rows(const float *x, int M, int K, int Kp, int8_t *q, float *scale, int32_t *sum) {
    for (int m = 0; m < M; m++)
        quantize_blocks(x + (size_t)m * K, K, Kp, q + (size_t)m * Kp, scale + (size_t)m * (Kp / BLOCK),
                        sum + (size_t)m * (Kp / BLOCK));
}

/* One row's dot products with S tiles of int8 weights (w + 128, [Kp/4][16][4] bytes per tile, tile
   bytes apart): out[j] = sum_k x_k (w_k - 128) for the tile's 16 outputs, before their scales. */
static inline void int8_dot(__m512 *out, const uint8_t *w, size_t tile, const int8_t *xq, const float *xs,
                            const int32_t *xsum, int nb) {
    for (int j = 0; j < S; j++) out[j] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i acc[S];
        for (int j = 0; j < S; j++) acc[j] = _mm512_setzero_si512();
        for (int k4 = b * BLOCK / 4; k4 < (b + 1) * BLOCK / 4; k4++) {
            __m512i x4 = _mm512_set1_epi32(*(const int32_t *)(xq + 4 * k4));  /* 4 inputs, every lane */
#pragma GCC unroll 8
            for (int j = 0; j < S; j++)
                acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512(w + j * tile + (size_t)k4 * 64), x4);
        }
        __m512i offset = _mm512_set1_epi32(128 * xsum[b]);  /* the + 128 of every w, in integers */
        __m512 scale = _mm512_set1_ps(xs[b]);
#pragma GCC unroll 8
        for (int j = 0; j < S; j++)
            out[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j], offset)), scale, out[j]);
    }
}

/* The same with 4-bit codes ([Kp/8][16][4] bytes per tile: byte c of output i holds input 8 k8 + c in
   its low nibble and 8 k8 + 4 + c in its high one) and per group of G inputs a scale and a zero point
   ([Kp/G][16] per tile, tile_groups apart): out[j] = sum_k x_k scale (code_k - zero), scales included. */
static inline void int4_dot(__m512 *out, const uint8_t *w, size_t tile, const int8_t *xq, const float *xs,
                            const int32_t *xsum, int G, int ng, const float *wscale, const float *wzero,
                            size_t tile_groups) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < S; j++) out[j] = _mm512_setzero_ps();
    for (int gi = 0; gi < ng; gi++) {
        __m512 part[S];   /* sum_k x_k code_k over the group */
        float x_group = 0.f;  /* sum_k x_k over the group: meets the zero point */
        for (int j = 0; j < S; j++) part[j] = _mm512_setzero_ps();
        for (int b = gi * (G / BLOCK); b < (gi + 1) * (G / BLOCK); b++) {
            __m512i acc[S];
            for (int j = 0; j < S; j++) acc[j] = _mm512_setzero_si512();
            for (int k8 = b * BLOCK / 8; k8 < (b + 1) * BLOCK / 8; k8++) {
                __m512i x_lo = _mm512_set1_epi32(*(const int32_t *)(xq + 8 * k8));
                __m512i x_hi = _mm512_set1_epi32(*(const int32_t *)(xq + 8 * k8 + 4));
#pragma GCC unroll 8
                for (int j = 0; j < S; j++) {
                    __m512i v = _mm512_loadu_si512(w + j * tile + (size_t)k8 * 64);
                    acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_and_si512(v, nibble), x_lo);
                    acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), x_hi);
                }
            }
            x_group += xs[b] * (float)xsum[b];
#pragma GCC unroll 8
            for (int j = 0; j < S; j++) part[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), _mm512_set1_ps(xs[b]), part[j]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < S; j++) {
            size_t at = j * tile_groups + (size_t)gi * 16;
            __m512 centred = _mm512_fnmadd_ps(_mm512_loadu_ps(wzero + at), _mm512_set1_ps(x_group), part[j]);
            out[j] = _mm512_fmadd_ps(centred, _mm512_loadu_ps(wscale + at), out[j]);
        }
    }
}

/* y (M, N) = x (M, K) W^T (+ bias). bits 8: w as int8_dot reads it, wscale (Np) per output, wzero
   unused. bits 2-4: w, wscale, wzero as int4_dot reads them, G a multiple of BLOCK. Np is N rounded up
   to 16 S outputs, Kp is K rounded up to BLOCK (8 bits) or G; xq (M, Kp), xs and xsum (M, Kp / BLOCK)
   are scratch. The groups of S tiles are shared among the threads. */
void quant_linear(int bits, const float *x, int M, int K, int Kp, int G, const uint8_t *w, const float *wscale,
                  const float *wzero, const float *bias, float *y, int N, int8_t *xq, float *xs, int32_t *xsum) {
    int nb = Kp / BLOCK, ng = bits == 8 ? 1 : Kp / G, groups = (N + 16 * S - 1) / (16 * S);
    size_t tile = bits == 8 ? (size_t)Kp * 16 : (size_t)Kp * 8;
    quantize_rows(x, M, K, Kp, xq, xs, xsum);
#pragma omp parallel for schedule(static)
    for (int g = 0; g < groups; g++) {
        const uint8_t *wg = w + (size_t)g * S * tile;
        for (int m = 0; m < M; m++) {
            __m512 out[S];
            const int8_t *xm = xq + (size_t)m * Kp;
            if (bits == 8)
                int8_dot(out, wg, tile, xm, xs + (size_t)m * nb, xsum + (size_t)m * nb, nb);
            else
                int4_dot(out, wg, tile, xm, xs + (size_t)m * nb, xsum + (size_t)m * nb, G, ng,
                         wscale + (size_t)g * S * ng * 16, wzero + (size_t)g * S * ng * 16, (size_t)ng * 16);
            for (int j = 0; j < S && (g * S + j) * 16 < N; j++) {  /* the last tile is cut at N */
                int n0 = (g * S + j) * 16;
                __mmask16 mask = N - n0 >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
                __m512 v = bits == 8 ? _mm512_mul_ps(out[j], _mm512_loadu_ps(wscale + n0)) : out[j];
                if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n0));
                _mm512_mask_storeu_ps(y + (size_t)m * N + n0, mask, v);
            }
        }
    }
}
