/* Fused dequantization loops: GGUF blocks (bytes) -> float32, one pass per block.
 *
 * Part of gguf_runtime.gguf.dequant (see its docstring): compiled on first use with the system C
 * compiler (-O3 -ffp-contract=off, never -ffast-math) and loaded with ctypes by
 * gguf_runtime.gguf.native. Every float32
 * operation is the one gguf-py's reference (gguf.quants) performs, in the same order and grouping:
 * integer codes are decoded exactly, converted to float32, then multiplied / added as gguf-py does
 * (e.g. Q4_K: (d * sc) * q - (dmin * m)), so results are bit-identical to gguf.quants.dequantize.
 * -ffp-contract=off keeps a * b + c from becoming a fused multiply-add.
 *
 * Each exported function dq_<type>(x, y, nb, nt) turns nb contiguous blocks at x into
 * nb * block_size floats at y, splitting the blocks over nt OpenMP threads when built with OpenMP
 * (each block is computed alone, so the result does not depend on nt, nor on how it is stored).
 * qmm_<type>(w, N, K, x, M, y, nt), at the end, multiplies by weights still in blocks (decoded by
 * the same functions) in one fixed order per output (--weights quant).
 */
#include <stdint.h>
#include <string.h>

#define QK_K 256

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE half -> float, exact (subnormals normalised, inf kept, NaN payload shifted like numpy). */
#if defined(__F16C__)
#include <immintrin.h>
/* The hardware conversion: exact for every non-NaN half; a NaN stays a NaN (its payload may differ). */
static inline float f16(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }
#else
static inline float f16(const uint8_t *p) {
    uint32_t h = rd16(p), s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    if (e == 0x1F) return from_bits(s | 0x7F800000u | (m << 13));
    if (e) return from_bits(s | ((e + 112) << 23) | (m << 13));
    float v = (float)m * 5.9604644775390625e-08f; /* m * 2^-24: exact */
    return s ? -v : v;
}
#endif

/* gguf-py's integer tables, held as the floats they convert to (a float lookup vectorises) */
static const float kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const float kvalues_fp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* ---- 32-value blocks ---------------------------------------------------------------------- */

static inline void q4_0(const uint8_t *restrict x, float *restrict y) { /* d[2] qs[16] */
    const float d = f16(x);
    for (int j = 0; j < 16; j++) y[j] = d * (float)((int)(x[2 + j] & 0xF) - 8);
    for (int j = 0; j < 16; j++) y[j + 16] = d * (float)((int)(x[2 + j] >> 4) - 8);
}

static inline void q4_1(const uint8_t *restrict x, float *restrict y) { /* d[2] m[2] qs[16] */
    const float d = f16(x), m = f16(x + 2);
    for (int j = 0; j < 16; j++) y[j] = d * (float)(x[4 + j] & 0xF) + m;
    for (int j = 0; j < 16; j++) y[j + 16] = d * (float)(x[4 + j] >> 4) + m;
}

