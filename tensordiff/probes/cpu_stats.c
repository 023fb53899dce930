/* One-pass statistics and a checksum of a dense CPU tensor, for op-level capture.
 *
 * numpy needs six passes (min, max, sum, dot, abs-sum, count_nonzero) and torch's single-threaded
 * reductions are slower still; an op-level capture computes the stats of every new tensor of every
 * op, so they were the capture's main cost on the CPU. The loop below vectorises (8 float lanes on
 * AVX2): blocks of 256 elements accumulate in float32, block totals in float64.
 *
 * Compiled by cpu_stats.py with -ffinite-math-only and -fassociative-math (what lets the compiler
 * vectorise min, max and sums) but not -ffast-math, whose startup code would set flush-to-zero for
 * the whole process. Finite-math is safe here because no test below looks at a float: finiteness
 * and NaN are read from the bits, and non-finite values are replaced before any arithmetic.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define BLOCK 256

static void finish(double *out, int64_t n, double S, double SA, double SQ, double MN, double MX,
                   int64_t Z, int64_t B, int64_t nans) {
    int64_t finite = n - B;
    double count = finite > 0 ? (double)finite : 1.0;
    double mean = S / count;
    double var = SQ / count - mean * mean;
    if (var < 0) var = 0;
    out[0] = MN; out[1] = MX; out[2] = mean; out[3] = SA / count; out[4] = sqrt(var); out[5] = sqrt(SQ);
    if (finite == 0) { for (int k = 0; k < 6; k++) { uint64_t q = 0x7ff8000000000000ull; memcpy(&out[k], &q, 8); } }
    out[6] = (double)nans; out[7] = (double)(B - nans); out[8] = (double)Z;
}

/* LOAD(k): element k as float; BITS(k): its bits, widened to uint32; FINITE(w), ISNAN(w), ISZERO(w):
 * read from the bits (under -ffinite-math-only a float comparison may count a NaN as equal to zero).
 *
 * Each block of BLOCK elements is read once for the stats and the checksum (td_checksum's sums, the
 * same wrapping arithmetic, so the two agree bit for bit). The pass assumes finite values, which
 * drops three selects per element (1.45x faster on an AVX2 EPYC); a block holding a non-finite
 * element is summed again with those masked out, and only then are NaNs told from infinities. */
#define STATS_LOOP(LOAD, BITS, FINITE, ISNAN, ISZERO)                                                   \
    double S = 0, SA = 0, SQ = 0; float MN = INFINITY, MX = -INFINITY; int64_t Z = 0, B = 0, nans = 0;  \
    uint32_t ca = 0, cb = 0, cx = 0;                                                                  \
    for (int64_t i = 0; i < n; i += BLOCK) {                                                          \
        int64_t m = n - i < BLOCK ? n - i : BLOCK;                                                    \
        float s = 0, sa = 0, sq = 0, mn = INFINITY, mx = -INFINITY; int32_t z = 0, b = 0;             \
        uint32_t a1 = 0, b1 = 0, c1 = 0;                                                              \
        for (int64_t j = 0; j < m; j++) {  /* a count from 0: the form the vectoriser recognises */    \
            float v = LOAD(i + j); uint32_t w = BITS(i + j);                                          \
            s += v; sa += fabsf(v); sq += v * v;                                                      \
            mn = v < mn ? v : mn; mx = v > mx ? v : mx;                                               \
            z += ISZERO(w); b += !FINITE(w);                                                          \
            a1 += w; b1 += w * 0x9E3779B1u; c1 ^= w;                                                  \
        }                                                                                             \
        ca += a1; cb += b1; cx ^= c1;                                                                 \
        if (b) {  /* a NaN or Inf in this block: its sums again, over the finite elements only */      \
            s = 0; sa = 0; sq = 0; mn = INFINITY; mx = -INFINITY;                                     \
            for (int64_t j = 0; j < m; j++) {                                                         \
                float v = LOAD(i + j); uint32_t w = BITS(i + j);                                      \
                int32_t fin = FINITE(w);                                                              \
                float f = fin ? v : 0.0f;                                                             \
                s += f; sa += fabsf(f); sq += f * f;                                                  \
                float lo = fin ? v : INFINITY, hi = fin ? v : -INFINITY;                              \
                mn = lo < mn ? lo : mn; mx = hi > mx ? hi : mx;                                       \
                nans += ISNAN(w);                                                                     \
            }                                                                                         \
        }                                                                                             \
        S += s; SA += sa; SQ += (double)sq; Z += z; B += b;                                           \
        MN = mn < MN ? mn : MN; MX = mx > MX ? mx : MX;                                               \
    }                                                                                                 \
    finish(out, n, S, SA, SQ, MN, MX, Z, B, nans);                                                    \
    uint64_t hash = 1469598103934665603ull ^ (uint64_t)n;                                             \
    hash = (hash ^ (uint64_t)ca) * 1099511628211ull; hash = (hash ^ (uint64_t)cb) * 1099511628211ull; \
    hash = (hash ^ (uint64_t)cx) * 1099511628211ull;                                                  \
    memcpy(out + 9, &hash, 8);

