#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MASKED (-1e4f)
#define VW 16                                    /* floats per vector (GCC/Clang vector extension) */
#define QB 4                                     /* queries per logits block */
typedef float vf __attribute__((vector_size(VW * 4)));
#define ALIGNED(p) __builtin_assume_aligned((p), 64)

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline int bad_bits(float x) {            /* NaN or +-inf, from the bit pattern (fast-math safe) */
    uint32_t u; memcpy(&u, &x, 4); return (u & 0x7f800000u) == 0x7f800000u;
}

static inline int nonfinite_not_neginf(float x) { /* NaN or +inf (-inf is a mask), from the bits */
    uint32_t u; memcpy(&u, &x, 4); return (u & 0x7f800000u) == 0x7f800000u && u != 0xff800000u;
}

/* e^x and e^x - 1 for -87 < x < 88 from one polynomial, inline (vectorises without calls): x = n ln 2 + r with
   n = 0 for |x| < 1/2, else the nearest integer to x / ln 2 (|r| <= ln 2 / 2); e^r - 1 = r + r^2/2 + ... by its
   Taylor polynomial to r^8 (relative error < 1.4e-8 for |r| <= 1/2); then with s = 2^n (built from the exponent
   bits) e^x = s (e^r - 1) + s, and e^x - 1 is the polynomial itself for |x| < 1/2 (where subtracting 1 from e^x
   would cancel), e^x - 1 beyond (nothing cancels there). (Not s (e^r - 1) + (s - 1) for every x: fast-math may
   reassociate that into e^x - 1.) */