static inline void q5_0(const uint8_t *restrict x, float *restrict y) { /* d[2] qh[4] qs[16] */
    const float d = f16(x);
    const uint32_t qh = rd32(x + 2);
    for (int j = 0; j < 16; j++) {
        int lo = (x[6 + j] & 0xF) | (((qh >> j) & 1) << 4);
        int hi = (x[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static inline void q5_1(const uint8_t *restrict x, float *restrict y) { /* d[2] m[2] qh[4] qs[16] */
    const float d = f16(x), m = f16(x + 2);
    const uint32_t qh = rd32(x + 4);
    for (int j = 0; j < 16; j++) {
        int lo = (x[8 + j] & 0xF) | (((qh >> j) & 1) << 4);
        int hi = (x[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)lo + m;
        y[j + 16] = d * (float)hi + m;
    }
}

static inline void q8_0(const uint8_t *restrict x, float *restrict y) { /* d[2] qs[32] */
    const float d = f16(x);
    for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)x[2 + j] * d;
}

static inline void iq4_nl(const uint8_t *restrict x, float *restrict y) { /* d[2] qs[16] */
    const float d = f16(x);
    for (int j = 0; j < 16; j++) {
        y[j] = d * kvalues_iq4nl[x[2 + j] & 0xF];
        y[j + 16] = d * kvalues_iq4nl[x[2 + j] >> 4];
    }
}

/* ggml_e8m0_to_fp32_half: 2^(e-128), as a denormal for e < 2 */
static inline float e8m0_half(uint8_t e) { return from_bits(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23); }

static inline void mxfp4(const uint8_t *restrict x, float *restrict y) { /* e[1] qs[16] */
    const float d = e8m0_half(x[0]);
    for (int j = 0; j < 16; j++) {
        y[j] = d * kvalues_fp4[x[1 + j] & 0xF];
        y[j + 16] = d * kvalues_fp4[x[1 + j] >> 4];
    }
}

/* ---- 64-value blocks ---------------------------------------------------------------------- */

/* unsigned E4M3 (bias 7) times 0.5; 0 and 0x7F are 0. Every value is exact in float32. */
static inline float ue4m3_half(uint8_t v) {
    if (v == 0 || v == 0x7F) return 0.0f;
    int e = (v >> 3) & 0xF, m = v & 7;
    if (e == 0) return (float)m * 0.0009765625f; /* m * 2^-9 * 0.5 */
    return from_bits((uint32_t)(e - 7 + 127 - 1) << 23) * (1.0f + (float)m * 0.125f);
}

static inline void nvfp4(const uint8_t *restrict x, float *restrict y) { /* d[4] (ue4m3) qs[32] */
    for (int s = 0; s < 4; s++) {
        const float d = ue4m3_half(x[s]);
        const uint8_t *q = x + 4 + 8 * s;
        for (int l = 0; l < 8; l++) {
            y[16 * s + l] = d * kvalues_fp4[q[l] & 0xF];
            y[16 * s + 8 + l] = d * kvalues_fp4[q[l] >> 4];
        }
    }
}

/* ---- 256-value super-blocks --------------------------------------------------------------- */

static inline void q2_k(const uint8_t *restrict x, float *restrict y) { /* scales[16] qs[64] d[2] dmin[2] */
    const float d = f16(x + 80), dmin = f16(x + 82);
    for (int g = 0; g < 16; g++) { /* value e = 128 h + 32 s + l: (qs[32 h + l] >> 2 s) & 3 */
        const float dl = d * (float)(x[g] & 0xF), ml = dmin * (float)(x[g] >> 4);
        const int h = g >> 3, s = (g >> 1) & 3, l0 = (g & 1) * 16;
        const uint8_t *q = x + 16 + 32 * h + l0;
        for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)((q[l] >> (2 * s)) & 3) - ml;
    }
}

static inline void q3_k(const uint8_t *restrict x, float *restrict y) { /* hmask[32] qs[64] scales[12] d[2] */
    const float d = f16(x + 108);
    const uint8_t *sc = x + 96;
    float dl[16];
    for (int g = 0; g < 16; g++) { /* 6-bit scales: low 4 bits from sc[0..7], high 2 from sc[8..11] */
        int ls = (sc[g & 7] >> (4 * (g >> 3))) & 0xF, hs = (sc[8 + (g & 3)] >> (2 * (g >> 2))) & 3;
        dl[g] = d * (float)((ls | (hs << 4)) - 32);
    }
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++) { /* values 128 h + 32 s + l: (qs[32 h + l] >> 2 s) & 3, less 4 where
                                         bit 4 h + s of hmask[l] is clear; 16 values per scale */
            const uint8_t *q = x + 32 + 32 * h;
            const float d0 = dl[8 * h + 2 * s], d1 = dl[8 * h + 2 * s + 1];
            float *yy = y + 128 * h + 32 * s;
            for (int l = 0; l < 32; l++) {
                const int v = ((q[l] >> (2 * s)) & 3) - ((((x[l] >> (4 * h + s)) & 1) ^ 1) << 2);
                yy[l] = (l < 16 ? d0 : d1) * (float)v;
            }
        }
}

static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static inline void q4_k(const uint8_t *restrict x, float *restrict y) { /* d[2] dmin[2] scales[12] qs[128] */
    const float d = f16(x), dmin = f16(x + 2);
    for (int j = 0; j < 8; j++) { /* sub-block j = 2 c + s: (qs[32 c + l] >> 4 s) & 15 */
        int sc, m;
        k_scale_min(x + 4, j, &sc, &m);
        const float dl = d * (float)sc, ml = dmin * (float)m;
        const uint8_t *q = x + 16 + 32 * (j >> 1);
        const int sh = 4 * (j & 1);
        for (int l = 0; l < 32; l++) y[32 * j + l] = dl * (float)((q[l] >> sh) & 0xF) - ml;
    }
}

static inline void q5_k(const uint8_t *restrict x, float *restrict y) { /* d[2] dmin[2] scales[12] qh[32] qs[128] */
    const float d = f16(x), dmin = f16(x + 2);
    for (int j = 0; j < 8; j++) {
        int sc, m;
        k_scale_min(x + 4, j, &sc, &m);
        const float dl = d * (float)sc, ml = dmin * (float)m;
        const uint8_t *q = x + 48 + 32 * (j >> 1), *qh = x + 16;
        const int sh = 4 * (j & 1);
        for (int l = 0; l < 32; l++)
            y[32 * j + l] = dl * (float)(((q[l] >> sh) & 0xF) | (((qh[l] >> j) & 1) << 4)) - ml;
    }
}

static inline void q6_k(const uint8_t *restrict x, float *restrict y) { /* ql[128] qh[64] scales[16] d[2] */
    const float d = f16(x + 208);
    for (int h = 0; h < 2; h++) { /* value 128 h + 32 t + l: low bits from ql[64 h + l (+ 32)], high from qh[32 h + l] */
        const uint8_t *ql = x + 64 * h, *qh = x + 128 + 32 * h;
        const int8_t *sc = (const int8_t *)(x + 192 + 8 * h);
        float *yh = y + 128 * h;
        for (int half = 0; half < 2; half++) { /* 16 values share a scale */
            const float d0 = d * (float)sc[half], d1 = d * (float)sc[2 + half];
            const float d2 = d * (float)sc[4 + half], d3 = d * (float)sc[6 + half];
            for (int l = 16 * half; l < 16 * half + 16; l++) {
                yh[l] = d0 * (float)(((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
                yh[l + 32] = d1 * (float)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                yh[l + 64] = d2 * (float)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                yh[l + 96] = d3 * (float)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
        }
    }
}

static inline void iq4_xs(const uint8_t *restrict x, float *restrict y) { /* d[2] scales_h[2] scales_l[4] qs[128] */
    const float d = f16(x);
    const uint16_t sh = rd16(x + 2);
    for (int j = 0; j < 8; j++) {
        int ls = (x[4 + j / 2] >> (4 * (j & 1))) & 0xF, hs = (sh >> (2 * j)) & 3;
        const float dl = d * (float)((ls | (hs << 4)) - 32);
        const uint8_t *q = x + 8 + 16 * j;
        for (int l = 0; l < 16; l++) {
            y[32 * j + l] = dl * kvalues_iq4nl[q[l] & 0xF];
            y[32 * j + 16 + l] = dl * kvalues_iq4nl[q[l] >> 4];
        }
    }
}

static inline void tq1_0(const uint8_t *restrict x, float *restrict y) { /* qs[48] qh[4] d[2]: base-3 digits */
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    const float d = f16(x + 52);
    for (int k = 0; k < 5; k++) {
        for (int l = 0; l < 32; l++) {
            uint8_t v = (uint8_t)(x[l] * pow3[k]);
            y[32 * k + l] = d * (float)((((uint16_t)v * 3) >> 8) - 1);
        }
        for (int l = 0; l < 16; l++) {
            uint8_t v = (uint8_t)(x[32 + l] * pow3[k]);
            y[160 + 16 * k + l] = d * (float)((((uint16_t)v * 3) >> 8) - 1);
        }
    }
    for (int k = 0; k < 4; k++)
        for (int l = 0; l < 4; l++) {
            uint8_t v = (uint8_t)(x[48 + l] * pow3[k]);
            y[240 + 4 * k + l] = d * (float)((((uint16_t)v * 3) >> 8) - 1);
        }
}

static inline void tq2_0(const uint8_t *restrict x, float *restrict y) { /* qs[64] d[2] */
    const float d = f16(x + 64);
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int l = 0; l < 32; l++) y[128 * h + 32 * s + l] = d * (float)(((x[32 * h + l] >> (2 * s)) & 3) - 1);
}

/* IQ1 / IQ2 / IQ3 types: grid rows (gguf-py's grids, handed over by Python when the library is loaded:
 * dq_set_tables) times one scale per 16 or 32 values, negated where the sign bit is set (gguf-py
 * multiplies by -1: the same bits for every number; a NaN may come out with the other sign, which
 * the NaN policy of the tests allows). IQ1 rows hold grid + delta and grid - delta, the sums
 * gguf-py forms before its product. */
static const float *grid_iq3xxs, *grid_iq3s;          /* (256, 4), (512, 4) */
static const float *grid_iq2xxs, *grid_iq2xs, *grid_iq2s; /* (256, 8), (512, 8), (1024, 8) */
static const float *rows_iq1;                         /* (4096, 8): grid + delta, then grid - delta */
static const uint8_t *ksigns;                         /* 128 sign patterns of IQ2_XXS */

void dq_set_tables(const float *iq3xxs, const float *iq3s, const float *iq2xxs, const float *iq2xs,
                   const float *iq2s, const float *iq1, const uint8_t *signs) {
    grid_iq3xxs = iq3xxs;
    grid_iq3s = iq3s;
    grid_iq2xxs = iq2xxs;
    grid_iq2xs = iq2xs;
    grid_iq2s = iq2s;
    rows_iq1 = iq1;
    ksigns = signs;
}

static inline float negate_if(float v, uint32_t bit) { /* flip the sign bit: no branch to mispredict */
    uint32_t u;
    memcpy(&u, &v, 4);
    return from_bits(u ^ (bit << 31));
}

static inline void iq3_xxs(const uint8_t *restrict x, float *restrict y) { /* d[2] qs[64] aux[8 x u32] */
    const float d = f16(x);
    for (int j = 0; j < 8; j++) {
        const uint32_t aux = rd32(x + 66 + 4 * j);
        const float db = d * (0.5f + (float)(aux >> 28)) * 0.5f;
        for (int k = 0; k < 4; k++) { /* 8 values: two grid rows, one 7-bit sign pattern */
            const uint8_t sg = ksigns[(aux >> (7 * k)) & 127];
            const float *g0 = grid_iq3xxs + 4 * x[2 + 8 * j + 2 * k], *g1 = grid_iq3xxs + 4 * x[3 + 8 * j + 2 * k];
            float *yy = y + 32 * j + 8 * k;
            for (int c = 0; c < 4; c++) yy[c] = negate_if(db * g0[c], (sg >> c) & 1);
            for (int c = 0; c < 4; c++) yy[4 + c] = negate_if(db * g1[c], (sg >> (4 + c)) & 1);
        }
    }
}

static inline void iq3_s(const uint8_t *restrict x, float *restrict y) { /* d[2] qs[64] qh[8] signs[32] scales[4] */
    const float d = f16(x);
    const uint8_t *qs = x + 2, *qh = x + 66, *sg = x + 74, *sc = x + 106;
    for (int j = 0; j < 8; j++) {
        const float db = d * (float)(1 + 2 * ((sc[j / 2] >> (4 * (j & 1))) & 0xF));
        for (int i = 8 * j; i < 8 * j + 8; i++) { /* grid row i: 9-bit index, 4 values */
            const float *g = grid_iq3s + 4 * (qs[i] | (((qh[i >> 3] >> (i & 7)) & 1) << 8));
            for (int c = 0; c < 4; c++) {
                const int e = 4 * i + c;
                y[e] = negate_if(db * g[c], (sg[e >> 3] >> (e & 7)) & 1);
            }
        }
    }
}

static inline void iq2_xxs(const uint8_t *restrict x, float *restrict y) { /* d[2] (grid bytes[4], aux[u32]) x 8 */
    const float d = f16(x);
    for (int j = 0; j < 8; j++) {
        const uint8_t *q = x + 2 + 8 * j;
        const uint32_t aux = rd32(q + 4);
        const float db = d * (0.5f + (float)(aux >> 28)) * 0.25f;
        for (int k = 0; k < 4; k++) {
            const uint8_t sg = ksigns[(aux >> (7 * k)) & 127];
            const float *g = grid_iq2xxs + 8 * q[k];
            for (int c = 0; c < 8; c++) y[32 * j + 8 * k + c] = negate_if(db * g[c], (sg >> c) & 1);
        }
    }
}

static inline float iq2_scale(float d, const uint8_t *sc, int i) { /* grid row i (of 32): its 4-bit scale */
    return d * (0.5f + (float)((sc[i >> 2] >> (4 * ((i >> 1) & 1))) & 0xF)) * 0.25f;
}

static inline void iq2_xs(const uint8_t *restrict x, float *restrict y) { /* d[2] qs[32 x u16] scales[8] */
    const float d = f16(x);
    for (int i = 0; i < 32; i++) {
        const uint16_t q = rd16(x + 2 + 2 * i);
        const float db = iq2_scale(d, x + 66, i);
        const uint8_t sg = ksigns[q >> 9];
        const float *g = grid_iq2xs + 8 * (q & 511);
        for (int c = 0; c < 8; c++) y[8 * i + c] = negate_if(db * g[c], (sg >> c) & 1);
    }
}

static inline void iq2_s(const uint8_t *restrict x, float *restrict y) { /* d[2] qs[32] signs[32] qh[8] scales[8] */
    const float d = f16(x);
    for (int i = 0; i < 32; i++) {
        const float db = iq2_scale(d, x + 74, i);
        const uint8_t sg = x[34 + i];
        const float *g = grid_iq2s + 8 * (x[2 + i] | (((x[66 + (i >> 2)] >> (2 * (i & 3))) & 3) << 8));
        for (int c = 0; c < 8; c++) y[8 * i + c] = negate_if(db * g[c], (sg >> c) & 1);
    }
}

static inline void iq1_s(const uint8_t *restrict x, float *restrict y) { /* d[2] qs[32] qh[8 x u16] */
    const float d = f16(x);
    for (int j = 0; j < 8; j++) {
        const uint16_t qh = rd16(x + 34 + 2 * j);
        const float dl = d * (float)(2 * ((qh >> 12) & 7) + 1);
        const float *rows = rows_iq1 + 8 * 2048 * (qh >> 15);
        for (int k = 0; k < 4; k++) {
            const float *g = rows + 8 * (x[2 + 4 * j + k] | (((qh >> (3 * k)) & 7) << 8));
            for (int c = 0; c < 8; c++) y[32 * j + 8 * k + c] = dl * g[c];
        }
    }
}

static inline void iq1_m(const uint8_t *restrict x, float *restrict y) { /* qs[32] qh[16] scales[4 x u16] */
    uint16_t sc[4];
    for (int w = 0; w < 4; w++) sc[w] = rd16(x + 48 + 2 * w);
    const uint16_t dbits = (uint16_t)((sc[0] >> 12) | ((sc[1] >> 8) & 0xF0) | ((sc[2] >> 4) & 0xF00) | (sc[3] & 0xF000));
    const uint8_t db[2] = {(uint8_t)dbits, (uint8_t)(dbits >> 8)};
    const float d = f16(db); /* the fp16 super-scale, spread over the scales' top nibbles */
    for (int i = 0; i < 32; i++) { /* grid row i: 3-bit scale (i >> 1) of 16, 3 index bits and a delta sign */
        const int s = i >> 1, nib = (x[32 + (i >> 1)] >> (4 * (i & 1))) & 0xF;
        const float dl = d * (float)(2 * ((sc[s >> 2] >> (3 * (s & 3))) & 7) + 1);
        const float *g = rows_iq1 + 8 * (x[i] | ((nib & 7) << 8) | ((nib & 8) << 8));
        for (int c = 0; c < 8; c++) y[8 * i + c] = dl * g[c];
    }
}

/* ---- drivers ------------------------------------------------------------------------------ */

/* ---- AVX-512 forms of the commonest block types ------------------------------------------
 * The same float32 operations as the scalar functions above, 16 lanes at a time (integer codes
 * decoded exactly in integer lanes, converted, then the same multiply / add, unfused: this file is
 * built with -ffp-contract=off), so the floats are the same bits; the dequantization tests against
 * gguf-py check them. Where AVX-512 is absent the scalar functions run. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 u8f(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
static inline __m512 u8f_minus(__m128i b, int c) {
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(c)));
}
static inline __m128i ld16(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }
static inline __m128i lo4(__m128i b) { return _mm_and_si128(b, _mm_set1_epi8(0x0F)); }
static inline __m128i hi4(__m128i b) { return _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F)); }

static inline void v_q4_0(const uint8_t *restrict x, float *restrict y) {
    const __m512 d = _mm512_set1_ps(f16(x));
    const __m128i q = ld16(x + 2);
    _mm512_storeu_ps(y, _mm512_mul_ps(d, u8f_minus(lo4(q), 8)));
    _mm512_storeu_ps(y + 16, _mm512_mul_ps(d, u8f_minus(hi4(q), 8)));
}

static inline void v_q4_1(const uint8_t *restrict x, float *restrict y) {
    const __m512 d = _mm512_set1_ps(f16(x)), m = _mm512_set1_ps(f16(x + 2));
    const __m128i q = ld16(x + 4);
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_mul_ps(d, u8f(lo4(q))), m));
    _mm512_storeu_ps(y + 16, _mm512_add_ps(_mm512_mul_ps(d, u8f(hi4(q))), m));
}

static inline void v_q5_0(const uint8_t *restrict x, float *restrict y) {
    const __m512 d = _mm512_set1_ps(f16(x));
    const uint32_t qh = rd32(x + 2);
    const __m128i q = ld16(x + 6);
    const __m512i s16 = _mm512_set1_epi32(16);
    __m512i lo = _mm512_cvtepu8_epi32(lo4(q)), hi = _mm512_cvtepu8_epi32(hi4(q));
    lo = _mm512_mask_add_epi32(lo, (__mmask16)(qh & 0xFFFF), lo, s16);
    hi = _mm512_mask_add_epi32(hi, (__mmask16)(qh >> 16), hi, s16);
    _mm512_storeu_ps(y, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, s16))));
    _mm512_storeu_ps(y + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, s16))));
}

static inline void v_q8_0(const uint8_t *restrict x, float *restrict y) {
    const __m512 d = _mm512_set1_ps(f16(x));
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld16(x + 2))), d));
    _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld16(x + 18))), d));
}

static inline void v_q4_k(const uint8_t *restrict x, float *restrict y) {
    const float d = f16(x), dmin = f16(x + 2);
    for (int j = 0; j < 8; j++) {
        int sc, m;
        k_scale_min(x + 4, j, &sc, &m);
        const __m512 dl = _mm512_set1_ps(d * (float)sc), ml = _mm512_set1_ps(dmin * (float)m);
        const uint8_t *q = x + 16 + 32 * (j >> 1);
        const __m128i a = ld16(q), b = ld16(q + 16);
        const __m128i va = (j & 1) ? hi4(a) : lo4(a), vb = (j & 1) ? hi4(b) : lo4(b);
        _mm512_storeu_ps(y + 32 * j, _mm512_sub_ps(_mm512_mul_ps(dl, u8f(va)), ml));
        _mm512_storeu_ps(y + 32 * j + 16, _mm512_sub_ps(_mm512_mul_ps(dl, u8f(vb)), ml));
    }
}

static inline void v_q6_k(const uint8_t *restrict x, float *restrict y) {
    const float d = f16(x + 208);
    const __m128i m3 = _mm_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = x + 64 * h, *qh = x + 128 + 32 * h;
        const int8_t *sc = (const int8_t *)(x + 192 + 8 * h);
        float *yh = y + 128 * h;
        for (int half = 0; half < 2; half++) {
            const int l = 16 * half;
            const __m128i A = ld16(ql + l), B = ld16(ql + l + 32), H = ld16(qh + l);
            const __m128i h0 = _mm_slli_epi16(_mm_and_si128(H, m3), 4);
            const __m128i h1 = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(H, 2), m3), 4);
            const __m128i h2 = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(H, 4), m3), 4);
            const __m128i h3 = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(H, 6), m3), 4);
            _mm512_storeu_ps(yh + l, _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[half]), u8f_minus(_mm_or_si128(lo4(A), h0), 32)));
            _mm512_storeu_ps(yh + l + 32, _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[2 + half]), u8f_minus(_mm_or_si128(lo4(B), h1), 32)));
            _mm512_storeu_ps(yh + l + 64, _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[4 + half]), u8f_minus(_mm_or_si128(hi4(A), h2), 32)));
            _mm512_storeu_ps(yh + l + 96, _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[6 + half]), u8f_minus(_mm_or_si128(hi4(B), h3), 32)));
        }
    }
}
#define q4_0 v_q4_0 /* DRIVER and QMM below call these */
#define q4_1 v_q4_1
#define q5_0 v_q5_0
#define q8_0 v_q8_0
#define q4_k v_q4_k
#define q6_k v_q6_k
#endif

/* Outputs of STREAM_MIN floats or more (larger than a core's L2) are written with non-temporal
 * stores where the CPU has them: runs of blocks are decoded into a small aligned buffer (1 KiB,
 * large enough that reading it back does not wait on the stores just made), then streamed out,
 * which saves reading every destination cache line before it is overwritten (1.5-2.5x on large
 * tensors). Smaller outputs are written directly and stay in cache for their consumer. Either way
 * the same floats land in the same places. */
#define STREAM_MIN (1 << 20)
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#define STREAM_ALIGN 64
static inline void stream(float *restrict y, const float *restrict t, int n) {
#ifdef __AVX512F__
    for (int k = 0; k < n; k += 16) _mm512_stream_ps(y + k, _mm512_load_ps(t + k));
#else
    for (int k = 0; k < n; k += 8) _mm256_stream_ps(y + k, _mm256_load_ps(t + k));
#endif
}
static inline void stream_fence(void) { _mm_sfence(); }
#else
#define STREAM_ALIGN 0 /* no streaming path */
static inline void stream(float *restrict y, const float *restrict t, int n) { memcpy(y, t, 4 * (size_t)n); }
static inline void stream_fence(void) {}
#endif

#define STR(x) #x
#define OMP(x) _Pragma(STR(omp x))
#define PARALLEL_MIN (1 << 16) /* smaller calls (a few embedding rows) stay on the calling thread */
#define GROUP(BS) (BS < 256 ? 256 / BS : 1) /* blocks decoded per streamed run: 1 KiB of floats */
#define DRIVER(name, TS, BS)                                                                   \
    static void direct_##name(const uint8_t *restrict x, float *restrict y, int64_t i0,        \
                              int64_t nb, int nt) {                                            \
        (void)nt;                                                                              \
        OMP(parallel for schedule(static) num_threads(nt) if(nt > 1))                          \
        for (int64_t i = i0; i < nb; i++) name(x + i * TS, y + i * BS);                        \
    }                                                                                          \
    void dq_##name(const uint8_t *restrict x, float *restrict y, int64_t nb, int nt) {        \
        if (nb * BS < PARALLEL_MIN) nt = 1;                                                    \
        if (!STREAM_ALIGN || nb * BS < STREAM_MIN || (uintptr_t)y % 64) {                      \
            direct_##name(x, y, 0, nb, nt);                                                    \
            return;                                                                            \
        }                                                                                      \
        const int64_t ng = nb / GROUP(BS); /* whole runs streamed, the last blocks direct */   \
        OMP(parallel num_threads(nt) if(nt > 1)) {                                             \
            float t[GROUP(BS) * BS] __attribute__((aligned(64)));                             \
            OMP(for schedule(static))                                                          \
            for (int64_t g = 0; g < ng; g++) {                                                 \
                for (int k = 0; k < GROUP(BS); k++)                                            \
                    name(x + (g * GROUP(BS) + k) * TS, t + k * BS);                            \
                stream(y + g * GROUP(BS) * BS, t, GROUP(BS) * BS);                             \
            }                                                                                  \
            stream_fence(); /* each thread's streamed stores, before the region ends */       \
        }                                                                                      \
        direct_##name(x, y, ng * GROUP(BS), nb, 1);                                            \
    }

/* (name, bytes per block, values per block): the types qmm below also multiplies, then the rest */
#define QMM_BLOCK_TYPES(X)                                                                       \
    X(q4_0, 18, 32) X(q4_1, 20, 32) X(q5_0, 22, 32) X(q5_1, 24, 32) X(q8_0, 34, 32) X(iq4_nl, 18, 32) \
    X(q2_k, 84, QK_K) X(q3_k, 110, QK_K) X(q4_k, 144, QK_K) X(q5_k, 176, QK_K) X(q6_k, 210, QK_K)   \
    X(iq4_xs, 136, QK_K)
#define OTHER_BLOCK_TYPES(X)                                                                     \
    X(mxfp4, 17, 32) X(nvfp4, 36, 64) X(tq1_0, 54, QK_K) X(tq2_0, 66, QK_K) X(iq3_xxs, 98, QK_K)  \
    X(iq3_s, 110, QK_K) X(iq2_xxs, 66, QK_K) X(iq2_xs, 74, QK_K) X(iq2_s, 82, QK_K) X(iq1_s, 50, QK_K) \
    X(iq1_m, 56, QK_K)
QMM_BLOCK_TYPES(DRIVER)
OTHER_BLOCK_TYPES(DRIVER)

/* ---- fused dequantize-and-multiply: y = x @ W^T, W read in its GGUF type --------------------
 *
 * qmm_<type>(w, N, K, x, M, y, nt): y (M, N) from x (M, K) float32 and W (N, K) stored as N rows of
 * K / block_size blocks (the file's bytes). W is decoded a panel of rows at a time (the block
 * functions above: the very floats dequantization gives) into a per-thread buffer, then multiplied.
 *
 * Every output is computed in one fixed order, whatever M, N, the panel or the thread count: QL
 * partial sums, lane l taking k = l, l + QL, l + 2 QL, ... in increasing k with a fused
 * multiply-add (fmaf: the same rounding scalar or vectorised), then summed by one fixed tree
 * (lane_sum). So a row of x gives the same bits alone or among any other rows, and threads only
 * split the output columns: the product is batch- and thread-invariant by construction, with no
 * padding and no calibration. */
#include <math.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#define QL 16 /* partial sums per output: one vector register's lanes */
#else
#define QL 8
#endif
#ifndef MR
#if defined(__AVX512F__) /* 32 vector registers: 24 accumulators */
#define MR 6 /* x rows per register tile */
#define NR 4 /* weight rows per register tile (MR x NR accumulators of QL lanes) */
#else /* 16: 12 */
#define MR 4
#define NR 3
#endif
#endif
#define PANEL_FLOATS (1 << 15) /* decoded weights per panel: 128 KiB, held in L2 */
#ifndef PANEL_PF
#define PANEL_PF 4096 /* bytes ahead that panel decoding prefetches (the hardware prefetcher alone
                         left a 30 MB head at a fifth of the memory bandwidth) */
#endif

static inline float lane_sum(const float *a) { /* pairwise, lanes l and l + n / 2 first */
    float t[QL];
    memcpy(t, a, sizeof t);
    for (int n = QL / 2; n >= 1; n /= 2)
        for (int l = 0; l < n; l++) t[l] = t[l] + t[l + n];
    return t[0];
}

/* One register tile: out[i][j] = the fixed-order sum for x row i (rows ldx apart) and decoded
 * weight row j (rows K apart), for R x rows and C weight rows. The vector and the scalar forms
 * compute the same fused multiply-adds in the same order, so they agree to the bit. */
#if defined(__AVX512F__)
#define VEC __m512
#define VZERO _mm512_setzero_ps
#define VLOAD _mm512_loadu_ps
#define VFMA _mm512_fmadd_ps
#define VSTORE _mm512_storeu_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define VEC __m256
#define VZERO _mm256_setzero_ps
#define VLOAD _mm256_loadu_ps
#define VFMA _mm256_fmadd_ps
#define VSTORE _mm256_storeu_ps
#endif
#ifdef VEC
/* a loaded value kept in its register: GCC otherwise folds the load into each of its C multiply-
 * adds (C loads instead of one: the tile became load-bound, 63% of the FMA peak) */
#define REG(v) __asm__("" : "+v"(v))
/* lane_sum of a register, as vector adds: the same additions (lanes l and l + n / 2, halving n) */
static inline float vsum(VEC v) {
#if defined(__AVX512F__)
    const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
#else
    const __m256 a8 = v;
#endif
    const __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
    const __m128 a2 = _mm_add_ps(a4, _mm_movehl_ps(a4, a4));
    return _mm_cvtss_f32(_mm_add_ss(a2, _mm_shuffle_ps(a2, a2, 1)));
}
#define TILE(R, C)                                                                               \
    static inline void tile_##R##x##C(const float *restrict x, int64_t ldx, const float *restrict w, \
                                      int64_t K, float out[R][C]) {                             \
        VEC acc[R][C];                                                                           \
        for (int i = 0; i < R; i++)                                                              \
            for (int j = 0; j < C; j++) acc[i][j] = VZERO();                                     \
        for (int64_t k = 0; k < K; k += QL) {                                                    \
            VEC wv[C];                                                                           \
            for (int j = 0; j < C; j++) wv[j] = VLOAD(w + j * K + k);                            \
            for (int i = 0; i < R; i++) {                                                        \
                VEC xv = VLOAD(x + i * ldx + k);                                                 \
                REG(xv);                                                                         \
                for (int j = 0; j < C; j++) acc[i][j] = VFMA(xv, wv[j], acc[i][j]);              \
            }                                                                                    \
        }                                                                                        \
        for (int i = 0; i < R; i++)                                                              \
            for (int j = 0; j < C; j++) out[i][j] = vsum(acc[i][j]);                             \
    }
#else
#define TILE(R, C)                                                                               \
    static inline void tile_##R##x##C(const float *restrict x, int64_t ldx, const float *restrict w, \
                                      int64_t K, float out[R][C]) {                             \
        float acc[R][C][QL];                                                                     \
        memset(acc, 0, sizeof acc);                                                              \
        for (int64_t k = 0; k < K; k += QL)                                                      \
            for (int i = 0; i < R; i++)                                                          \
                for (int j = 0; j < C; j++)                                                      \
                    for (int l = 0; l < QL; l++)                                                 \
                        acc[i][j][l] = fmaf(x[i * ldx + k + l], w[j * K + k + l], acc[i][j][l]); \
        for (int i = 0; i < R; i++)                                                              \
            for (int j = 0; j < C; j++) out[i][j] = lane_sum(acc[i][j]);                         \
    }
