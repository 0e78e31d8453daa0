/* The kernel estimate in one pass over the bank (safe_denoiser.core.fused wraps this; docs/performance.md).

   For each query b and bank row n:  logit_bn = <x_b, y_n> + c_b * ||y_n||^2  (x_b already scaled by s_b / v_b,
   c_b = -s_b^2 / (2 v_b)), and the outputs are the online-softmax sums over the rows
       run_max_b = max_n logit_bn,   run_sum_b = sum_n exp(logit_bn - run_max_b),
       acc_b     = sum_n exp(logit_bn - run_max_b) y_n,
   i.e. the flash-attention recurrence taken a block of four rows at a time. Each row is read from memory once by
   the B dot products and reused from L2 by the B weighted sums, which two library matmuls per chunk cannot do (the
   second re-reads the chunk from the last-level cache); a block shares one sweep over each query for its dot
   products and one sweep over each accumulator for its sums. Rows are split into contiguous ranges, one per
   thread, and the partial sums are merged with the same rescaling. float16 / bfloat16 banks are widened a block at
   a time into a float32 buffer; all arithmetic is float32.

   x86-64 builds carry AVX-512, AVX2+FMA and baseline clones of the hot loops, chosen at load time by the CPU
   (GCC/Clang target_clones), so one build is portable. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define SD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef SD_CLONES
#define SD_CLONES
#endif

enum { BANK_FLOAT32 = 0, BANK_FLOAT16 = 1, BANK_BFLOAT16 = 2 };
enum { BLOCK_ROWS = 4 }; /* rows per block: 4 x 64 KiB at SD size, well inside a 1 MiB L2 */

typedef struct {
    const float *x;         /* (B, D) scaled queries */
    const void *bank;       /* (N, D) rows in `dtype` */
    const float *bias_coef; /* (B,) c_b */
    const float *norms;     /* (N,) ||y_n||^2 */
    long B, D, begin, end;  /* this task's rows: [begin, end) */
    int dtype;
    float *acc, *run_max, *run_sum; /* (B, D), (B,), (B,) */
    float *row;                     /* (BLOCK_ROWS, D) widening buffer, NULL for float32 banks */
} Task;

SD_CLONES void scale(float *restrict a, float r, long d) {
#pragma omp simd
    for (long i = 0; i < d; ++i) a[i] *= r;
}

SD_CLONES void axpy(float *restrict a, float w, const float *restrict y, long d) {
#pragma omp simd
    for (long i = 0; i < d; ++i) a[i] += w * y[i];
}