static inline float bf16_to_float(uint16_t h) {
    uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f;
}

#ifdef __FLT16_MANT_DIG__
static inline float f16_to_float(uint16_t h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
#else
static inline float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    float mag;
    if (exp == 0) mag = (float)man * 5.9604644775390625e-08f;  /* subnormal: man * 2^-24 */
    else { uint32_t b = ((exp + 112u) << 23) | (man << 13); memcpy(&mag, &b, 4); }
    uint32_t bits; memcpy(&bits, &mag, 4); bits |= sign; float f; memcpy(&f, &bits, 4); return f;
}
#endif

uint64_t td_checksum(const void *data, int64_t n, int itemsize);

/* dtype: 0 float32, 1 float64, 2 bfloat16, 3 float16. out: schema.STAT_NAMES (min, max, mean,
 * mean_abs, std, l2, nan, inf, zero), moments over the finite elements, then (out + 9, as 8 bytes)
 * td_checksum of the same bytes, summed in the same pass. Returns 0, -1 for a dtype this file does
 * not handle. */
int td_cpu_stats(const void *data, int64_t n, int dtype, double *out) {
    if (dtype == 0) {
        const float *x = (const float *)data;
        const uint32_t *u = (const uint32_t *)data;
#define LD32(k) (x[k])
#define BITS32(k) (u[k])
#define FIN32(w) (((w) & 0x7f800000u) != 0x7f800000u)
#define NAN32(w) (((w) & 0x7fffffffu) > 0x7f800000u)
#define ZERO32(w) (((w) & 0x7fffffffu) == 0)
        STATS_LOOP(LD32, BITS32, FIN32, NAN32, ZERO32)
        return 0;
    }
    if (dtype == 2) {
        const uint16_t *h = (const uint16_t *)data;
#define LDBF(k) (bf16_to_float(h[k]))
#define BITS16(k) ((uint32_t)h[k])
#define FINBF(w) (((w) & 0x7f80u) != 0x7f80u)
#define NANBF(w) (((w) & 0x7fffu) > 0x7f80u)
#define ZERO16(w) (((w) & 0x7fffu) == 0)
        STATS_LOOP(LDBF, BITS16, FINBF, NANBF, ZERO16)
        return 0;
    }
    if (dtype == 3) {
        const uint16_t *h = (const uint16_t *)data;
#define LDF16(k) (f16_to_float(h[k]))
#define FINF16(w) (((w) & 0x7c00u) != 0x7c00u)
#define NANF16(w) (((w) & 0x7fffu) > 0x7c00u)
        STATS_LOOP(LDF16, BITS16, FINF16, NANF16, ZERO16)
        return 0;
    }
    if (dtype == 1) {  /* float64 keeps double arithmetic; bits decide finiteness here too */
        const double *x = (const double *)data;
        const uint64_t *u = (const uint64_t *)data;
        double S = 0, SA = 0, SQ = 0, MN = INFINITY, MX = -INFINITY;
        int64_t Z = 0, B = 0, nans = 0;
        for (int64_t k = 0; k < n; k++) {
            int fin = (u[k] & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
            double v = fin ? x[k] : 0.0;
            S += v; SA += fabs(v); SQ += v * v;
            double lo = fin ? x[k] : INFINITY, hi = fin ? x[k] : -INFINITY;
            MN = lo < MN ? lo : MN; MX = hi > MX ? hi : MX;
            Z += (u[k] & 0x7fffffffffffffffull) == 0; B += !fin; nans += (u[k] & 0x7fffffffffffffffull) > 0x7ff0000000000000ull;
        }
        finish(out, n, S, SA, SQ, MN, MX, Z, B, nans);
        uint64_t sum = td_checksum(data, n, 8);
        memcpy(out + 9, &sum, 8);
        return 0;
    }
    return -1;
}

/* A checksum of n elements of itemsize bytes: tells whether a captured tensor's data changed
 * without its version counter moving (a kernel writing through a raw pointer). It does not depend
 * on the elements' order, so a tensor, its transpose and a contiguous copy of either agree (the
 * capture checksums a copy, the later check the live tensor). Per element: a sum, a sum of the
 * element times an odd constant, and an xor; all vectorise. */
#define CHECKSUM_LOOP(T, ACC, MUL)                                                                    \
    {                                                                                                 \
        const T *w = (const T *)data;                                                                 \
        ACC a = 0, b = 0, c = 0;  /* wrapping sums: still independent of the order */                 \
        for (int64_t k = 0; k < n; k++) { ACC v = w[k]; a += v; b += v * (ACC)MUL; c ^= v; }         \
        h = (h ^ (uint64_t)a) * 1099511628211ull; h = (h ^ (uint64_t)b) * 1099511628211ull;         \
        h = (h ^ (uint64_t)c) * 1099511628211ull;                                                     \
    }

uint64_t td_checksum(const void *data, int64_t n, int itemsize) {
    uint64_t h = 1469598103934665603ull ^ (uint64_t)n;
    switch (itemsize) {
        case 1: CHECKSUM_LOOP(uint8_t, uint32_t, 0x9E3779B1u) break;
        case 2: CHECKSUM_LOOP(uint16_t, uint32_t, 0x9E3779B1u) break;
        case 4: CHECKSUM_LOOP(uint32_t, uint32_t, 0x9E3779B1u) break;
        case 8: CHECKSUM_LOOP(uint64_t, uint64_t, 0x9E3779B97F4A7C15ull) break;
        default: n *= itemsize; CHECKSUM_LOOP(uint8_t, uint32_t, 0x9E3779B1u) break;
    }
    return h;
}

/* A target tensor against the reference's, one pass (observers/live_compare.py on the host; the GPU
 * twin is fused_stats.cu's pair kernel). t: float32 (0), bfloat16 (2) or float16 (3); r: float32;
 * both dense in the same element order. out: [sum d^2, sum r^2, sum t^2, sum r*t, sum |d|] over the
 * elements finite on both sides, then max |d|, then the count of non-finite mismatches (NaN or Inf on
 * one side only, or unequal infinities; NaN on both sides is no mismatch). Double accumulators: a
 * float32 target's error against its float32 reference may be 1e-7 relative. Returns 0, -1 for a
 * dtype not handled here. */
#define PAIR_LOOP(LOADT, BITST)                                                                         \
    for (int64_t k = 0; k < n; k++) {                                                                 \
        float a = LOADT(k), b = r[k];                                                                 \
        uint32_t ua = BITST(a), ub = ur[k];                                                           \
        int fa = (ua & 0x7f800000u) != 0x7f800000u, fb = (ub & 0x7f800000u) != 0x7f800000u;          \
        int both = fa & fb;                                                                           \
        double x = both ? (double)a : 0.0, y = both ? (double)b : 0.0, d = x - y;                     \
        double ad = d < 0 ? -d : d;                                                                   \
        sd += d * d; sr += y * y; st += x * x; dot += x * y; sa += ad; mx = ad > mx ? ad : mx;        \
        int na = (ua & 0x7fffffffu) > 0x7f800000u, nb = (ub & 0x7fffffffu) > 0x7f800000u;             \
        bad += (!both) & !(na & nb) & (ua != ub);                                                     \
    }

static inline uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

int td_pair_metrics(const void *t, int tdt, const float *r, int64_t n, double *out) {
    const uint32_t *ur = (const uint32_t *)r;
    double sd = 0, sr = 0, st = 0, dot = 0, sa = 0, mx = 0;
    int64_t bad = 0;
    if (tdt == 0) {
        const float *x = (const float *)t;
#define LDP32(k) (x[k])
        PAIR_LOOP(LDP32, float_bits)
    } else if (tdt == 2) {
        const uint16_t *h = (const uint16_t *)t;
#define LDPBF(k) (bf16_to_float(h[k]))
        PAIR_LOOP(LDPBF, float_bits)
    } else if (tdt == 3) {
        const uint16_t *h = (const uint16_t *)t;
#define LDPF16(k) (f16_to_float(h[k]))
        PAIR_LOOP(LDPF16, float_bits)
    } else {
        return -1;
    }
    out[0] = sd; out[1] = sr; out[2] = st; out[3] = dot; out[4] = sa; out[5] = mx; out[6] = (double)bad;
    return 0;
}