#endif
#define TILE_MN(R, C) TILE(R, C)
#define TILE_FN_(R, C) tile_##R##x##C
#define TILE_FN(R, C) TILE_FN_(R, C)
#define NR1 8 /* weight rows per tile for a lone x row (decode) */
TILE_MN(MR, NR)
TILE(1, 8) /* 1 x NR1 */

/* rows per panel: about PANEL_FLOATS decoded weights, a multiple of NR1 (and so of NR... not
 * needed: edges are padded), and at least 4 panels per thread when N allows (decode: few rows of
 * x, the work is all in the panels) */
static int64_t qmm_panel(int64_t N, int64_t K, int nt) {
    int64_t np = PANEL_FLOATS / K / 24 * 24;
    int64_t even = (N + 4 * nt - 1) / (4 * nt);
    even = (even + 23) / 24 * 24;
    if (even < np) np = even;
    return np < 24 ? 24 : np;
}

/* the products of x rows [m0, M) with the nn decoded rows at pw (a panel padded with zero rows to
 * a multiple of 24), into y (row stride N) */
static void qmm_panel_rows(const float *restrict x, int64_t M, int64_t K, const float *restrict pw, int64_t nn,
                           float *restrict y, int64_t N) {
    int64_t m0 = 0;
    for (; m0 + MR <= M; m0 += MR)
        for (int64_t j0 = 0; j0 < nn; j0 += NR) {
            float o[MR][NR];
            TILE_FN(MR, NR)(x + m0 * K, K, pw + j0 * K, K, o);
            const int64_t nc = nn - j0 < NR ? nn - j0 : NR;
            for (int i = 0; i < MR; i++)
                for (int64_t j = 0; j < nc; j++) y[(m0 + i) * N + j0 + j] = o[i][j];
        }
    for (; m0 < M; m0++)
        for (int64_t j0 = 0; j0 < nn; j0 += NR1) {
            float o[1][NR1];
            tile_1x8(x + m0 * K, K, pw + j0 * K, K, o);
            const int64_t nc = nn - j0 < NR1 ? nn - j0 : NR1;
            for (int64_t j = 0; j < nc; j++) y[m0 * N + j0 + j] = o[0][j];
        }
}