static inline void exp_expm1(float x, float *ex, float *em) {
    const int small = fabsf(x) < 0.5f;
    float n = small ? 0.0f : rintf(x * 1.4426950408889634f);
    float r = x - n * 0.693145751953125f;                /* ln 2 in two parts: the first exact in float */
    r = r - n * 1.4286067653e-06f;
    float pm = r * (1.0f + r * (0.5f + r * (1.0f / 6.0f + r * (1.0f / 24.0f + r * (1.0f / 120.0f + r * (1.0f / 720.0f
               + r * (1.0f / 5040.0f + r * (1.0f / 40320.0f))))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, 4);
    *ex = s * pm + s;
    *em = small ? pm : *ex - 1.0f;
}

/* log1p(a / b) for 0 <= a <= b as 2 atanh(t), t = a / (a + 2 b) <= 1/3 (one division, not two: a / b, then
   r / (2 + r)): an odd series to t^15, relative error < 2e-9, inline. (Estrin's scheme for the series, shorter
   dependency chains, measured 13% slower for the whole kernel than Horner's.) */
static inline float log1p_ratio(float a, float b) {
    float t = a / (a + 2.0f * b), u = t * t;
    return 2.0f * t * (1.0f + u * (1.0f / 3.0f + u * (0.2f + u * (1.0f / 7.0f + u * (1.0f / 9.0f + u * (1.0f / 11.0f
           + u * (1.0f / 13.0f + u * (1.0f / 15.0f))))))));
}

#include "js_table.h"     /* JS_NI, JS_DEG, JS_XMAX, JS_TAB: written by cpu_kernel.py at build time */
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline vf vbcast(float x) { return (vf){} + x; }

/* G(x) = x tanh x - log cosh x for x >= 0, VW lanes: G = x^2 Q(x), Q = G / x^2 smooth, on JS_NI intervals of [0,
   JS_XMAX) by a degree JS_DEG polynomial each (Chebyshev interpolants, relative error < 1e-7; coefficients picked
   per lane by a vector permute from JS_NV registers per degree: tab[d * JS_NV + v] = coefficient d of intervals
   v VW ... v VW + VW - 1); past JS_XMAX, G is log 2 to 5e-8 relative and x is clamped there. Relative accuracy
   near 0 (G ~ x^2 / 2): no cancellation anywhere. */
#define JS_NV (JS_NI / VW)
static inline vf js_g_vec(vf x, const vf *tab) {
    vf v = x * (float)(JS_NI / JS_XMAX), lim = vbcast((float)JS_NI - 1e-3f);
    vi lt = v < lim;
    v = (vf)((lt & (vi)v) | (~lt & (vi)lim));
    vi k = __builtin_convertvector(v, vi);
    vf s = v - __builtin_convertvector(k, vf) - 0.5f;
#if defined(__clang__) || defined(MIMLAB_PORTABLE)     /* no __builtin_shuffle: per-lane loads */
    vf cf[JS_DEG + 1];
    (void)tab;
    for (int d = 0; d <= JS_DEG; d++)
        for (int t = 0; t < VW; t++) cf[d][t] = JS_TAB[d][k[t]];
#define JS_COEF(d) cf[d]
#elif JS_NV == 1
#define JS_COEF(d) __builtin_shuffle(tab[d], k)
#elif JS_NV == 2                                       /* two-source permutes (vpermt2ps): 32 intervals */
#define JS_COEF(d) __builtin_shuffle(tab[2 * (d)], tab[2 * (d) + 1], k)
#else
#error "JS_NI must be VW or 2 VW"
#endif
    vf q = JS_COEF(JS_DEG);
    for (int d = JS_DEG - 1; d >= 0; d--) q = q * s + JS_COEF(d);
#undef JS_COEF
    vf xc = v * (float)(JS_XMAX / JS_NI);
    return xc * xc * q;
}

/* 16 x 16 transpose in registers (GCC): stage s pairs rows i and i + s and swaps bit s of the row and column
   indices, so four stages transpose; 64 two-source permutes per 256 floats instead of 256 strided loads */
#if !defined(__clang__) && !defined(MIMLAB_PORTABLE) && VW == 16
#define HAVE_TRANSPOSE16 1
static inline void transpose16(vf r[16]) {
    static const vi M[8] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
        {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
        {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
        {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
        {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
        {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
        {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
        {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
    };
    for (int st = 0, sft = 8; st < 4; st++, sft >>= 1)
        for (int i = 0; i < 16; i++)
            if (!(i & sft)) {
                vf a = r[i], b = r[i + sft];
                r[i] = __builtin_shuffle(a, b, M[2 * st]);
                r[i + sft] = __builtin_shuffle(a, b, M[2 * st + 1]);
            }
}
#endif

/* S[r][j] = scale * q_r . k_j for r < nr <= QB query rows (row stride qs) and j < Np (kt: D x Np, Np % VW == 0) */
static void qk_rows(const float *q, long qs, int D, const float *kt, int Np, int nr, float scale, float *S) {
    int j0 = 0;
    for (; j0 + 4 * VW <= Np; j0 += 4 * VW) {
        vf acc[QB][4];
        memset(acc, 0, sizeof acc);
        for (int d = 0; d < D; d++) {
            const float *kr = kt + (size_t)d * Np + j0;
            vf k0 = vload(kr), k1 = vload(kr + VW), k2 = vload(kr + 2 * VW), k3 = vload(kr + 3 * VW);
            for (int r = 0; r < QB; r++) {
                float qv = q[(r < nr ? r : 0) * qs + d];
                acc[r][0] += qv * k0; acc[r][1] += qv * k1; acc[r][2] += qv * k2; acc[r][3] += qv * k3;
            }
        }
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < 4; c++) vstore(S + (size_t)r * Np + j0 + c * VW, acc[r][c] * scale);
    }
    for (; j0 < Np; j0 += VW) {
        vf acc[QB];
        memset(acc, 0, sizeof acc);
        for (int d = 0; d < D; d++) {
            vf k0 = vload(kt + (size_t)d * Np + j0);
            for (int r = 0; r < QB; r++) acc[r] += q[(r < nr ? r : 0) * qs + d] * k0;
        }
        for (int r = 0; r < nr; r++) vstore(S + (size_t)r * Np + j0, acc[r] * scale);
    }
}

typedef double vd __attribute__((vector_size(VW * 4)));   /* VW / 2 doubles */

static inline void acc_double(vd *acc, vf v) {   /* acc[0..1] += the VW float lanes of v, in double */
    float lo[VW / 2], hi[VW / 2];
    memcpy(lo, &v, sizeof lo); memcpy(hi, (char *)&v + sizeof lo, sizeof hi);
    vd a, b;
    for (int t = 0; t < VW / 2; t++) { a[t] = lo[t]; b[t] = hi[t]; }
    acc[0] += a; acc[1] += b;
}

static inline double hsum_d(const vd *acc) {
    double s = 0.0;
    for (int t = 0; t < VW / 2; t++) s += acc[0][t] + acc[1][t];
    return s;
}

typedef struct {
    int H, N, K, Kp, P, renormalize, do_js;
    float eps, lke, keps, inv_k;
    double logk;
    /* per-query per-head rows (H x Kp): lpk (= log K p), p, ell; kp: Kp floats of scratch (e^x of one row) */
    float *lpk, *p, *ell, *kp;
    double *dsum, *esum, *nsum, *psum, *cross, *js, *colsum;
    double *pesum;                /* H x P: attention mass on each prefix token, summed over the queries */
    double *colw;                 /* H x Kp column sums (padded) */
    double *dlo;                  /* H: per head, sum over queries of the float rounding of delta */
    vd *crossv, *jsv;             /* H x H x 2 double vector accumulators */
    vf *crossf, *jsf;             /* H x H float vector accumulators of the last few queries */
    int pending;                  /* queries in crossf / jsf */
    float *row;                   /* Kp + VW floats: a padded copy of a row's patch logits */
    float *valid;                 /* Kp floats: 1 for a key, 0 for padding (a load, not j < K: GCC would split
                                     every loop at K and run the padding and the remainder as scalar code) */
    float err;
    int bad;
} Ctx;

/* one attention row r (N logits, prefix first) of head h for a query with distance row drow (Kp, zero padded).
   Every loop runs over Kp = K rounded up to VW, so it vectorises without a scalar remainder; lanes j >= K get
   p = 0 and finite values elsewhere, so they add exactly 0 to every sum. */
static void row_stats(Ctx *c, int h, const float *restrict r, const float *restrict drow) {
    const int N = c->N, K = c->K, Kp = c->Kp / VW * VW, P = c->P;   /* (a visible multiple of VW: no epilogues) */
    float *restrict sp = c->row;
    float rmax = -INFINITY, pm = -INFINITY;
    int rb = 0;
    #pragma omp simd simdlen(VW) reduction(|:rb) reduction(max:rmax)
    for (int j = 0; j < N; j++) { rb |= nonfinite_not_neginf(r[j]); rmax = r[j] > rmax ? r[j] : rmax; }
    c->bad |= rb;
    /* -inf (masked) logits -> rowmax - 1e4; a row without a finite logit -> all at -1e4 (uniform) */
    /* (an OpenMP max-reduction starts from -FLT_MAX, not -inf: a row of -inf ends at -FLT_MAX) */
    const float floor = (bad_bits(rmax) || rmax <= -3.0e38f ? 0.0f : rmax) + MASKED;
    float ssum = 0.0f;
    #pragma omp simd simdlen(VW) reduction(max:pm) reduction(+:ssum)
    for (int j = 0; j < K; j++) {
        float v = r[P + j]; v = v > floor ? v : floor; sp[j] = v; pm = v > pm ? v : pm; ssum += v;
    }
    /* shift a: the mean logit when the row is within 1 of uniform, so x = s - a is centred and small and the sums
       of x and of log K p below do not cancel; else the maximum, so x <= 0 is exact near the keys that matter */
    const float mean = ssum * c->inv_k;
    const int centred = pm - mean <= 1.0f;
    const float m = centred ? mean : pm;
    for (int j = K; j < Kp; j++) sp[j] = pm - 40.0f;            /* padding (p = 0 is set below) */
    float *restrict lh = ALIGNED(c->lpk + (size_t)h * Kp), *restrict ph = ALIGNED(c->p + (size_t)h * Kp);
    float *restrict eh = ALIGNED(c->ell + (size_t)h * Kp), *restrict kh = ALIGNED(c->kp);
    sp = ALIGNED(sp); drow = ALIGNED(drow);
    const float *restrict vm = ALIGNED(c->valid);
    /* pass 1: x = s - m, ex = exp(x), em = expm1(x); sum_j exp(x_j) = K + S. Below -80, exp(x) is taken as 0 and
       expm1(x) as -1 (no denormals). */
    float S = 0.0f, T = 0.0f;
    #pragma omp simd simdlen(VW) reduction(+:S, T) aligned(sp, lh, ph, kh, vm : 64)
    for (int j = 0; j < Kp; j++) {
        float x = sp[j] - m, ex, em;
        exp_expm1(x > -80.0f ? x : -80.0f, &ex, &em);
        ex = x > -80.0f ? ex : 0.0f;
        em = x > -80.0f ? em : -1.0f;
        lh[j] = x; ph[j] = em; kh[j] = ex; S += em * vm[j]; T += ex * vm[j];
    }
    /* sum_j e^x_j = K + S: near uniform (centred) from S, whose terms are small; else T, the sum itself (all
       terms positive: no cancellation; K + S would lose the digits of a peaked row's sum, ~1 << K, to the rounding
       of K terms ~ -1). log K p_j = x_j - delta, delta = log(KS / K); K p_j = c e^x_j, c = K / KS, and near
       uniform K p_j = 1 + u_j, u_j = c em_j + (c - 1), exact relative to its (small) size */
    double KS = centred ? (double)K + (double)S : (double)T;
    double delta_d = centred ? log1p((double)S / (double)K) : log(KS / (double)K);
    float delta = (float)delta_d, cf = (float)((double)K / KS);
    float cm1 = (float)(centred ? -(double)S / KS : (double)K / KS - 1.0);
    float su = 0.0f, sl = 0.0f, sul = 0.0f, dd = 0.0f;
    const float lke = c->lke, keps = c->keps, inv_k = c->inv_k;
    #pragma omp simd simdlen(VW) reduction(+:su, sl, sul, dd) aligned(lh, ph, eh, kh, drow, vm : 64)
    for (int j = 0; j < Kp; j++) {
        float valid = vm[j];
        float l = lh[j] - delta;
        float u = cf * ph[j] + cm1;
        float kpe = kh[j] * cf;                     /* K p = e^(x - delta) = e^x c: exact in relative terms */
        /* K p = 1 + u near uniform (|l| < 1: exact to its deviation from 1), e^x c elsewhere (1 + u would lose the
           digits of K p to the rounding of c em ~ -c: below, and in every row shifted by its maximum) */
        int near = centred & (l > -1.0f);
        float kpn = near ? 1.0f + u : kpe;
        float pj = kpn * inv_k * valid;
        /* sum K p l = sum l + sum u l near uniform; sum K p l directly below */
        float tl = near ? l : 0.0f, tul = near ? u * l : kpe * l;
        su += (kpn - 1.0f) * valid; sl += tl * valid; sul += tul * valid;
        dd += pj * drow[j];
        float kpc = kpe > 1e-30f ? kpe : 1e-30f;
        /* ell = log(K p + K eps) = max(l, lke) + log1p(exp(-|l - lke|)), exp(-|l - lke|) = min / max of K p, K eps */
        eh[j] = (l > lke ? l : lke) + log1p_ratio(kpc < keps ? kpc : keps, kpc < keps ? keps : kpc);
        lh[j] = l; ph[j] = pj;
    }
    /* lpk = x - delta carries delta's float rounding delta_lo in every element: removed from the sums exactly
       (negentropy: sum p = 1) and from the cross terms, via dlo, to first order (ell ~ lpk where p >> eps) */
    double delta_lo = delta_d - (double)delta;
    double ng_d = ((double)sl + (double)sul) / (double)K - delta_lo;
    c->dlo[h] += delta_lo;
    double pref = 0.0;
    if (P > 0) {   /* prefix mass = sum_j<P e^s_j / (e^lse_patch + sum_j<P e^s_j), in double, shifted by the max */
        double lse_p = (double)m + c->logk + delta_d;            /* log sum_patches e^s = m + log(K + S) */
        double *pe = c->pesum + (size_t)h * P;                  /* each prefix token's share, summed over queries */
        if (P == 1) {                                            /* sigmoid(s_0 - lse_p), one exp */
            double z = (double)(r[0] > floor ? r[0] : floor) - lse_p, e = exp(-fabs(z));
            pref = z >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
            pe[0] += pref;
        } else {
            double mx = lse_p, ep, ej[64];
            for (int j = 0; j < P; j++) { double s = r[j] > floor ? r[j] : floor; mx = s > mx ? s : mx; }
            for (int j = 0; j < P; j++) {
                double e = exp((double)(r[j] > floor ? r[j] : floor) - mx);
                if (j < 64) ej[j] = e;
                pref += e;
            }
            ep = exp(lse_p - mx);
            for (int j = 0; j < P; j++)
                pe[j] += (j < 64 ? ej[j] : exp((double)(r[j] > floor ? r[j] : floor) - mx)) / (pref + ep);
            pref = pref / (pref + ep);
        }
    }
    float e1 = fabsf(su * inv_k);
    c->err = e1 > c->err ? e1 : c->err;
    c->dsum[h] += c->renormalize ? (double)dd : (double)dd * (1.0 - pref);
    c->nsum[h] += ng_d;
    c->esum[h] += c->logk - ng_d;
    c->psum[h] += pref;
    double *restrict ch = ALIGNED(c->colw + (size_t)h * Kp);
    #pragma omp simd simdlen(VW) aligned(ch, ph : 64)
    for (int j = 0; j < Kp; j++) ch[j] += (double)ph[j];
}

/* float vector accumulators -> double (every QB queries, so float sums stay short) */
static void flush_pairs(Ctx *c) {
    const int HH = c->H * c->H;
    for (int t = 0; t < HH; t++) {
        acc_double(c->crossv + 2 * t, c->crossf[t]);
        acc_double(c->jsv + 2 * t, c->jsf[t]);
    }
    memset(c->crossf, 0, sizeof(vf) * HH);
    memset(c->jsf, 0, sizeof(vf) * HH);
    c->pending = 0;
}

/* cross terms and Jensen-Shannon of one query, all heads' rows in c, into float vector accumulators (lane-wise
   sums over QB queries, then double; reduced across lanes once per image) */
static void query_pairs(Ctx *c) {
    const int H = c->H, Kp = c->Kp;
    for (int h = 0; h < H; h++) {               /* 4 heads g at a time: 4 independent sums (one sum per (h, g) would
                                                   be a chain of dependent FMAs, latency-bound: 20% of this function) */
        const float *ph = c->p + (size_t)h * Kp;
        vf *acc = c->crossf + (size_t)h * H;
        int g = 0;
        for (; g + 4 <= H; g += 4) {
            const float *e0 = c->ell + (size_t)g * Kp, *e1 = e0 + Kp, *e2 = e1 + Kp, *e3 = e2 + Kp;
            vf a0 = acc[g], a1 = acc[g + 1], a2 = acc[g + 2], a3 = acc[g + 3];
            for (int j = 0; j < Kp; j += VW) {
                vf pv = vload(ph + j);
                a0 += pv * vload(e0 + j); a1 += pv * vload(e1 + j); a2 += pv * vload(e2 + j); a3 += pv * vload(e3 + j);
            }
            acc[g] = a0; acc[g + 1] = a1; acc[g + 2] = a2; acc[g + 3] = a3;
        }
        for (; g < H; g++) {
            const float *eg = c->ell + (size_t)g * Kp;
            vf a0 = acc[g], a1 = (vf){};
            int j = 0;
            for (; j + 2 * VW <= Kp; j += 2 * VW) {
                a0 += vload(ph + j) * vload(eg + j); a1 += vload(ph + j + VW) * vload(eg + j + VW);
            }
            for (; j < Kp; j += VW) a0 += vload(ph + j) * vload(eg + j);
            acc[g] = a0 + a1;
        }
    }
    if (!c->do_js) return;
    vf tab[(JS_DEG + 1) * JS_NV];
    for (int d = 0; d <= JS_DEG; d++)
        for (int v = 0; v < JS_NV; v++) tab[d * JS_NV + v] = vload(JS_TAB[d] + v * VW);
    const vi absmask = (vi){} + 0x7fffffff;
    for (int h = 0; h < H - 1; h++) {
        const float *restrict ph = ALIGNED(c->p + (size_t)h * Kp), *restrict lh = ALIGNED(c->lpk + (size_t)h * Kp);
        for (int g = h + 1; g < H; g++) {
            const float *restrict pg = ALIGNED(c->p + (size_t)g * Kp), *restrict lg = ALIGNED(c->lpk + (size_t)g * Kp);
            vf acc = c->jsf[h * H + g];
            for (int j = 0; j < Kp; j += VW) {     /* x = |log K p_h - log K p_g| / 2 */
                vf x = (vf)((vi)(vload(lh + j) - vload(lg + j)) & absmask) * 0.5f;
                acc += (vload(ph + j) + vload(pg + j)) * js_g_vec(x, tab);
            }
            c->jsf[h * H + g] = acc;
        }
    }
}

static void query_done(Ctx *c) {
    query_pairs(c);
    if (++c->pending == QB) flush_pairs(c);
}

/* The calling thread's work buffer (a few hundred KB), grown when needed and kept for the thread's next image. */
static __thread char *tl_buf;
static __thread size_t tl_cap;

static char *work_buffer(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes > tl_cap) {
        char *mem = aligned_alloc(64, bytes);
        if (!mem) return NULL;
        free(tl_buf);
        tl_buf = mem;
        tl_cap = bytes;
    }
    return tl_buf;
}

static int ctx_init(Ctx *c, int H, int N, int P, int extra_floats, float eps, int renormalize, int do_js,
                    double *dsum, double *esum, double *nsum, double *psum, double *pesum, double *cross,
                    double *js, double *colsum) {
    c->H = H; c->N = N; c->P = P; c->K = N - P; c->Kp = (c->K + VW - 1) / VW * VW;
    c->renormalize = renormalize; c->do_js = do_js;
    c->eps = eps; c->lke = logf((float)c->K * eps); c->keps = expf(c->lke); c->inv_k = 1.0f / (float)c->K; c->logk = log((double)c->K);
    size_t hk = (size_t)H * c->Kp, nvd = (size_t)2 * H * H;
    size_t hd = (size_t)(H + 15) / 16 * 16;                 /* dlo, padded to keep what follows aligned */
    size_t zeroed = sizeof(vd) * 2 * nvd + sizeof(vf) * 2 * H * H + sizeof(double) * (hk + hd);
    size_t bytes = zeroed + sizeof(float) * (3 * hk + 3 * c->Kp + VW + extra_floats);
    char *mem = work_buffer(bytes);
    if (!mem) return 0;
    memset(mem, 0, zeroed);
    c->crossv = (vd *)mem; c->jsv = c->crossv + nvd;
    c->crossf = (vf *)(c->jsv + nvd); c->jsf = c->crossf + H * H; c->pending = 0;
    c->colw = (double *)(c->jsf + H * H);
    c->dlo = c->colw + hk;
    float *f = (float *)(c->dlo + hd);
    c->lpk = f; c->p = f + hk; c->ell = f + 2 * hk; c->kp = f + 3 * hk;
    c->valid = c->kp + c->Kp;
    for (int j = 0; j < c->Kp; j++) c->valid[j] = j < c->K ? 1.0f : 0.0f;
    c->row = c->valid + c->Kp;
    c->dsum = dsum; c->esum = esum; c->nsum = nsum; c->psum = psum; c->pesum = pesum; c->cross = cross; c->js = js;
    c->colsum = colsum; c->err = 0.0f; c->bad = 0;
    for (int h = 0; h < H; h++) { dsum[h] = esum[h] = nsum[h] = psum[h] = 0.0; }
    memset(pesum, 0, sizeof(double) * (size_t)H * P);
    return 1;
}

static float *ctx_extra(Ctx *c) { return c->row + c->Kp + VW; }

static void ctx_done(Ctx *c, float *rowerr, int *bad) {
    const int H = c->H, K = c->K, Kp = c->Kp;
    flush_pairs(c);
    for (int h = 0; h < H; h++)
        for (int g = 0; g < H; g++) {
            c->cross[h * H + g] = hsum_d(c->crossv + 2 * (h * H + g)) - c->dlo[g];
            c->js[h * H + g] = h < g ? 0.5 * hsum_d(c->jsv + 2 * (h * H + g))
                             : h > g ? 0.5 * hsum_d(c->jsv + 2 * (g * H + h)) : 0.0;
        }
    for (int h = 0; h < H; h++) memcpy(c->colsum + (size_t)h * K, c->colw + (size_t)h * Kp, sizeof(double) * K);
    *rowerr = c->err;
    *bad = c->bad;
}

/* K rounded up to the kernel's vector width: the distance rows passed in must have this many columns */
int padded_keys(int K) { return (K + VW - 1) / VW * VW; }

/* From logits: one image, logits (H, nq, N), dist (nq, Kp) zero padded. Returns 0 if out of memory. */
int image_stats(const float *logits, const float *dist, int H, int nq, int N, int P, float eps,
                int renormalize, int do_js, double *dsum, double *esum, double *nsum, double *psum,
                double *pesum, double *cross, double *js, double *colsum, float *rowerr, int *bad) {
    Ctx c;
    if (!ctx_init(&c, H, N, P, 0, eps, renormalize, do_js, dsum, esum, nsum, psum, pesum, cross, js, colsum))
        return 0;
    for (int i = 0; i < nq; i++) {
        for (int h = 0; h < H; h++) row_stats(&c, h, logits + ((size_t)h * nq + i) * N, dist + (size_t)i * c.Kp);
        query_done(&c);
    }
    ctx_done(&c, rowerr, bad);
    return 1;
}

/* From q and k: one image; q[h * qh + i * qi + d] and k[h * kh + j * kj + d] (H heads, N tokens, D dims);
   optional additive float mask[h * mh + i * mi + j] (mh = 0 broadcasts over heads); the N - P patch queries;
   dist (N - P, Kp) zero padded. The logits s = scale q.k + mask are formed here, QB queries x all keys at a time,
   and never leave the cache. Returns 0 if out of memory. */
static int image_stats_qk(const float *q, long qh, long qi, const float *k, long kh, long kj, const float *mask,
                          long mh, long mi, float scale, int D, const float *dist, int H, int N, int P, float eps,
                          int renormalize, int do_js, double *dsum, double *esum, double *nsum, double *psum,
                          double *pesum, double *cross, double *js, double *colsum, float *rowerr, int *bad) {
    Ctx c;
    const int Np = (N + VW - 1) / VW * VW;
    if (!ctx_init(&c, H, N, P, H * D * Np + H * QB * Np, eps, renormalize, do_js, dsum, esum, nsum, psum, pesum,
                  cross, js, colsum))
        return 0;
    float *kt = ctx_extra(&c);                           /* H x D x Np: k transposed, zero padded */
    float *S = kt + (size_t)H * D * Np;                  /* H x QB x Np: logits of this query block */
    for (int h = 0; h < H; h++)                           /* in blocks of VW keys: each key's D floats are read
                                                             contiguously (k rows are far apart in timm's qkv) */
        for (int j0 = 0; j0 < Np; j0 += VW) {
            int d0 = 0;
#ifdef HAVE_TRANSPOSE16
            for (; d0 + 16 <= D; d0 += 16) {
                vf r[16];
                for (int i = 0; i < 16; i++)
                    r[i] = j0 + i < N ? vload(k + h * kh + (j0 + i) * kj + d0) : (vf){};
                transpose16(r);
                for (int t = 0; t < 16; t++) vstore(kt + ((size_t)h * D + d0 + t) * Np + j0, r[t]);
            }
#endif
            for (int d = d0; d < D; d++) {
                float *row = kt + ((size_t)h * D + d) * Np + j0;
                for (int j = 0; j < VW; j++) row[j] = j0 + j < N ? k[h * kh + (j0 + j) * kj + d] : 0.0f;
            }
        }
    for (int i0 = P; i0 < N; i0 += QB) {
        int nr = N - i0 < QB ? N - i0 : QB;
        for (int h = 0; h < H; h++) {
            float *Sh = S + (size_t)h * QB * Np;
            qk_rows(q + h * qh + i0 * qi, qi, D, kt + (size_t)h * D * Np, Np, nr, scale, Sh);
            if (mask)
                for (int r = 0; r < nr; r++) {
                    const float *mr = mask + h * mh + (i0 + r) * mi;
                    float *sr = Sh + (size_t)r * Np;
                    for (int j = 0; j < N; j++) sr[j] += mr[j];
                }
        }
        for (int r = 0; r < nr; r++) {
            for (int h = 0; h < H; h++)
                row_stats(&c, h, S + ((size_t)h * QB + r) * Np, dist + (size_t)(i0 + r - P) * c.Kp);
            query_done(&c);
        }
    }
    ctx_done(&c, rowerr, bad);
    return 1;
}

/* 1 if this build runs the batch entries below on an OpenMP team, 0 if they run serially (the caller then splits
   the work over its own threads) */
int has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* image_stats_qk for the image sets t0 <= t < t1 of a batch, set t = images t, t + nsets, ... < b; the sets on an
   OpenMP team of t1 - t0 threads, one set each. The team is the process's OpenMP runtime: torch's own where torch
   uses GNU OpenMP (its libgomp.so.1 is the one loaded), so the threads that spin-wait after each of torch's parallel
   regions take this work at once; threads of our own competed with them for the cores (2-10% of the whole probe's
   time on 2 cores). One call per batch: a ctypes call per image cost ~70 us of Python and GIL time. Strides in floats;
   mb = 0 and db = 0 broadcast the mask and the distances. Outputs are contiguous per image: (b, H) sums,
   (b, H, P) prefix shares, (b, H, H) cross and js, (b, H, N - P) column sums, (b) row-sum errors and flags. Returns 0 if an image ran out
   of memory. */
int batch_stats_qk(int t0, int t1, int nsets, int b, const float *q, long qb, long qh, long qi, const float *k,
                   long kb, long kh, long kj, const float *mask, long mb, long mh, long mi, float scale, int D,
                   const float *dist, long db, int H, int N, int P, float eps, int renormalize, int do_js,
                   double *dsum, double *esum, double *nsum, double *psum, double *pesum, double *cross,
                   double *js, double *colsum, float *rowerr, int *bad) {
    const long K = N - P, HH = (long)H * H;
    int ok = 1;
    #pragma omp parallel for num_threads(t1 - t0) schedule(static, 1) reduction(&:ok)
    for (int t = t0; t < t1; t++)
        for (int i = t; i < b; i += nsets)
            ok &= image_stats_qk(q + i * qb, qh, qi, k + i * kb, kh, kj, mask ? mask + i * mb : NULL, mh, mi, scale,
                                 D, dist + i * db, H, N, P, eps, renormalize, do_js, dsum + (long)i * H,
                                 esum + (long)i * H, nsum + (long)i * H, psum + (long)i * H,
                                 pesum + (long)i * H * P, cross + i * HH,
                                 js + i * HH, colsum + (long)i * H * K, rowerr + i, bad + i);
    return ok;
}

/* ---- CKA: the float64 Gram of float32 features centred over the batch (`mimlab.probe.api.feature_gram`) ----
   For columns [c0, c1) of x (n rows, row stride ld floats, columns contiguous): mu_c = column mean over the rows
   (float32), xc = x - mu (float32, the value torch computes), and g[a][b] += sum_c xc[a][c] xc[b][c] in double
   for the 4 x 4 tiles of rows with a <= b (the upper triangle and diagonal tiles; the caller mirrors it);
   *musq = sum_c mu_c^2 in double. The columns go W at a time: centred into a double scratch of n (rounded up
   to 4) x W (GRAM_L1 bytes: it stays in L1), then multiplied in 4 x 4 row tiles held in 16 vector registers;
   each tile's vector sums are kept across chunks and reduced across lanes once, at the end. torch instead writes
   a float32 and a float64 copy of all features and multiplies from memory (~3x slower). Returns 0 if out of
   memory. */
#define GRAM_L1 16384
static int gram_columns(const float *x, int n, long ld, long c0, long c1, double *g, double *musq) {
    const int np = (n + 3) / 4 * 4, nt = np / 4 * (np / 4 + 1) / 2;      /* row tiles a <= b */
    long W = GRAM_L1 / (8 * (long)np) / 8 * 8;
    W = W < 64 ? 64 : W;
    size_t bytes = sizeof(vd) * 16 * (size_t)nt + sizeof(double) * (size_t)np * W + sizeof(float) * W;
    vd *tacc = (vd *)work_buffer(bytes);
    if (!tacc) return 0;
    double *buf = (double *)(tacc + 16 * (size_t)nt);
    float *mu = (float *)(buf + (size_t)np * W);
    memset(tacc, 0, sizeof(vd) * 16 * (size_t)nt);
    memset(buf + (size_t)n * W, 0, sizeof(double) * (size_t)(np - n) * W);      /* padding rows: 0 */
    double ms = 0.0;
    const float fn = (float)n;
    for (long cb = c0; cb < c1; cb += W) {
        const long w = c1 - cb < W ? c1 - cb : W, wp = (w + 7) / 8 * 8;
        memset(mu, 0, sizeof(float) * W);
        for (int r = 0; r < n; r++) {
            const float *xr = x + r * ld + cb;
            #pragma omp simd
            for (long c = 0; c < w; c++) mu[c] += xr[c];
        }
        for (long c = 0; c < w; c++) { mu[c] /= fn; ms += (double)mu[c] * (double)mu[c]; }
        for (int r = 0; r < n; r++) {
            const float *xr = x + r * ld + cb;
            double *br = buf + (size_t)r * W;
            #pragma omp simd
            for (long c = 0; c < w; c++) br[c] = (double)(xr[c] - mu[c]);
            for (long c = w; c < wp; c++) br[c] = 0.0;
        }
        vd *ta = tacc;
        for (int a = 0; a < np; a += 4)
            for (int b = a; b < np; b += 4, ta += 16) {
                vd acc[4][4];                 /* (constant indices after unrolling: kept in registers) */
                #pragma GCC unroll 4
                for (int i = 0; i < 4; i++)
                    #pragma GCC unroll 4
                    for (int j = 0; j < 4; j++) acc[i][j] = ta[4 * i + j];
                const double *A = ALIGNED(buf + (size_t)a * W), *B = ALIGNED(buf + (size_t)b * W);
                for (long c = 0; c < wp; c += VW / 2) {
                    vd av[4], bv[4];
                    #pragma GCC unroll 4
                    for (int i = 0; i < 4; i++) {
                        av[i] = *(const vd *)(A + i * W + c);
                        bv[i] = *(const vd *)(B + i * W + c);
                    }
                    #pragma GCC unroll 4
                    for (int i = 0; i < 4; i++)
                        #pragma GCC unroll 4
                        for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
                }
                #pragma GCC unroll 4
                for (int i = 0; i < 4; i++)
                    #pragma GCC unroll 4
                    for (int j = 0; j < 4; j++) ta[4 * i + j] = acc[i][j];
            }
    }
    vd *ta = tacc;
    for (int a = 0; a < np; a += 4)
        for (int b = a; b < np; b += 4, ta += 16)
            for (int i = 0; i < 4 && a + i < n; i++)
                for (int j = 0; j < 4 && b + j < n; j++) {
                    double s = 0.0;
                    for (int t = 0; t < VW / 2; t++) s += ta[4 * i + j][t];
                    g[(size_t)(a + i) * n + b + j] += s;
                }
    *musq = ms;
    return 1;
}

/* gram_columns for the sets t0 <= t < t1 of the nparts parts of the d columns, set t = parts t, t + nsets, ...
   (part p: columns [d p / nparts, d (p + 1) / nparts)), the sets on an OpenMP team as in batch_stats_qk; each part
   into its own zeroed n x n slice of g and its own musq[p]: the caller adds the parts in order, so the result does
   not depend on the number of threads. Returns 0 if out of memory. */
int gram_parts(int t0, int t1, int nsets, int nparts, const float *x, int n, long ld, long d, double *g,
               double *musq) {
    int ok = 1;
    #pragma omp parallel for num_threads(t1 - t0) schedule(static, 1) reduction(&:ok)
    for (int t = t0; t < t1; t++)
        for (int p = t; p < nparts; p += nsets) {
            double *gp = g + (size_t)p * n * n;
            memset(gp, 0, sizeof(double) * (size_t)n * n);
            ok &= gram_columns(x, n, ld, d * p / nparts, d * (p + 1) / nparts, gp, musq + p);
        }
    return ok;
}
