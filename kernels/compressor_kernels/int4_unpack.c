/* Dequantize an aten-int4 layer (torch's CPU int4 layout) into a dense, transposed weight.
 *
 * Compiled once per machine by cpu_unpack.py (gcc -O3 -march=native -fopenmp) and called through
 * ctypes: it does in one pass what the eager path does in eight torch ops (two nibble masks, two
 * strided int8 -> float copies, the scale and offset casts, addcmul), reading 4 bits and writing
 * 16 bits a weight once.
 *
 * Layout read (torch's _convert_weight_to_int4pack_for_cpu, see int4_layout_codes): rows in blocks
 * of `block`; byte [b, column, j] holds row block*b + j in its low nibble and row
 * block*b + block/2 + j in its high one. scales_and_zeros [groups, out, 2] (bfloat16 or float32)
 * holds per kernel group and row the scale and the offset: w = (code - 8) * scale + offset.
 *
 * Written: weight_t [in, out] (bfloat16 or float32), so that the nibbles of one byte run land in
 * contiguous outputs. (code - 8) * scale is exact in float32 (a bfloat16 or float32 scale times an
 * integer in [-8, 7]), the sum is rounded once to float32 and, for bfloat16, once more to nearest
 * even: what torch's addcmul computes in bfloat16.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even; no NaN reaches here */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The scales and offsets of kernel group g as float32, for every output row. */
static void group_params(const void *scales_and_zeros, int params_bf16, int64_t out_features, int64_t g,
                         float *scale, float *offset) {
    int64_t base = g * out_features * 2;
    if (params_bf16) {
        const uint16_t *p = (const uint16_t *)scales_and_zeros + base;
        for (int64_t r = 0; r < out_features; r++) {
            scale[r] = bf16_to_float(p[2 * r]);
            offset[r] = bf16_to_float(p[2 * r + 1]);
        }
    } else {
        const float *p = (const float *)scales_and_zeros + base;
        for (int64_t r = 0; r < out_features; r++) {
            scale[r] = p[2 * r];
            offset[r] = p[2 * r + 1];
        }
    }
}

int int4_unpack_transposed(const uint8_t *packed, const void *scales_and_zeros, int params_bf16,
                           void *weight_t, int out_bf16, int64_t out_features, int64_t in_features,
                           int64_t block, int64_t kernel_group) {
    int64_t half = block / 2, blocks = out_features / block;
    int failed = 0;
#pragma omp parallel
    {
        float *scale = malloc(2 * out_features * sizeof(float));
        float *offset = scale + out_features;
        int64_t current = -1;
        if (scale == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < in_features; c++) {
            if (scale == NULL) continue;
            int64_t g = c / kernel_group;
            if (g != current) {
                group_params(scales_and_zeros, params_bf16, out_features, g, scale, offset);
                current = g;
            }
            for (int64_t b = 0; b < blocks; b++) {
                const uint8_t *restrict src = packed + (b * in_features + c) * half;
                const float *restrict s = scale + b * block, *restrict o = offset + b * block;
                if (out_bf16) {
                    uint16_t *restrict dst = (uint16_t *)weight_t + c * out_features + b * block;
                    for (int64_t j = 0; j < half; j++) {
                        dst[j] = float_to_bf16((float)((src[j] & 15) - 8) * s[j] + o[j]);
                        dst[j + half] = float_to_bf16((float)((src[j] >> 4) - 8) * s[j + half] + o[j + half]);
                    }
                } else {
                    float *restrict dst = (float *)weight_t + c * out_features + b * block;
                    for (int64_t j = 0; j < half; j++) {
                        dst[j] = (float)((src[j] & 15) - 8) * s[j] + o[j];
                        dst[j + half] = (float)((src[j] >> 4) - 8) * s[j + half] + o[j + half];
                    }
                }
            }
        }
        free(scale);
    }
    return failed;
}