static void qmm_panels(const uint8_t *restrict w, int64_t rb, int64_t N, int64_t K, const float *restrict x,
                       int64_t M, float *restrict y, int nt, void (*decode)(const uint8_t *, float *, int64_t)) {
    const int64_t np = qmm_panel(N, K, nt), npan = (N + np - 1) / np;
    if (nt > npan) nt = (int)npan;
    OMP(parallel num_threads(nt) if(nt > 1)) {
        float *buf = aligned_alloc(64, (size_t)(np * K * 4 + 63) / 64 * 64);
        OMP(for schedule(static))
        for (int64_t p = 0; p < npan; p++) {
            const int64_t n0 = p * np, nn = N - n0 < np ? N - n0 : np;
            const int64_t pad = (nn + 23) / 24 * 24;
            const float *pw = buf;
            if (decode) {
                for (int64_t r = 0; r < nn; r++) decode(w + (n0 + r) * rb, buf + r * K, K);
            } else if (pad == nn) {
                pw = (const float *)(w + n0 * rb); /* float32 weights: used in place */
            } else {
                memcpy(buf, w + n0 * rb, (size_t)(nn * K * 4));
            }
            if (pad != nn) memset(buf + nn * K, 0, (size_t)((pad - nn) * K * 4));
            qmm_panel_rows(x, M, K, pw, nn, y + n0, N);
        }
        free(buf);
    }
}

