/* The kernel estimate in one pass over the bank (safe_denoiser.core.fused wraps this; docs/performance.md).

   For each query b and bank row n:  logit_bn = <x_b, y_n> + c_b * ||y_n||^2  (x_b already scaled by s_b / v_b,
   c_b = -s_b^2 / (2 v_b)), and the outputs are the online-softmax sums over the rows
       run_max_b = max_n logit_bn,   run_sum_b = sum_n exp(logit_bn - run_max_b),
       acc_b     = sum_n exp(logit_bn - run_max_b) y_n,
   i.e. the flash-attention recurrence taken one row at a time. Each row is read from memory once by the B dot
   products and reused from L1/L2 by the B weighted sums, which two library matmuls per chunk cannot do (the second
   re-reads the chunk from the last-level cache). Rows are split into contiguous ranges, one per thread, and the
   partial sums are merged with the same rescaling. float16 / bfloat16 banks are widened a row at a time into a
   float32 row buffer; all arithmetic is float32.

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

typedef struct {
    const float *x;         /* (B, D) scaled queries */
    const void *bank;       /* (N, D) rows in `dtype` */
    const float *bias_coef; /* (B,) c_b */
    const float *norms;     /* (N,) ||y_n||^2 */
    long B, D, begin, end;  /* this task's rows: [begin, end) */
    int dtype;
    float *acc, *run_max, *run_sum; /* (B, D), (B,), (B,) */
    float *row;                     /* (D,) widening buffer, NULL for float32 banks */
} Task;

SD_CLONES float dot(const float *restrict a, const float *restrict b, long d) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < d; ++i) s += a[i] * b[i];
    return s;
}

SD_CLONES void scale(float *restrict a, float r, long d) {
#pragma omp simd
    for (long i = 0; i < d; ++i) a[i] *= r;
}

SD_CLONES void axpy(float *restrict a, float w, const float *restrict y, long d) {
#pragma omp simd
    for (long i = 0; i < d; ++i) a[i] += w * y[i];
}

SD_CLONES void widen_float16(float *restrict out, const _Float16 *restrict in, long d) {
#pragma omp simd
    for (long i = 0; i < d; ++i) out[i] = (float)in[i];
}

SD_CLONES void widen_bfloat16(float *restrict out, const uint16_t *restrict in, long d) {
    uint32_t *restrict bits = (uint32_t *)out; /* bfloat16 is the top half of a float32 */
#pragma omp simd
    for (long i = 0; i < d; ++i) bits[i] = (uint32_t)in[i] << 16;
}

static const float *bank_row(const Task *t, long n) {
    if (t->dtype == BANK_FLOAT32) return (const float *)t->bank + n * t->D;
    if (t->dtype == BANK_FLOAT16)
        widen_float16(t->row, (const _Float16 *)t->bank + n * t->D, t->D);
    else
        widen_bfloat16(t->row, (const uint16_t *)t->bank + n * t->D, t->D);
    return t->row;
}

static void *run_rows(void *arg) {
    Task *t = (Task *)arg;
    const long D = t->D;
    for (long b = 0; b < t->B; ++b) {
        t->run_max[b] = -INFINITY;
        t->run_sum[b] = 0.0f;
    }
    memset(t->acc, 0, sizeof(float) * (size_t)(t->B * D));
    for (long n = t->begin; n < t->end; ++n) {
        const float *y = bank_row(t, n);
        for (long b = 0; b < t->B; ++b) {
            float *acc = t->acc + b * D;
            const float logit = dot(t->x + b * D, y, D) + t->bias_coef[b] * t->norms[n];
            if (logit > t->run_max[b]) { /* the running maximum moves: rescale what was summed so far */
                const float r = expf(t->run_max[b] - logit);
                if (t->run_sum[b] > 0.0f) scale(acc, r, D);
                t->run_sum[b] *= r;
                t->run_max[b] = logit;
            }
            const float w = expf(logit - t->run_max[b]);
            if (w == 0.0f) continue; /* underflowed (the usual case at SD size): it would add exact zeros */
            t->run_sum[b] += w;
            axpy(acc, w, y, D);
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
        if (dtype != BANK_FLOAT32 && (t->row = malloc(sizeof(float) * (size_t)D)) == NULL) ok = 0;
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

static PyMethodDef methods[] = {
    {"kernel_sums", kernel_sums, METH_VARARGS,
     "kernel_sums(x, B, bank, dtype, N, D, bias_coef, norms, acc, run_max, run_sum, threads): the one-pass online-"
     "softmax sums over a bank, on raw float32 pointers (safe_denoiser.core.fused checks them)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused_kernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused_kernel(void) { return PyModule_Create(&module); }