/* IEEE half to float, bit by bit (any compiler, any CPU): normal, subnormal, zero, inf and nan (quieted, as F16C
   and PyTorch do). */
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u); /* NaNs come out quiet */
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13); /* rebias 15 -> 127 */
    } else {
        const float magnitude = (float)mantissa * 0x1p-24f; /* subnormal (or zero): mantissa * 2^-24, exact */
        memcpy(&bits, &magnitude, sizeof bits);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

static void widen_float16_portable(float *restrict out, const uint16_t *restrict in, long d) {
    for (long i = 0; i < d; ++i) out[i] = half_to_float(in[i]);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* F16C converts eight halves per instruction (every x86-64-v3 CPU has it) */
__attribute__((target("avx,f16c"))) static void widen_float16_f16c(float *restrict out, const uint16_t *restrict in,
                                                                   long d) {
    long i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
    for (; i < d; ++i) out[i] = half_to_float(in[i]);
}
static int has_f16c(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
}
#else
static void widen_float16_f16c(float *restrict out, const uint16_t *restrict in, long d) {
    widen_float16_portable(out, in, d);
}
static int has_f16c(void) { return 0; }
#endif

static void widen_float16(float *restrict out, const uint16_t *restrict in, long d) {
    static int f16c = -1; /* benign race: every thread computes the same value */
    if (f16c < 0) f16c = has_f16c();
    if (f16c)
        widen_float16_f16c(out, in, d);
    else
        widen_float16_portable(out, in, d);
}

/* The dot products of x with a block of four rows in one sweep over x (four independent sums). */
SD_CLONES void dot4(const float *restrict x, const float *restrict y0, const float *restrict y1,
                    const float *restrict y2, const float *restrict y3, long d, float *restrict out) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (long i = 0; i < d; ++i) {
        const float xi = x[i];
        s0 += xi * y0[i];
        s1 += xi * y1[i];
        s2 += xi * y2[i];
        s3 += xi * y3[i];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* a += w0 y0 + w1 y1 + w2 y2 + w3 y3: one sweep over the accumulator for a block of four rows. */
SD_CLONES void axpy4(float *restrict a, const float *restrict w, const float *restrict y0, const float *restrict y1,
                     const float *restrict y2, const float *restrict y3, long d) {
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
#pragma omp simd
    for (long i = 0; i < d; ++i) a[i] += (w0 * y0[i] + w1 * y1[i]) + (w2 * y2[i] + w3 * y3[i]);
}

SD_CLONES void widen_bfloat16(float *restrict out, const uint16_t *restrict in, long d) {
    uint32_t *restrict bits = (uint32_t *)out; /* bfloat16 is the top half of a float32 */
#pragma omp simd
    for (long i = 0; i < d; ++i) bits[i] = (uint32_t)in[i] << 16;
}

/* Pointers to the block's rows from n on (k of them, k <= BLOCK_ROWS), widened into the task's buffer for half
   banks; the unused slots repeat the first row (their logits are set to -inf, so they add exact zeros). */
static void block_rows(const Task *t, long n, long k, const float **rows) {
    for (long r = 0; r < BLOCK_ROWS; ++r) {
        const long offset = (n + r) * t->D;
        if (r >= k) {
            rows[r] = rows[0];
        } else if (t->dtype == BANK_FLOAT32) {
            rows[r] = (const float *)t->bank + offset;
        } else {
            float *out = t->row + r * t->D;
            if (t->dtype == BANK_FLOAT16)
                widen_float16(out, (const uint16_t *)t->bank + offset, t->D);
            else
                widen_bfloat16(out, (const uint16_t *)t->bank + offset, t->D);
            rows[r] = out;
        }
    }
}

/* The recurrence over this task's rows, a block of BLOCK_ROWS rows at a time: the block's rows stay in L2 while
   each query's dot products (one sweep over x) and weighted sum (one sweep over its accumulator) use them. */
static void *run_rows(void *arg) {
    Task *t = (Task *)arg;
    const long D = t->D;
    const float *rows[BLOCK_ROWS];
    float logit[BLOCK_ROWS], w[BLOCK_ROWS];
    for (long b = 0; b < t->B; ++b) {
        t->run_max[b] = -INFINITY;
        t->run_sum[b] = 0.0f;
    }
    memset(t->acc, 0, sizeof(float) * (size_t)(t->B * D));
    for (long n = t->begin; n < t->end; n += BLOCK_ROWS) {
        const long k = t->end - n < BLOCK_ROWS ? t->end - n : BLOCK_ROWS;
        block_rows(t, n, k, rows);
        for (long b = 0; b < t->B; ++b) {
            float *acc = t->acc + b * D;
            dot4(t->x + b * D, rows[0], rows[1], rows[2], rows[3], D, logit);
            float block_max = -INFINITY;
            for (long r = 0; r < BLOCK_ROWS; ++r) {
                logit[r] = r < k ? logit[r] + t->bias_coef[b] * t->norms[n + r] : -INFINITY;
                block_max = fmaxf(block_max, logit[r]);
            }
            if (block_max > t->run_max[b]) { /* the running maximum moves: rescale what was summed so far */
                const float r = expf(t->run_max[b] - block_max);
                if (t->run_sum[b] > 0.0f) scale(acc, r, D);
                t->run_sum[b] *= r;
                t->run_max[b] = block_max;
            }
            int nonzero = 0;
            long last = 0;
            for (long r = 0; r < BLOCK_ROWS; ++r) {
                w[r] = expf(logit[r] - t->run_max[b]); /* 0 where it underflows: the usual case at SD size */
                t->run_sum[b] += w[r];
                if (w[r] != 0.0f) ++nonzero, last = r;
            }
            if (nonzero == 1)
                axpy(acc, w[last], rows[last], D);
            else if (nonzero > 1)
                axpy4(acc, w, rows[0], rows[1], rows[2], rows[3], D);
        }
    }
    return NULL;
}

/* Fold task `src`'s partial sums into `dst` (same recurrence as a new row, with a whole range's sums). */
static void merge(Task *dst, const Task *src) {
    for (long b = 0; b < dst->B; ++b) {
        if (src->run_sum[b] == 0.0f && src->run_max[b] == -INFINITY) continue;
        const float m = fmaxf(dst->run_max[b], src->run_max[b]);
        const float rd = expf(dst->run_max[b] - m), rs = expf(src->run_max[b] - m);
        float *a = dst->acc + b * dst->D;
        if (rd != 1.0f) scale(a, rd, dst->D);
        axpy(a, rs, src->acc + b * dst->D, dst->D);
        dst->run_sum[b] = dst->run_sum[b] * rd + src->run_sum[b] * rs;
        dst->run_max[b] = m;
    }
}

static void free_tasks(Task *tasks, int threads) {
    for (int i = 0; i < threads; ++i) {
        if (i > 0) free(tasks[i].acc); /* task 0 writes into the caller's buffers */
        free(tasks[i].row);
    }
    free(tasks);
}

static PyObject *kernel_sums(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, bank, bias_coef, norms, acc, run_max, run_sum;
    long B, N, D;
    int dtype, threads;
    if (!PyArg_ParseTuple(args, "KlKilKKKKKKi", &x, &B, &bank, &dtype, &N, &D, &bias_coef, &norms, &acc, &run_max,
                          &run_sum, &threads))
        return NULL;
    if (B <= 0 || N <= 0 || D <= 0 || dtype < BANK_FLOAT32 || dtype > BANK_BFLOAT16) {
        PyErr_SetString(PyExc_ValueError, "kernel_sums: B, N and D must be positive and dtype one of 0, 1, 2");
        return NULL;
    }
    if (threads < 1) threads = 1;
    if (threads > N) threads = (int)N;
    Task *tasks = calloc((size_t)threads, sizeof(Task));
    if (tasks == NULL) return PyErr_NoMemory();
    int ok = 1;
    for (int i = 0; i < threads; ++i) {
        Task *t = &tasks[i];
        t->x = (const float *)(uintptr_t)x;
        t->bank = (const void *)(uintptr_t)bank;
        t->bias_coef = (const float *)(uintptr_t)bias_coef;
        t->norms = (const float *)(uintptr_t)norms;
        t->B = B, t->D = D, t->dtype = dtype;
        t->begin = N * i / threads, t->end = N * (i + 1) / threads;
        /* each thread's own (B,) maxima and sums live at the end of its accumulator allocation */
        if (i == 0) {
            t->acc = (float *)(uintptr_t)acc;
            t->run_max = (float *)(uintptr_t)run_max;
            t->run_sum = (float *)(uintptr_t)run_sum;
        } else {
            t->acc = malloc(sizeof(float) * (size_t)(B * D + 2 * B));
            if (t->acc == NULL) ok = 0;
            else t->run_max = t->acc + B * D, t->run_sum = t->acc + B * D + B;
        }
        if (dtype != BANK_FLOAT32 && (t->row = malloc(sizeof(float) * (size_t)(BLOCK_ROWS * D))) == NULL) ok = 0;
    }
    if (!ok) {
        free_tasks(tasks, threads);
        return PyErr_NoMemory();
    }
    pthread_t *ids = calloc((size_t)threads, sizeof(pthread_t));
    int *started = calloc((size_t)threads, sizeof(int));
    if (ids == NULL || started == NULL) {
        free(ids), free(started), free_tasks(tasks, threads);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS;
    for (int i = 1; i < threads; ++i) started[i] = pthread_create(&ids[i], NULL, run_rows, &tasks[i]) == 0;
    run_rows(&tasks[0]);
    for (int i = 1; i < threads; ++i) {
        if (!started[i]) run_rows(&tasks[i]); /* no thread to spare: run its range here */
        else pthread_join(ids[i], NULL);
        merge(&tasks[0], &tasks[i]);
    }
    Py_END_ALLOW_THREADS;
    free(ids), free(started), free_tasks(tasks, threads);
    Py_RETURN_NONE;
}

/* Tests: widen n halves with the portable converter (portable = 1) or the dispatched one (0). */
static PyObject *widen_float16_py(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long in, out;
    long n;
    int portable;
    if (!PyArg_ParseTuple(args, "KKli", &in, &out, &n, &portable)) return NULL;
    if (portable)
        widen_float16_portable((float *)(uintptr_t)out, (const uint16_t *)(uintptr_t)in, n);
    else
        widen_float16((float *)(uintptr_t)out, (const uint16_t *)(uintptr_t)in, n);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"kernel_sums", kernel_sums, METH_VARARGS,
     "kernel_sums(x, B, bank, dtype, N, D, bias_coef, norms, acc, run_max, run_sum, threads): the one-pass online-"
     "softmax sums over a bank, on raw float32 pointers (safe_denoiser.core.fused checks them)."},
    {"widen_float16", widen_float16_py, METH_VARARGS,
     "widen_float16(in, out, n, portable): n float16 values to float32 (raw pointers; for the tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_fused_kernel", .m_doc = NULL, .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__fused_kernel(void) { return PyModule_Create(&module); }