#define QG 4 /* weight rows decoded side by side for fewer than MR x rows */
#ifndef QPF
#define QPF 8 /* groups of rows ahead that the few-rows loop prefetches (the next rows' bytes) */
#endif
#ifdef VEC
/* Fewer than MR rows of x (decode): QG weight rows at a time, each block decoded into a small
 * buffer that stays in L1 and multiplied at once (no panel written out and read back); the same
 * fused multiply-adds in the same order as the panel path. */
#define FEW_ROWS(name, TS, BS)                                                                   \
    static void few_##name(const uint8_t *restrict w, int64_t N, int64_t K, const float *restrict x, \
                           int64_t M, float *restrict y, int nt) {                              \
        const int64_t rb = K / BS * TS, ng = (N + QG - 1) / QG;                                  \
        if (nt > ng) nt = (int)ng;                                                               \
        OMP(parallel for schedule(static) num_threads(nt) if(nt > 1))                            \
        for (int64_t g = 0; g < ng; g++) {                                                       \
            float t[QG][BS] __attribute__((aligned(64)));                                        \
            VEC acc[QG][MR - 1];                                                                 \
            const int64_t n0 = g * QG, gn = N - n0 < QG ? N - n0 : QG;                           \
            for (int r = 0; r < QG; r++)                                                         \
                for (int i = 0; i < MR - 1; i++) acc[r][i] = VZERO();                            \
            for (int64_t b = 0; b < K / BS; b++) {                                               \
                for (int r = 0; r < gn; r++) {                                                   \
                    __builtin_prefetch(w + (n0 + r + QG * QPF) * rb + b * TS);                   \
                    name(w + (n0 + r) * rb + b * TS, t[r]);                                      \
                }                                                                                \
                for (int kk = 0; kk < BS; kk += QL)                                              \
                    for (int i = 0; i < M; i++) {                                                \
                        const VEC xv = VLOAD(x + i * K + b * BS + kk);                           \
                        for (int r = 0; r < QG; r++) acc[r][i] = VFMA(xv, VLOAD(t[r] + kk), acc[r][i]); \
                    }                                                                            \
            }                                                                                    \
            for (int r = 0; r < gn; r++)                                                         \
                for (int i = 0; i < M; i++) y[i * N + n0 + r] = vsum(acc[r][i]);                 \
        }                                                                                        \
    }
#define FEW(name, M) ((M) < MR ? few_##name : NULL)
#if defined(__AVX512F__)
/* The same loop for the 32-value types whose blocks decode straight into registers (reg_v_<type>:
 * the floats of v_<type>, with no buffer stored and read back; Q4_0 / Q4_1 look their 16
 * possible values up in a table built once per block, d * q (+ m): the decoder's operations on the
 * same operands, hence the same floats). */
static const float IOTA[16] __attribute__((aligned(64))) = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static inline void reg_v_q4_0(const uint8_t *restrict x, __m512 w[2]) {
    const __m512 t = _mm512_mul_ps(_mm512_set1_ps(f16(x)), _mm512_sub_ps(_mm512_load_ps(IOTA), _mm512_set1_ps(8.0f)));
    const __m128i q = ld16(x + 2);
    w[0] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo4(q)), t);
    w[1] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi4(q)), t);
}
static inline void reg_v_q4_1(const uint8_t *restrict x, __m512 w[2]) {
    const __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(f16(x)), _mm512_load_ps(IOTA)), _mm512_set1_ps(f16(x + 2)));
    const __m128i q = ld16(x + 4);
    w[0] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo4(q)), t);
    w[1] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi4(q)), t);
}
static inline void reg_v_q8_0(const uint8_t *restrict x, __m512 w[2]) {
    const __m512 d = _mm512_set1_ps(f16(x));
    w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld16(x + 2))), d);
    w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld16(x + 18))), d);
}
#define FEW_ROWS_REG(name, TS)                                                                   \
    static void few_##name(const uint8_t *restrict w, int64_t N, int64_t K, const float *restrict x, \
                           int64_t M, float *restrict y, int nt) {                              \
        const int64_t rb = K / 32 * TS, ng = (N + QG - 1) / QG;                                  \
        if (nt > ng) nt = (int)ng;                                                               \
        OMP(parallel for schedule(static) num_threads(nt) if(nt > 1))                            \
        for (int64_t g = 0; g < ng; g++) {                                                       \
            __m512 acc[QG][MR - 1], wv[QG][2];                                                   \
            const int64_t n0 = g * QG, gn = N - n0 < QG ? N - n0 : QG;                           \
            for (int r = 0; r < QG; r++) {                                                       \
                wv[r][0] = wv[r][1] = _mm512_setzero_ps();                                       \
                for (int i = 0; i < MR - 1; i++) acc[r][i] = _mm512_setzero_ps();                \
            }                                                                                    \
            for (int64_t b = 0; b < K / 32; b++) {                                               \
                for (int r = 0; r < gn; r++) {                                                   \
                    __builtin_prefetch(w + (n0 + r + QG * QPF) * rb + b * TS);                   \
                    reg_##name(w + (n0 + r) * rb + b * TS, wv[r]);                               \
                }                                                                                \
                for (int kk = 0; kk < 2; kk++)                                                   \
                    for (int i = 0; i < M; i++) {                                                \
                        const __m512 xv = _mm512_loadu_ps(x + i * K + b * 32 + kk * 16);         \
                        for (int r = 0; r < QG; r++) acc[r][i] = _mm512_fmadd_ps(xv, wv[r][kk], acc[r][i]); \
                    }                                                                            \
            }                                                                                    \
            for (int r = 0; r < gn; r++)                                                         \
                for (int i = 0; i < M; i++) y[i * N + n0 + r] = vsum(acc[r][i]);                 \
        }                                                                                        \
    }
#endif
#else
#define FEW_ROWS(name, TS, BS)
#define FEW(name, M) NULL
#endif

#define QMM(name, TS, BS)                                                                        \
    static void row_##name(const uint8_t *restrict x, float *restrict y, int64_t K) {          \
        for (int64_t b = 0; b < K / BS; b++) {                                                 \
            __builtin_prefetch(x + b * TS + PANEL_PF);                                         \
            name(x + b * TS, y + b * BS);                                                      \
        }                                                                                      \
    }                                                                                          \
    FEW_ROWS_##name(name, TS, BS)                                                              \
    void qmm_##name(const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M, float *y, int nt) { \
        void (*few)(const uint8_t *, int64_t, int64_t, const float *, int64_t, float *, int) = FEW(name, M); \
        if (BS >= QL && few) few(w, N, K, x, M, y, nt);                                        \
        else qmm_panels(w, K / BS * TS, N, K, x, M, y, nt, row_##name);                        \
    }

static inline void f16_1(const uint8_t *restrict x, float *restrict y) { *y = f16(x); }
static inline void bf16_1(const uint8_t *restrict x, float *restrict y) { *y = from_bits((uint32_t)rd16(x) << 16); }

/* which few-rows loop each type gets: the register one where its blocks decode into registers */
#if defined(__AVX512F__)
#define FEW_ROWS_q4_0(name, TS, BS) FEW_ROWS_REG(name, TS)
#define FEW_ROWS_q4_1(name, TS, BS) FEW_ROWS_REG(name, TS)
#define FEW_ROWS_q8_0(name, TS, BS) FEW_ROWS_REG(name, TS)
#else
#define FEW_ROWS_q4_0 FEW_ROWS
#define FEW_ROWS_q4_1 FEW_ROWS
#define FEW_ROWS_q8_0 FEW_ROWS
#endif
#define FEW_ROWS_q5_0 FEW_ROWS
#define FEW_ROWS_q5_1 FEW_ROWS
#define FEW_ROWS_iq4_nl FEW_ROWS
#define FEW_ROWS_q2_k FEW_ROWS
#define FEW_ROWS_q3_k FEW_ROWS
#define FEW_ROWS_q4_k FEW_ROWS
#define FEW_ROWS_q5_k FEW_ROWS
#define FEW_ROWS_q6_k FEW_ROWS
#define FEW_ROWS_iq4_xs FEW_ROWS
#define FEW_ROWS_f16_1 FEW_ROWS
#define FEW_ROWS_bf16_1 FEW_ROWS
QMM_BLOCK_TYPES(QMM)
QMM(f16_1, 2, 1)
QMM(bf16_1, 2, 1)

void qmm_f32(const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M, float *y, int nt) {
    qmm_panels(w, K * 4, N, K, x, M, y, nt, NULL);
}

/* Several products of one x (a layer's q, k, v; gate and up) in one call: y[i] = x @ W_i.T by
 * qmm function fns[i] on weights ws[i] of Ns[i] rows -- each exactly the single call's result. */
typedef void (*qmm_fn)(const uint8_t *, int64_t, int64_t, const float *, int64_t, float *, int);
void qmm_many(int count, const qmm_fn *fns, const uint8_t *const *ws, const int64_t *Ns, int64_t K, const float *x,
              int64_t M, float *const *ys, int nt) {
    for (int i = 0; i < count; i++) fns[i](ws[i], Ns[i], K, x, M, ys[i], nt);
}

/* ---- attention over fixed-order sums ---------------------------------------------------------
 *
 * attn_f32(q, kT, v, mask, B, H, HKV, NQ, NKV, D, DV, scale, cap, out, nt): for every group b,
 * head h (KV head h / (H / HKV)) and query i, softmax(scale * q . k) @ v over the keys the mask
 * shows, into out (B, NQ, H, DV). q (B, H, NQ, D), kT (B, HKV, D, NKV) (keys transposed), v (B,
 * HKV, NKV, DV), mask (B, NQ, NKV) bytes, all contiguous float32; NKV a multiple of 16.
 *
 * One fixed order per query, whatever else is in the call: a score is the fused multiply-adds of
 * q . k in increasing d; the row sum keeps 16 partial sums, key j in lane j mod 16 (keys come in
 * blocks aligned to their rank in the sequence, so a key keeps its lane), block after block, then
 * the pairwise tree; p @ v adds key after key. Blocks with no visible key are skipped and hidden
 * keys add exact zeros, so neither how many blocks the call holds, nor where they start, nor which
 * queries and groups share it changes a bit. exp is one polynomial (vexp) in plain float
 * operations, the same code for every lane. The query heads of one KV head are computed together
 * (GT at a time; score chains AS at a time), so each key and value row loaded serves several heads
 * -- which changes no order. The vector code (scores, pv; on AVX-512 the scale-mask-max and exp
 * passes too) performs exactly the plain loops' IEEE operations (fmaf is one rounding either way; a
 * max is exact in any order), so every build gives the same bits. */
#define AB 16 /* keys per block: the row sum's lanes */
#define EXP_FLOOR 1.8048513878454153e-35f /* just above exp(-80) (kernels.attention's _EXP_FLOOR) */

static inline float vexp(float x) { /* x in [-80, 0]: Cephes' expf polynomial, 2^n built exactly */
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    const float y = fmaf(p, r * r, r) + 1.0f;
    const uint32_t e = (uint32_t)((int32_t)n + 127) << 23;
    return y * from_bits(e);
}

#if defined(__AVX512F__)
static inline __m512 vexp16(__m512 x) { /* vexp, lane by lane */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}
#endif

static inline float ab_sum(const float *a) {
    float t[AB];
    memcpy(t, a, sizeof t);
    for (int n = AB / 2; n >= 1; n /= 2)
        for (int l = 0; l < n; l++) t[l] = t[l] + t[l + n];
    return t[0];
}

#define AS 4  /* score chains computed together: (head, key block) slots */
#define GT 4  /* query heads of one KV head computed together */
#if defined(__AVX512F__)
#define EC 64 /* output columns held in registers while p @ v runs over the keys */
#define VSET1 _mm512_set1_ps
#else
#define EC 32 /* (16 vector registers) */
#define VSET1 _mm256_set1_ps
#endif

/* AS chains of AB scores (acc is overwritten): acc[s][l] = sum over d, in increasing d, of
 * fmaf(qs[s][d], ks[s][d * NKV + l]) */
static inline void scores(const float *const *qs, const float *const *ks, int64_t D, int64_t NKV, float acc[AS][AB]) {
#ifdef VEC
#define SV ((int)(AB * 4 / sizeof(VEC))) /* vectors per chain */
    VEC a[AS][SV];
    for (int sl = 0; sl < AS; sl++)
        for (int c = 0; c < SV; c++) a[sl][c] = VZERO();
    for (int64_t dd = 0; dd < D; dd++) {
        const int64_t o = dd * NKV;
        for (int sl = 0; sl < AS; sl++) {
            const VEC qv = VSET1(qs[sl][dd]);
            for (int c = 0; c < SV; c++) a[sl][c] = VFMA(qv, VLOAD(ks[sl] + o + c * (AB / SV)), a[sl][c]);
        }
    }
    for (int sl = 0; sl < AS; sl++)
        for (int c = 0; c < SV; c++) VSTORE(acc[sl] + c * (AB / SV), a[sl][c]);
#else
    memset(acc, 0, sizeof(float) * AS * AB);
    for (int64_t dd = 0; dd < D; dd++)
        for (int sl = 0; sl < AS; sl++) {
            const float qd = qs[sl][dd];
            const float *kr = ks[sl] + dd * NKV;
            for (int l = 0; l < AB; l++) acc[sl][l] = fmaf(qd, kr[l], acc[sl][l]);
        }
#endif
}

#ifdef VEC
/* p @ v for nv x 16 columns (from e0) of gt rows (p in sc, one row of NKV per row; value row j at
 * vr[j]), key after key over the seen blocks: o[t][e] = fmaf(p[t][j], v[j][e], o[t][e]) in
 * increasing j, as the plain loop in attn_core */
#define PVV ((int)(64 / sizeof(VEC))) /* vectors per 16 columns */
static inline __attribute__((always_inline)) void pv(const int gt, const int nv, const float *restrict sc,
                                                     const float *const *restrict vr, int64_t e0,
                                                     const uint8_t *restrict seen, int64_t nb, int64_t NKV,
                                                     float o[GT][EC]) {
    VEC acc[GT][EC / 16 * PVV];
    const int nc = nv * PVV;
    for (int t = 0; t < gt; t++)
        for (int c = 0; c < nc; c++) acc[t][c] = VZERO();
    for (int64_t jb = 0; jb < nb; jb++) {
        if (!seen[jb]) continue;
        for (int64_t j = jb * AB; j < jb * AB + AB; j++) {
            const float *vj = vr[j] + e0;
            VEC vv[EC / 16 * PVV];
            for (int c = 0; c < nc; c++) vv[c] = VLOAD(vj + c * (16 / PVV));
            for (int t = 0; t < gt; t++) {
                const VEC p = VSET1(sc[t * NKV + j]);
                for (int c = 0; c < nc; c++) acc[t][c] = VFMA(p, vv[c], acc[t][c]);
            }
        }
    }
    for (int t = 0; t < gt; t++)
        for (int c = 0; c < nc; c++) VSTORE(o[t] + c * (16 / PVV), acc[t][c]);
}
#if EC == 64
#define PV_NV(gt, ne, ...)                                                                       \
    switch ((ne) / 16) { /* the column vectors a constant in each copy too */                   \
    case 1: pv(gt, 1, __VA_ARGS__); break;                                                       \
    case 2: pv(gt, 2, __VA_ARGS__); break;                                                       \
    case 3: pv(gt, 3, __VA_ARGS__); break;                                                       \
    default: pv(gt, 4, __VA_ARGS__); break;                                                      \
    }
#else
#define PV_NV(gt, ne, ...)                                                                       \
    switch ((ne) / 16) {                                                                         \
    case 1: pv(gt, 1, __VA_ARGS__); break;                                                       \
    default: pv(gt, 2, __VA_ARGS__); break;                                                      \
    }
#endif
#endif

/* Where attn_core finds its operands. Batched layout (attn_f32): q (B, H, NQ, D), kT (B, HKV, D,
 * NKV), v (B, HKV, NKV, DV), out (B, NQ, H, DV). Indexed layout (attn_kv_f32, qidx set): query i
 * of group b is row qidx[b NQ + i] of q (n, H, D), its output row the same of out (n, H, DV) or,
 * with out_seq, row b NQ + i; key j is row cells[b NKV + j] of the values, head h's value at
 * v + h v_sh + cell v_sc (cell -1: a zero row), kT holding those keys transposed (gathered first). */
typedef struct {
    const float *q, *kT, *v;
    const int64_t *qidx, *cells;
    int64_t v_sh, v_sc;
    int out_seq;
} attn_src;

static const float ZERO_ROW[1024] __attribute__((aligned(64))); /* value rows of cell -1 (DV <= 1024) */

static void attn_core(attn_src src, const uint8_t *restrict mask, int64_t B, int64_t H, int64_t HKV, int64_t NQ,
                      int64_t NKV, int64_t D, int64_t DV, float scale, float cap, float *restrict out, int nt) {
    /* an item: up to GT rows sharing one KV head -- GT of its query heads, or, when it has fewer,
     * all of them for GT / g consecutive queries. Blocks are computed when any row sees them; for
     * the others such a block is all hidden keys, which add exact zeros (and -inf scores), so a
     * row's result is the same as alone. */
    const int64_t g = H / HKV, nb = NKV / AB, qs = g >= GT ? 1 : GT / g, nqb = (NQ + qs - 1) / qs;
    const int64_t items = B * HKV * nqb;
    const float *q = src.q, *kT = src.kT;
    (void)nt;
    OMP(parallel num_threads(nt) if(nt > 1 && items > 1)) {
        float *sc = aligned_alloc(64, (size_t)(GT * NKV * 4 + 63) / 64 * 64);
        uint8_t *seen = malloc((size_t)nb + 1);
        const float **vr = malloc(sizeof(float *) * (size_t)NKV);
        OMP(for schedule(dynamic, 2))
        for (int64_t it = 0; it < items; it++) {
            const int64_t b = it / (HKV * nqb), kvh = (it / nqb) % HKV, i0 = (it % nqb) * qs;
            const int nqi = (int)(NQ - i0 < qs ? NQ - i0 : qs);
            const float *kt = kT + (b * HKV + kvh) * D * NKV;
            int any = 0;
            for (int64_t jb = 0; jb < nb; jb++) {
                int s = 0;
                for (int qi = 0; qi < nqi; qi++) {
                    const uint8_t *mi = mask + (b * NQ + i0 + qi) * NKV + jb * AB;
                    for (int l = 0; l < AB; l++) s |= mi[l];
                }
                seen[jb] = (uint8_t)(s != 0);
                any |= s;
            }
            for (int64_t jb = 0; jb < nb; jb++) /* value rows of the seen blocks (every pass's) */
                if (seen[jb])
                    for (int64_t j = jb * AB; j < jb * AB + AB; j++)
                        vr[j] = !src.qidx ? src.v + ((b * HKV + kvh) * NKV + j) * DV
                                : src.cells[b * NKV + j] < 0 ? ZERO_ROW
                                : src.v + kvh * src.v_sh + src.cells[b * NKV + j] * src.v_sc;
            for (int64_t t0 = 0; t0 < g; t0 += GT) {
                const int gt = (int)(g - t0 < GT ? g - t0 : GT), nr = nqi * gt;
                const float *qh[GT];
                float *oh[GT];
                const uint8_t *mr[GT];
                for (int r = 0; r < nr; r++) {
                    const int64_t i = i0 + r / gt, hh = kvh * g + t0 + r % gt;
                    const int64_t row = src.qidx ? src.qidx[b * NQ + i] : -1, orow = src.out_seq ? b * NQ + i : row;
                    qh[r] = q + (row < 0 ? (b * H + hh) * NQ + i : row * H + hh) * D;
                    oh[r] = out + (row < 0 ? (b * NQ + i) * H + hh : orow * H + hh) * DV;
                    mr[r] = mask + (b * NQ + i) * NKV;
                }
                if (!any) {
                    for (int r = 0; r < nr; r++) memset(oh[r], 0, (size_t)DV * 4);
                    continue;
                }
                /* scores: slot s is row s % nr of block jb + s / nr (bpu blocks per pass); each
                 * score is still its own chain of fmaf in increasing d */
                const int bpu = AS / nr > 0 ? AS / nr : 1, ns = nr * bpu;
                float mx[GT];
                for (int r = 0; r < nr; r++) mx[r] = -INFINITY;
                for (int64_t jb = 0; jb < nb;) {
                    if (!seen[jb]) {
                        jb++;
                        continue;
                    }
                    int nbk = 1;
                    while (nbk < bpu && jb + nbk < nb && seen[jb + nbk]) nbk++;
                    float acc[AS][AB] __attribute__((aligned(64)));
                    const float *qp[AS], *kp[AS];
                    for (int sl = 0; sl < AS; sl++) { /* unused slots repeat slot 0 (discarded) */
                        const int ok = sl < ns && sl / nr < nbk;
                        qp[sl] = qh[ok ? sl % nr : 0];
                        kp[sl] = kt + (jb + (ok ? sl / nr : 0)) * AB;
                    }
                    scores(qp, kp, D, NKV, acc);
                    for (int sl = 0; sl < nr * nbk; sl++) {
                        const int r = sl % nr;
                        const int64_t j0 = (jb + sl / nr) * AB;
                        float *st = sc + r * NKV;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && AB == 16
                        if (cap == 0.0f) { /* the loop below, 16 lanes at once (a max is exact in any order) */
                            const __mmask16 vis = _mm_cmpneq_epi8_mask(_mm_loadu_si128((const __m128i *)(mr[r] + j0)),
                                                                       _mm_setzero_si128());
                            const __m512 v = _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY),
                                                                  _mm512_mul_ps(_mm512_loadu_ps(acc[sl]), _mm512_set1_ps(scale)));
                            _mm512_storeu_ps(st + j0, v);
                            const float m = _mm512_reduce_max_ps(v);
                            mx[r] = m > mx[r] ? m : mx[r];
                            continue;
                        }
#endif
                        for (int l = 0; l < AB; l++) {
                            float s = acc[sl][l] * scale;
                            if (cap != 0.0f) s = cap * tanhf(s / cap);
                            s = mr[r][j0 + l] ? s : -INFINITY;
                            st[j0 + l] = s;
                            mx[r] = s > mx[r] ? s : mx[r];
                        }
                    }
                    jb += nbk;
                }
                /* probabilities in place of the scores, and each row's sum */
                float lsum[GT];
                for (int r = 0; r < nr; r++) {
                    float lv[AB] __attribute__((aligned(64))) = {0};
                    float *st = sc + r * NKV;
#if defined(__AVX512F__) && AB == 16
                    __m512 vl = _mm512_setzero_ps(); /* the loop below, lane l holding lv[l] */
                    for (int64_t jb = 0; jb < nb; jb++) {
                        if (!seen[jb]) continue;
                        const __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(st + jb * AB), _mm512_set1_ps(mx[r])),
                                                       _mm512_set1_ps(-80.0f)); /* (NaN -> -80, as x > -80 ? x : -80) */
                        const __m512 e = vexp16(x);
                        const __m512 p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, _mm512_set1_ps(EXP_FLOOR), _CMP_GT_OQ), e);
                        _mm512_storeu_ps(st + jb * AB, p);
                        vl = _mm512_add_ps(vl, p);
                    }
                    _mm512_storeu_ps(lv, vl);
#else
                    for (int64_t jb = 0; jb < nb; jb++) {
                        if (!seen[jb]) continue;
                        for (int l = 0; l < AB; l++) {
                            const float x = st[jb * AB + l] - mx[r];
                            const float e = vexp(x > -80.0f ? x : -80.0f);
                            st[jb * AB + l] = e <= EXP_FLOOR ? 0.0f : e;
                            lv[l] += st[jb * AB + l];
                        }
                    }
#endif
                    const float l = ab_sum(lv);
                    lsum[r] = l > 1e-30f ? l : 1e-30f;
                }
                /* p @ v: EC columns of every row at a time, key after key (hidden keys add exact
                 * zeros: p = 0) */
                for (int64_t e0 = 0; e0 < DV; e0 += EC) {
                    const int64_t ne = DV - e0 < EC ? DV - e0 : EC;
                    float o[GT][EC] __attribute__((aligned(64)));
#ifdef VEC
                    if (ne % 16 == 0) {
                        switch (nr) { /* the row count a constant in each copy: o stays in registers */
                        case 1: PV_NV(1, ne, sc, vr, e0, seen, nb, NKV, o); break;
                        case 2: PV_NV(2, ne, sc, vr, e0, seen, nb, NKV, o); break;
                        case 3: PV_NV(3, ne, sc, vr, e0, seen, nb, NKV, o); break;
                        default: PV_NV(4, ne, sc, vr, e0, seen, nb, NKV, o); break;
                        }
                    } else
#endif
                    {
                        for (int r = 0; r < nr; r++) memset(o[r], 0, (size_t)ne * 4);
                        for (int64_t jb = 0; jb < nb; jb++) {
                            if (!seen[jb]) continue;
                            for (int l = 0; l < AB; l++) {
                                const int64_t j = jb * AB + l;
                                const float *vj = vr[j] + e0;
                                for (int r = 0; r < nr; r++) {
                                    const float pt = sc[r * NKV + j];
                                    for (int64_t e = 0; e < ne; e++) o[r][e] = fmaf(pt, vj[e], o[r][e]);
                                }
                            }
                        }
                    }
                    for (int r = 0; r < nr; r++)
                        for (int64_t e = 0; e < ne; e++) oh[r][e0 + e] = o[r][e] / lsum[r];
                }
            }
        }
        free(sc);
        free(seen);
        free(vr);
    }
}

void attn_f32(const float *restrict q, const float *restrict kT, const float *restrict v, const uint8_t *restrict mask,
              int64_t B, int64_t H, int64_t HKV, int64_t NQ, int64_t NKV, int64_t D, int64_t DV,
              float scale, float cap, float *restrict out, int nt) {
    const attn_src src = {q, kT, v, NULL, NULL, 0, 0, 0};
    attn_core(src, mask, B, H, HKV, NQ, NKV, D, DV, scale, cap, out, nt);
}

/* attn_f32 on operands left where they are (the KV cache, an encoder's ubatch): head h's key of
 * cell c at k + h k_sh + c k_sc (likewise v), the keys of group b cells[b NKV .. b NKV + NKV - 1]
 * (NKV a multiple of 16, in the order attn_f32 wants them; -1: a zero row, to be masked), its
 * queries rows qidx[b NQ ..] of q (n, H, D), written to the same rows of out (n, H, DV) or, with
 * out_seq, to rows b NQ + i (B NQ rows). The keys are gathered transposed into a scratch buffer
 * first; values are read in place. Same bits as gathering the operands and calling attn_f32. */
void attn_kv_f32(const float *restrict q, const int64_t *restrict qidx, const float *restrict k,
                 const float *restrict v, const int64_t *restrict cells, const uint8_t *restrict mask, int64_t B,
                 int64_t H, int64_t HKV, int64_t NQ, int64_t NKV, int64_t k_sh, int64_t k_sc, int64_t v_sh,
                 int64_t v_sc, int64_t D, int64_t DV, float scale, float cap, float *restrict out, int out_seq,
                 int nt) {
    if (DV > 1024 || D > 1024) return; /* (the caller checks: ZERO_ROW's length) */
    float *kT = aligned_alloc(64, (size_t)(B * HKV * D * NKV * 4 + 63) / 64 * 64);
    (void)nt;
    OMP(parallel for num_threads(nt) schedule(static) if(nt > 1 && B * HKV * NKV * D >= (1 << 15)))
    for (int64_t r = 0; r < B * HKV; r++) {
        const int64_t b = r / HKV, kvh = r % HKV;
        float *dst = kT + r * D * NKV;
        for (int64_t j0 = 0; j0 < NKV; j0 += AB) { /* 16 keys at a time: each row of dst written a line at a time */
            const float *kj[AB];
            for (int l = 0; l < AB; l++) {
                const int64_t c = cells[b * NKV + j0 + l];
                kj[l] = c < 0 ? ZERO_ROW : k + kvh * k_sh + c * k_sc;
            }
            for (int64_t dd = 0; dd < D; dd++)
                for (int l = 0; l < AB; l++) dst[dd * NKV + j0 + l] = kj[l][dd];
        }
    }
    const attn_src src = {q, kT, v, qidx, cells, v_sh, v_sc, out_seq};
    attn_core(src, mask, B, H, HKV, NQ, NKV, D, DV, scale, cap, out, nt);
    free(kT);
}

/* -log softmax(x)[t] per row (tools.perplexity.token_nll on CPU float32), as llama-perplexity
 * computes it: float32 differences to the row max, their exponentials (vexp; 0 below -87, where
 * expf underflows) summed in double. Row i is logits + rows[i] * ld (rows NULL: row i), V
 * columns, target targets[i]. The sum keeps NLL_L double partial sums, column k in lane
 * k mod NLL_L, in increasing k, then the pairwise tree: one fixed order per row, so a row's value
 * depends on nothing else in the call, nor on the thread count. */
#define NLL_L 16

void nll_f32(const float *restrict logits, const int64_t *restrict rows, int64_t n, int64_t V, int64_t ld,
             const int64_t *restrict targets, double *restrict out, int nt) {
    (void)nt;
    OMP(parallel for num_threads(nt) schedule(dynamic, 1) if(nt > 1 && n > 1))
    for (int64_t i = 0; i < n; i++) {
        const float *x = logits + (rows ? rows[i] : i) * ld;
        const int64_t full = V / NLL_L * NLL_L;
        float mx = -INFINITY;
        double acc[NLL_L] = {0};
#if defined(__AVX512F__) /* the same operations as the loop below, 16 columns at a time */
        __m512 vm = _mm512_set1_ps(-INFINITY);
        for (int64_t k = 0; k < full; k += NLL_L) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + k));
        mx = _mm512_reduce_max_ps(vm); /* a max is exact in any order */
        for (int64_t k = full; k < V; k++) mx = x[k] > mx ? x[k] : mx;
        const __m512 m = _mm512_set1_ps(mx);
        __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
        for (int64_t k = 0; k < full; k += NLL_L) {
            const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + k), m);
            const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), vexp16(d));
            a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
            a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
        }
        _mm512_storeu_pd(acc, a0);
        _mm512_storeu_pd(acc + 8, a1);
#else
        for (int64_t k = 0; k < V; k++) mx = x[k] > mx ? x[k] : mx;
        for (int64_t k = 0; k < full; k += NLL_L)
            for (int l = 0; l < NLL_L; l++) {
                const float d = x[k + l] - mx;
                acc[l] += (double)(d >= -87.0f ? vexp(d) : 0.0f);
            }
#endif
        for (int64_t k = full; k < V; k++) {
            const float d = x[k] - mx;
            acc[k - full] += (double)(d >= -87.0f ? vexp(d) : 0.0f);
        }
        for (int m = NLL_L / 2; m >= 1; m /= 2)
            for (int l = 0; l < m; l++) acc[l] = acc[l] + acc[l + m];
        out[i] = log(acc[0]) - (double)(x[targets[i]] - mx);
    }
}

/* Row-wise and elementwise kernels of the CPU float32 forward (kernels.elementwise, kernels.rope):
 * each output element is computed from its own row alone, in one fixed order, so no result depends
 * on the other rows of the call nor on the thread count. */

/* RMSNorm: y = x * (1 / sqrtf(mean(x^2) + eps)) (* w), n rows of d. The squares go into RMS_L float
 * partial sums, column k in lane k mod RMS_L, then the pairwise tree; the mean is the sum / d. */
#define RMS_L 16
void rms_f32(const float *restrict x, const float *restrict w, int64_t n, int64_t d, float eps,
             float *restrict y, int nt) {
    (void)nt;
    OMP(parallel for num_threads(nt) schedule(static) if(nt > 1 && n * d >= (1 << 16)))
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * d;
        float *yi = y + i * d;
        float acc[RMS_L] = {0};
        const int64_t full = d / RMS_L * RMS_L;
        for (int64_t k = 0; k < full; k += RMS_L)
            for (int l = 0; l < RMS_L; l++) acc[l] += xi[k + l] * xi[k + l];
        for (int64_t k = full; k < d; k++) acc[k - full] += xi[k] * xi[k];
        for (int m = RMS_L / 2; m >= 1; m /= 2)
            for (int l = 0; l < m; l++) acc[l] = acc[l] + acc[l + m];
        const float sc = 1.0f / sqrtf(acc[0] / (float)d + eps);
        if (w)
            for (int64_t k = 0; k < d; k++) yi[k] = (xi[k] * sc) * w[k];
        else
            for (int64_t k = 0; k < d; k++) yi[k] = xi[k] * sc;
    }
}

/* RoPE on x (n, h, dh) with cos / sin (n, d / 2) for the first d of each head's dh values (the rest
 * copied): pairs (a, b) are adjacent (normal) or d / 2 apart (neox); a' = a cos - b sin,
 * b' = a sin + b cos, each product rounded, then the sum: the operations of the torch path, so the
 * same bits. */
void rope_f32(const float *restrict x, const float *restrict cs, const float *restrict sn, int64_t n, int64_t h,
              int64_t dh, int64_t d, int neox, float *restrict y, int nt) {
    (void)nt;
    const int64_t half = d / 2;
    OMP(parallel for num_threads(nt) schedule(static) if(nt > 1 && n * h * dh >= (1 << 16)))
    for (int64_t r = 0; r < n * h; r++) {
        const float *xi = x + r * dh, *c = cs + (r / h) * half, *s = sn + (r / h) * half;
        float *yi = y + r * dh;
        if (neox)
            for (int64_t j = 0; j < half; j++) {
                const float a = xi[j], b = xi[j + half];
                yi[j] = a * c[j] - b * s[j];
                yi[j + half] = a * s[j] + b * c[j];
            }
        else
            for (int64_t j = 0; j < half; j++) {
                const float a = xi[2 * j], b = xi[2 * j + 1];
                yi[2 * j] = a * c[j] - b * s[j];
                yi[2 * j + 1] = a * s[j] + b * c[j];
            }
        for (int64_t j = d; j < dh; j++) yi[j] = xi[j];
    }
}

/* SiLU, times u when given (SwiGLU): y = (g / (1 + exp(-g))) (* u), exp by vexp_any (vexp's
 * polynomial over the whole float range). */
static inline float vexp_any(float x) {
    if (x > 88.0f) return INFINITY;
    if (x < -87.0f) return 0.0f;
    return vexp(x);
}

void silu_f32(const float *restrict g, const float *restrict u, int64_t n, float *restrict y, int nt) {
    (void)nt;
    if (u) {
        OMP(parallel for num_threads(nt) schedule(static) if(nt > 1 && n >= (1 << 16)))
        for (int64_t i = 0; i < n; i++) y[i] = (g[i] / (1.0f + vexp_any(-g[i]))) * u[i];
    } else {
        OMP(parallel for num_threads(nt) schedule(static) if(nt > 1 && n >= (1 << 16)))
        for (int64_t i = 0; i < n; i++) y[i] = g[i] / (1.0f + vexp_any(-g[i]));
    }
}

/* GELU, tanh form, times u when given (GeGLU): 0.5 g (1 + tanh(z)), z = c (g + 0.044715 g^3),
 * c = sqrt(2 / pi), computed as g / (1 + exp(-2 z)) (the same function: 1 + tanh(z) = 2 / (1 +
 * exp(-2 z))), with no cancellation where tanh(z) is near -1; exp by vexp_any. */
static inline float gelu_tanh1(float x) {
    const float z = 0.7978845608028654f * (x + 0.044715f * (x * x * x));
    return x / (1.0f + vexp_any(-2.0f * z));
}

void gelu_tanh_f32(const float *restrict g, const float *restrict u, int64_t n, float *restrict y, int nt) {
    (void)nt;
    if (u) {
        OMP(parallel for num_threads(nt) schedule(static) if(nt > 1 && n >= (1 << 16)))
        for (int64_t i = 0; i < n; i++) y[i] = gelu_tanh1(g[i]) * u[i];
    } else {
        OMP(parallel for num_threads(nt) schedule(static) if(nt > 1 && n >= (1 << 16)))
        for (int64_t i = 0; i < n; i++) y[i] = gelu_tanh1(g[i]);
    }
}

/* The ABI version Python checks after loading (bump when a signature changes). */
int dq_abi(void) { return 12; }

/* partial sums per output of qmm (K must be a multiple) */
int qmm_lanes(void) { return QL; }
