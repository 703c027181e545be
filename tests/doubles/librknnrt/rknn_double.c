/*
 * rknn_double.c — a strict test double of Rockchip's librknnrt.so (the RKNN runtime) for the calls a
 * vision tower makes, written for the rksmolvlm tests from the published rknn_api.h facts (see
 * rknn_double_api.h). No vendor file is copied.
 *
 *   cc -shared -fPIC -O1 -Wall -Werror -o librknnrt.so rknn_double.c -lpthread
 *
 * It runs no network. It loads only model blobs in its own format (README.md: a header naming the
 * input and output tensors), refuses what the real runtime would refuse and what the double cannot
 * emulate (an error code and "E rknn-double: <reason>" on stderr, kept for double_last_error), and
 * computes a fixed linear map of the input (or asks a provider set by the test), so results can be
 * checked. With rknn_set_io_mem it reads and writes the caller's memory at rknn_run time.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "rknn_double_api.h"

#define EXPORT __attribute__((visibility("default")))
#define MAX_CONTEXTS 256
#define MAX_MEMS 1024
#define MODEL_HEADER 80
#define HANDLE_BASE 0x5d0b1e0000ull

_Static_assert(sizeof(rknn_input_output_num) == 8, "rknn_input_output_num");
_Static_assert(sizeof(rknn_tensor_attr) == 376, "rknn_tensor_attr");
_Static_assert(offsetof(rknn_tensor_attr, name) == 72 && offsetof(rknn_tensor_attr, fl) == 348, "attr fields");
_Static_assert(offsetof(rknn_tensor_attr, pass_through) == 368 && offsetof(rknn_tensor_attr, h_stride) == 372, "attr");
_Static_assert(sizeof(rknn_sdk_version) == 512, "rknn_sdk_version");
_Static_assert(sizeof(rknn_tensor_mem) == 40 && offsetof(rknn_tensor_mem, priv_data) == 32, "rknn_tensor_mem");
_Static_assert(sizeof(rknn_input) == 32 && offsetof(rknn_input, fmt) == 28, "rknn_input");
_Static_assert(sizeof(rknn_output) == 24 && offsetof(rknn_output, buf) == 8, "rknn_output");
_Static_assert(sizeof(rknn_init_extend) == 136, "rknn_init_extend");
_Static_assert(sizeof(rknn_run_extend) == 24, "rknn_run_extend");

/* int provider(void* userdata, const uint8_t* nhwc, uint32_t n_bytes, float* out, uint32_t n_out) */
typedef int (*output_provider)(void *, const uint8_t *, uint32_t, float *, uint32_t);

typedef struct {
    atomic_int refs;
    uint32_t in_dims[4]; /* N H W C */
    uint32_t in_type, in_fmt, out_dims[3], out_type, w_stride;
    char platform[16];
} model_t;

typedef struct {
    uint64_t handle; /* 0: free slot */
    model_t *model;
    uint32_t core_mask;
    atomic_int busy;
    bool destroyed;
    uint8_t *input;      /* rknn_inputs_set copy (packed NHWC) */
    bool input_set;
    rknn_tensor_mem *in_mem, *out_mem; /* rknn_set_io_mem */
    uint32_t out_mem_type;
    float *result;       /* the last run's output (float32, rounded to the native type) */
    bool ran;            /* a run whose outputs were not fetched yet */
    bool held;           /* outputs handed out by rknn_outputs_get, not released */
    void *handed[1];     /* buffers rknn_outputs_get allocated */
    uint64_t frame;
} ctx_t;

typedef struct {
    rknn_tensor_mem *mem; /* NULL: free */
    uint64_t ctx;
} mem_t;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static ctx_t g_ctx[MAX_CONTEXTS];
static mem_t g_mem[MAX_MEMS];
static uint64_t g_serial;
static char g_last_error[512];
static char *g_log;
static size_t g_log_len, g_log_cap, g_log_count;
static char *g_log_out;
static output_provider g_provider;
static void *g_provider_ud;
static int g_delay_us;
static int g_fail_init;
static int g_compute = 1; /* 0: rknn_run leaves the output as it was (to time the I/O alone) */
static atomic_ullong g_bytes_copied;
static char g_soc[16] = "rk3588";

/* ================================================================================ helpers */

static int refuse(int code, const char *fmt, ...) {
    char msg[sizeof g_last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&g_lock);
    memcpy(g_last_error, msg, sizeof msg);
    pthread_mutex_unlock(&g_lock);
    fprintf(stderr, "E rknn-double: %s\n", msg);
    return code;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* one JSON object per call: {"fn": ..., "ctx": ..., "rc": ..., <extra>} */
static void log_call(const char *fn, uint64_t ctx, int rc, const char *extra_fmt, ...) {
    char extra[256] = "";
    if (extra_fmt) {
        va_list ap;
        va_start(ap, extra_fmt);
        vsnprintf(extra, sizeof extra, extra_fmt, ap);
        va_end(ap);
    }
    char entry[512];
    int n = snprintf(entry, sizeof entry, "%s{\"fn\":\"%s\",\"ctx\":%llu,\"rc\":%d%s%s}", g_log_count ? "," : "", fn,
                     (unsigned long long)ctx, rc, extra[0] ? "," : "", extra);
    pthread_mutex_lock(&g_lock);
    if (g_log_len + (size_t)n + 1 > g_log_cap) {
        g_log_cap = (g_log_cap + (size_t)n + 1) * 2;
        g_log = realloc(g_log, g_log_cap);
    }
    memcpy(g_log + g_log_len, entry, (size_t)n + 1);
    g_log_len += (size_t)n;
    g_log_count++;
    pthread_mutex_unlock(&g_lock);
}

static uint32_t fnv1a(const uint8_t *p, size_t n, uint32_t h) {
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

static size_t type_size(uint32_t t) { return t == RKNN_TENSOR_FLOAT32 ? 4 : t == RKNN_TENSOR_FLOAT16 ? 2 : 1; }

static uint32_t in_elems(const model_t *m) { return m->in_dims[0] * m->in_dims[1] * m->in_dims[2] * m->in_dims[3]; }
static uint32_t in_stride_bytes(const model_t *m) { return m->in_dims[0] * m->in_dims[1] * m->w_stride * m->in_dims[3]; }
static uint32_t out_elems(const model_t *m) { return m->out_dims[0] * m->out_dims[1] * m->out_dims[2]; }

static bool mask_valid(uint32_t mask) {
    if (!strcmp(g_soc, "rk3588"))
        return mask == 0 || mask == 1 || mask == 2 || mask == 4 || mask == 3 || mask == 7 || mask == 0xffff;
    if (!strcmp(g_soc, "rk3576")) return mask == 0 || mask == 1 || mask == 2 || mask == 3 || mask == 0xffff;
    return mask == 0 || mask == 1 || mask == 0xffff;
}

/* parse the double's model format (README.md); NULL and a message on any problem */
static model_t *parse_model(const uint8_t *blob, size_t size, char *why, size_t why_len) {
    if (size < MODEL_HEADER || memcmp(blob, "RKNNDBL1", 8) != 0) {
        snprintf(why, why_len, "not a model the double wrote (no RKNNDBL1 header, %zu bytes)", size);
        return NULL;
    }
    uint32_t payload = rd32(blob + 72);
    if (rd32(blob + 8) != 1 || size != MODEL_HEADER + (size_t)payload) {
        snprintf(why, why_len, "model version %u / size %zu != header 80 + payload %u", rd32(blob + 8), size, payload);
        return NULL;
    }
    uint32_t sum = fnv1a(blob + MODEL_HEADER, payload, fnv1a(blob, 76, 2166136261u));
    if (sum != rd32(blob + 76)) {
        snprintf(why, why_len, "model checksum mismatch (damaged file)");
        return NULL;
    }
    model_t *m = calloc(1, sizeof *m);
    for (int i = 0; i < 4; i++) m->in_dims[i] = rd32(blob + 12 + 4 * i);
    m->in_type = rd32(blob + 28);
    m->in_fmt = rd32(blob + 32);
    for (int i = 0; i < 3; i++) m->out_dims[i] = rd32(blob + 36 + 4 * i);
    m->out_type = rd32(blob + 48);
    m->w_stride = rd32(blob + 52);
    memcpy(m->platform, blob + 56, 15);
    const char *bad = NULL;
    if (m->in_dims[0] != 1 || !m->in_dims[1] || !m->in_dims[2] || m->in_dims[3] != 3) bad = "input dims must be 1,H,W,3";
    else if (m->in_type != RKNN_TENSOR_UINT8 && m->in_type != RKNN_TENSOR_INT8 && m->in_type != RKNN_TENSOR_FLOAT16)
        bad = "input type not emulated";
    else if (m->in_fmt != RKNN_TENSOR_NHWC) bad = "input format must be NHWC";
    else if (m->out_dims[0] != 1 || !m->out_dims[1] || !m->out_dims[2] || m->in_dims[1] % m->out_dims[1])
        bad = "output dims must be 1,T,D with T dividing H";
    else if (m->out_type != RKNN_TENSOR_FLOAT32 && m->out_type != RKNN_TENSOR_FLOAT16) bad = "output type not emulated";
    else if (m->w_stride < m->in_dims[2]) bad = "w_stride < width";
    if (bad) {
        snprintf(why, why_len, "%s", bad);
        free(m);
        return NULL;
    }
    atomic_init(&m->refs, 1);
    return m;
}

static void model_unref(model_t *m) {
    if (m && atomic_fetch_sub(&m->refs, 1) == 1) free(m);
}

/* the context of a handle, marked busy; NULL (and a message) if unknown, destroyed or in use */
static ctx_t *enter(uint64_t handle, const char *fn, int *code) {
    ctx_t *found = NULL;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < MAX_CONTEXTS; i++)
        if (g_ctx[i].handle == handle && handle) found = &g_ctx[i];
    pthread_mutex_unlock(&g_lock);
    if (!found) {
        *code = refuse(RKNN_ERR_CTX_INVALID, "%s: unknown context %llu", fn, (unsigned long long)handle);
        return NULL;
    }
    if (found->destroyed) {
        *code = refuse(RKNN_ERR_CTX_INVALID, "%s: context %llu was destroyed", fn, (unsigned long long)handle);
        return NULL;
    }
    int expected = 0;
    if (!atomic_compare_exchange_strong(&found->busy, &expected, 1)) {
        *code = refuse(RKNN_ERR_FAIL, "%s: another call is running on context %llu (one thread per context)", fn,
                       (unsigned long long)handle);
        return NULL;
    }
    return found;
}

static void leave(ctx_t *c) { atomic_store(&c->busy, 0); }

static ctx_t *new_ctx(model_t *m) {
    pthread_mutex_lock(&g_lock);
    ctx_t *c = NULL;
    for (int i = 0; i < MAX_CONTEXTS && !c; i++)
        if (!g_ctx[i].handle) c = &g_ctx[i];
    if (c) {
        memset(c, 0, sizeof *c);
        c->handle = HANDLE_BASE + ++g_serial;
        c->model = m;
        c->input = calloc(in_elems(m), 1);
        c->result = calloc(out_elems(m), sizeof(float));
    }
    pthread_mutex_unlock(&g_lock);
    return c;
}

static mem_t *find_mem(const rknn_tensor_mem *mem) {
    for (int i = 0; i < MAX_MEMS; i++)
        if (g_mem[i].mem == mem && mem) return &g_mem[i];
    return NULL;
}

static float to_native(const model_t *m, float v) { return m->out_type == RKNN_TENSOR_FLOAT16 ? (float)(_Float16)v : v; }

/* the fixed linear map (README.md): band t of H/T rows, k(d,c) = (7d + 3c) mod 11 - 5 */
static void linear_map(const model_t *m, const uint8_t *x, uint32_t row_pixels, float *out) {
    uint32_t H = m->in_dims[1], W = m->in_dims[2], T = m->out_dims[1], D = m->out_dims[2], rows = H / T;
    for (uint32_t t = 0; t < T; t++) {
        uint64_t s[3] = {0, 0, 0};
        for (uint32_t y = t * rows; y < (t + 1) * rows; y++)
            for (uint32_t xx = 0; xx < W; xx++)
                for (int c = 0; c < 3; c++) s[c] += x[((size_t)y * row_pixels + xx) * 3 + c];
        double scale = (double)rows * W * 255.0;
        for (uint32_t d = 0; d < D; d++) {
            int64_t acc = 0;
            for (int c = 0; c < 3; c++) acc += ((int64_t)((d * 7 + (uint32_t)c * 3) % 11) - 5) * (int64_t)s[c];
            out[(size_t)t * D + d] = (float)((double)acc / scale);
        }
    }
}

/* ================================================================================ the API */

EXPORT int rknn_init(rknn_context *context, void *model, uint32_t size, uint32_t flag, rknn_init_extend *extend) {
    int rc;
    if (!context || !model) {
        rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_init: %s is NULL", context ? "model" : "context");
        log_call("rknn_init", 0, rc, NULL);
        return rc;
    }
    *context = 0;
    if (flag & ~(uint32_t)RKNN_FLAG_KNOWN_MASK) {
        rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_init: unknown flag bits 0x%x", flag & ~(uint32_t)RKNN_FLAG_KNOWN_MASK);
        log_call("rknn_init", 0, rc, NULL);
        return rc;
    }
    if (flag & ~(uint32_t)(RKNN_FLAG_PRIOR_MEDIUM | RKNN_FLAG_PRIOR_LOW | RKNN_FLAG_DISABLE_PROC_HIGH_PRIORITY)) {
        rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_init: flag 0x%x not emulated", flag);
        log_call("rknn_init", 0, rc, NULL);
        return rc;
    }
    if (extend) {
        for (int i = 0; i < 112; i++)
            if (extend->reserved[i]) {
                rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_init: extend->reserved[%d] is not 0", i);
                log_call("rknn_init", 0, rc, NULL);
                return rc;
            }
    }
    if (g_fail_init) {
        rc = refuse(g_fail_init, "rknn_init: failing as told (double_fail_init)");
        log_call("rknn_init", 0, rc, NULL);
        return rc;
    }
    uint8_t *owned = NULL;
    const uint8_t *blob = model;
    size_t n = size;
    if (size == 0) { /* a path to the model file */
        FILE *f = fopen((const char *)model, "rb");
        if (!f) {
            rc = refuse(RKNN_ERR_MODEL_INVALID, "rknn_init: cannot open model file %s", (const char *)model);
            log_call("rknn_init", 0, rc, NULL);
            return rc;
        }
        fseek(f, 0, SEEK_END);
        long len = ftell(f);
        fseek(f, 0, SEEK_SET);
        owned = malloc(len > 0 ? (size_t)len : 1);
        n = fread(owned, 1, len > 0 ? (size_t)len : 0, f);
        fclose(f);
        blob = owned;
    }
    char why[256];
    model_t *m = parse_model(blob, n, why, sizeof why);
    free(owned);
    if (!m) {
        rc = refuse(RKNN_ERR_MODEL_INVALID, "rknn_init: %s", why);
        log_call("rknn_init", 0, rc, NULL);
        return rc;
    }
    if (strcmp(m->platform, g_soc)) {
        rc = refuse(RKNN_ERR_TARGET_PLATFORM_UNMATCH, "rknn_init: model built for %s, this is %s", m->platform, g_soc);
        free(m);
        log_call("rknn_init", 0, rc, NULL);
        return rc;
    }
    ctx_t *c = new_ctx(m);
    if (!c) {
        free(m);
        rc = refuse(RKNN_ERR_FAIL, "rknn_init: too many contexts");
        log_call("rknn_init", 0, rc, NULL);
        return rc;
    }
    *context = c->handle;
    if (extend) extend->ctx = c->handle;
    log_call("rknn_init", c->handle, 0, "\"size\":%u,\"flag\":%u", size, flag);
    return 0;
}

EXPORT int rknn_dup_context(rknn_context *context_in, rknn_context *context_out) {
    int rc;
    if (!context_in || !context_out) {
        rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_dup_context: NULL pointer");
        log_call("rknn_dup_context", 0, rc, NULL);
        return rc;
    }
    ctx_t *src = enter(*context_in, "rknn_dup_context", &rc);
    if (!src) {
        log_call("rknn_dup_context", *context_in, rc, NULL);
        return rc;
    }
    atomic_fetch_add(&src->model->refs, 1);
    ctx_t *c = new_ctx(src->model);
    leave(src);
    if (!c) {
        model_unref(src->model);
        rc = refuse(RKNN_ERR_FAIL, "rknn_dup_context: too many contexts");
        log_call("rknn_dup_context", *context_in, rc, NULL);
        return rc;
    }
    *context_out = c->handle;
    log_call("rknn_dup_context", *context_in, 0, "\"out\":%llu", (unsigned long long)c->handle);
    return 0;
}

EXPORT int rknn_destroy(rknn_context context) {
    int rc;
    ctx_t *c = enter(context, "rknn_destroy", &rc);
    if (!c) {
        log_call("rknn_destroy", context, rc, NULL);
        return rc;
    }
    int live = 0;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < MAX_MEMS; i++) live += g_mem[i].mem && g_mem[i].ctx == context;
    pthread_mutex_unlock(&g_lock);
    if (c->held || live) {
        rc = refuse(RKNN_ERR_FAIL, "rknn_destroy: %s", c->held ? "outputs not released (rknn_outputs_release first)"
                                                                : "tensor memory still allocated (rknn_destroy_mem first)");
        leave(c);
        log_call("rknn_destroy", context, rc, NULL);
        return rc;
    }
    free(c->input);
    free(c->result);
    c->input = NULL;
    c->result = NULL;
    model_unref(c->model);
    c->model = NULL;
    c->destroyed = true; /* the slot keeps its handle: later calls are "destroyed", not "unknown" */
    leave(c);
    log_call("rknn_destroy", context, 0, NULL);
    return 0;
}

static void fill_attr(const model_t *m, bool input, uint32_t index, rknn_tensor_attr *a) {
    memset(a, 0, sizeof *a);
    a->index = index;
    if (input) {
        a->n_dims = 4;
        memcpy(a->dims, m->in_dims, sizeof m->in_dims);
        snprintf(a->name, sizeof a->name, "pixel_values");
        a->n_elems = in_elems(m);
        a->size = a->n_elems * (uint32_t)type_size(m->in_type);
        a->fmt = m->in_fmt;
        a->type = m->in_type;
        a->w_stride = m->w_stride;
        a->size_with_stride = in_stride_bytes(m) * (uint32_t)type_size(m->in_type);
    } else {
        a->n_dims = 3;
        memcpy(a->dims, m->out_dims, sizeof m->out_dims);
        snprintf(a->name, sizeof a->name, "image_features");
        a->n_elems = out_elems(m);
        a->size = a->n_elems * (uint32_t)type_size(m->out_type);
        a->fmt = RKNN_TENSOR_UNDEFINED;
        a->type = m->out_type;
        a->size_with_stride = a->size;
    }
    a->qnt_type = RKNN_TENSOR_QNT_NONE;
    a->scale = 1.0f;
}

EXPORT int rknn_query(rknn_context context, rknn_query_cmd cmd, void *info, uint32_t size) {
    int rc;
    ctx_t *c = enter(context, "rknn_query", &rc);
    if (!c) {
        log_call("rknn_query", context, rc, "\"cmd\":%d", (int)cmd);
        return rc;
    }
    rc = 0;
    size_t want = cmd == RKNN_QUERY_IN_OUT_NUM ? sizeof(rknn_input_output_num)
                  : cmd == RKNN_QUERY_SDK_VERSION ? sizeof(rknn_sdk_version)
                                                  : sizeof(rknn_tensor_attr);
    bool attr = cmd == RKNN_QUERY_INPUT_ATTR || cmd == RKNN_QUERY_OUTPUT_ATTR || cmd == RKNN_QUERY_NATIVE_INPUT_ATTR ||
                cmd == RKNN_QUERY_NATIVE_OUTPUT_ATTR || cmd == RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR ||
                cmd == RKNN_QUERY_NATIVE_NHWC_OUTPUT_ATTR;
    if (!info) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_query: info is NULL");
    else if (!attr && cmd != RKNN_QUERY_IN_OUT_NUM && cmd != RKNN_QUERY_SDK_VERSION)
        rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_query: command %d not emulated", (int)cmd);
    else if (size != want) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_query: size %u != %zu for command %d", size, want, (int)cmd);
    else if (cmd == RKNN_QUERY_IN_OUT_NUM) {
        rknn_input_output_num *io = info;
        io->n_input = io->n_output = 1;
    } else if (cmd == RKNN_QUERY_SDK_VERSION) {
        rknn_sdk_version *v = info;
        memset(v, 0, sizeof *v);
        snprintf(v->api_version, sizeof v->api_version, "2.3.2 (rknn-double)");
        snprintf(v->drv_version, sizeof v->drv_version, "0.9.8");
    } else {
        rknn_tensor_attr *a = info;
        bool input = cmd == RKNN_QUERY_INPUT_ATTR || cmd == RKNN_QUERY_NATIVE_INPUT_ATTR ||
                     cmd == RKNN_QUERY_NATIVE_NHWC_INPUT_ATTR;
        if (a->index != 0) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_query: attr index %u >= 1", a->index);
        else fill_attr(c->model, input, 0, a);
    }
    leave(c);
    log_call("rknn_query", context, rc, "\"cmd\":%d", (int)cmd);
    return rc;
}

EXPORT int rknn_set_core_mask(rknn_context context, rknn_core_mask core_mask) {
    int rc;
    ctx_t *c = enter(context, "rknn_set_core_mask", &rc);
    if (!c) {
        log_call("rknn_set_core_mask", context, rc, "\"mask\":%d", (int)core_mask);
        return rc;
    }
    rc = 0;
    if (!mask_valid((uint32_t)core_mask)) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_set_core_mask: %d is not a core mask of %s", (int)core_mask, g_soc);
    else c->core_mask = (uint32_t)core_mask;
    leave(c);
    log_call("rknn_set_core_mask", context, rc, "\"mask\":%d", (int)core_mask);
    return rc;
}

EXPORT int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]) {
    int rc;
    ctx_t *c = enter(context, "rknn_inputs_set", &rc);
    if (!c) {
        log_call("rknn_inputs_set", context, rc, NULL);
        return rc;
    }
    const model_t *m = c->model;
    rc = 0;
    if (n_inputs != 1) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_inputs_set: n_inputs %u != 1", n_inputs);
    else if (!inputs) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_inputs_set: inputs is NULL");
    else if (inputs[0].index != 0) rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_inputs_set: index %u >= 1", inputs[0].index);
    else if (!inputs[0].buf) rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_inputs_set: buf is NULL");
    else if (inputs[0].pass_through > 1) rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_inputs_set: pass_through %u", inputs[0].pass_through);
    else if (inputs[0].pass_through) rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_inputs_set: pass_through not emulated");
    else if (inputs[0].type != RKNN_TENSOR_UINT8 || inputs[0].fmt != RKNN_TENSOR_NHWC)
        rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_inputs_set: type %d fmt %d not emulated (UINT8 NHWC only)",
                    (int)inputs[0].type, (int)inputs[0].fmt);
    else if (inputs[0].size != in_elems(m))
        rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_inputs_set: size %u != %u", inputs[0].size, in_elems(m));
    else if (c->in_mem) rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_inputs_set: the input is bound to a tensor mem (rknn_set_io_mem)");
    else {
        memcpy(c->input, inputs[0].buf, in_elems(m));
        atomic_fetch_add(&g_bytes_copied, in_elems(m));
        c->input_set = true;
    }
    leave(c);
    log_call("rknn_inputs_set", context, rc, NULL);
    return rc;
}

EXPORT int rknn_run(rknn_context context, rknn_run_extend *extend) {
    int rc;
    ctx_t *c = enter(context, "rknn_run", &rc);
    if (!c) {
        log_call("rknn_run", context, rc, NULL);
        return rc;
    }
    const model_t *m = c->model;
    uint64_t start = now_ns();
    rc = 0;
    if (extend && (extend->non_block || extend->fence_fd)) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_run: non_block/fence not emulated");
    else if (!c->input_set && !c->in_mem) rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_run: no input (rknn_inputs_set or rknn_set_io_mem first)");
    else if (c->held) rc = refuse(RKNN_ERR_FAIL, "rknn_run: the previous outputs were not released");
    if (rc) {
        leave(c);
        log_call("rknn_run", context, rc, NULL);
        return rc;
    }
    uint32_t n = out_elems(m);
    const uint8_t *x = c->input;
    uint32_t row_pixels = m->in_dims[2];
    uint8_t *packed = NULL;
    if (c->in_mem) { /* read the caller's memory now, with the native row stride */
        x = (const uint8_t *)c->in_mem->virt_addr + c->in_mem->offset;
        row_pixels = m->w_stride;
    }
    if (g_provider) {
        if (row_pixels != m->in_dims[2]) {
            packed = malloc(in_elems(m));
            for (uint32_t y = 0; y < m->in_dims[1]; y++)
                memcpy(packed + (size_t)y * m->in_dims[2] * 3, x + (size_t)y * row_pixels * 3, (size_t)m->in_dims[2] * 3);
            x = packed;
        }
        for (uint32_t i = 0; i < n; i++) c->result[i] = __builtin_nanf("");
        int prc = g_provider(g_provider_ud, x, in_elems(m), c->result, n);
        for (uint32_t i = 0; i < n && !prc; i++)
            if (c->result[i] != c->result[i]) prc = 1;
        free(packed);
        if (prc) rc = refuse(RKNN_ERR_FAIL, "rknn_run: the output provider failed");
    } else if (g_compute) {
        linear_map(m, x, row_pixels, c->result);
    }
    if (!rc) {
        for (uint32_t i = 0; i < n; i++) c->result[i] = to_native(m, c->result[i]);
        if (g_delay_us) usleep((useconds_t)g_delay_us);
        if (c->out_mem) {
            uint8_t *dst = (uint8_t *)c->out_mem->virt_addr + c->out_mem->offset;
            if (c->out_mem_type == RKNN_TENSOR_FLOAT32) memcpy(dst, c->result, (size_t)n * 4);
            else
                for (uint32_t i = 0; i < n; i++) ((_Float16 *)dst)[i] = (_Float16)c->result[i];
            atomic_fetch_add(&g_bytes_copied, (size_t)n * type_size(c->out_mem_type)); /* the runtime's conversion */
        } else {
            c->ran = true;
        }
        c->frame++;
        if (extend) extend->frame_id = c->frame;
    }
    uint32_t mask = c->core_mask;
    int zin = c->in_mem != NULL, zout = c->out_mem != NULL;
    leave(c);
    log_call("rknn_run", context, rc, "\"mask\":%u,\"zero_copy_in\":%d,\"zero_copy_out\":%d,\"start_ns\":%llu,\"end_ns\":%llu,\"tid\":%ld",
             mask, zin, zout, (unsigned long long)start, (unsigned long long)now_ns(), (long)syscall(SYS_gettid));
    return rc;
}

EXPORT int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend *extend) {
    int rc;
    ctx_t *c = enter(context, "rknn_outputs_get", &rc);
    if (!c) {
        log_call("rknn_outputs_get", context, rc, NULL);
        return rc;
    }
    const model_t *m = c->model;
    uint32_t n = out_elems(m);
    rc = 0;
    rknn_output *o = outputs;
    if (n_outputs != 1) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_outputs_get: n_outputs %u != 1", n_outputs);
    else if (!o) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_outputs_get: outputs is NULL");
    else if (c->out_mem) rc = refuse(RKNN_ERR_OUTPUT_INVALID, "rknn_outputs_get: the output is bound to a tensor mem (read it there)");
    else if (c->held) rc = refuse(RKNN_ERR_FAIL, "rknn_outputs_get: outputs already fetched and not released");
    else if (!c->ran) rc = refuse(RKNN_ERR_FAIL, "rknn_outputs_get: no rknn_run since the last fetch");
    else if (o[0].index != 0) rc = refuse(RKNN_ERR_OUTPUT_INVALID, "rknn_outputs_get: index %u >= 1", o[0].index);
    else if (o[0].want_float > 1 || o[0].is_prealloc > 1) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_outputs_get: want_float/is_prealloc not 0/1");
    if (!rc) {
        uint32_t t = o[0].want_float ? RKNN_TENSOR_FLOAT32 : m->out_type;
        uint32_t bytes = n * (uint32_t)type_size(t);
        if (o[0].is_prealloc && (!o[0].buf || o[0].size < bytes))
            rc = refuse(RKNN_ERR_OUTPUT_INVALID, "rknn_outputs_get: preallocated buf %s (size %u, need %u)",
                        o[0].buf ? "too small" : "is NULL", o[0].size, bytes);
        else {
            void *dst = o[0].is_prealloc ? o[0].buf : malloc(bytes);
            if (t == RKNN_TENSOR_FLOAT32) memcpy(dst, c->result, bytes);
            else
                for (uint32_t i = 0; i < n; i++) ((_Float16 *)dst)[i] = (_Float16)c->result[i];
            atomic_fetch_add(&g_bytes_copied, bytes);
            c->handed[0] = o[0].is_prealloc ? NULL : dst;
            if (!o[0].is_prealloc) {
                o[0].buf = dst;
                o[0].size = bytes;
            }
            c->held = true;
            c->ran = false;
            if (extend) extend->frame_id = c->frame;
        }
    }
    leave(c);
    log_call("rknn_outputs_get", context, rc, NULL);
    return rc;
}

EXPORT int rknn_outputs_release(rknn_context context, uint32_t n_outputs, rknn_output outputs[]) {
    int rc;
    ctx_t *c = enter(context, "rknn_outputs_release", &rc);
    if (!c) {
        log_call("rknn_outputs_release", context, rc, NULL);
        return rc;
    }
    rc = 0;
    if (n_outputs != 1) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_outputs_release: n_outputs %u != 1", n_outputs);
    else if (!outputs) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_outputs_release: outputs is NULL");
    else if (!c->held) rc = refuse(RKNN_ERR_FAIL, "rknn_outputs_release: nothing to release (released twice, or no rknn_outputs_get)");
    else if (!outputs[0].is_prealloc && outputs[0].buf != c->handed[0])
        rc = refuse(RKNN_ERR_OUTPUT_INVALID, "rknn_outputs_release: buf is not the one rknn_outputs_get returned");
    else {
        free(c->handed[0]);
        c->handed[0] = NULL;
        c->held = false;
    }
    leave(c);
    log_call("rknn_outputs_release", context, rc, NULL);
    return rc;
}

EXPORT rknn_tensor_mem *rknn_create_mem(rknn_context ctx, uint32_t size) {
    int rc;
    ctx_t *c = enter(ctx, "rknn_create_mem", &rc);
    if (!c) {
        log_call("rknn_create_mem", ctx, rc, "\"size\":%u", size);
        return NULL;
    }
    rknn_tensor_mem *mem = NULL;
    if (!size) refuse(RKNN_ERR_PARAM_INVALID, "rknn_create_mem: size 0");
    else {
        pthread_mutex_lock(&g_lock);
        mem_t *slot = NULL;
        for (int i = 0; i < MAX_MEMS && !slot; i++)
            if (!g_mem[i].mem) slot = &g_mem[i];
        if (slot) {
            mem = calloc(1, sizeof *mem);
            mem->virt_addr = aligned_alloc(64, ((size_t)size + 63) / 64 * 64);
            memset(mem->virt_addr, 0xa5, size); /* a caller that does not fill it sees garbage, as on the board */
            mem->fd = -1;
            mem->size = size;
            mem->flags = RKNN_TENSOR_MEMORY_FLAGS_ALLOC_INSIDE;
            slot->mem = mem;
            slot->ctx = ctx;
        }
        pthread_mutex_unlock(&g_lock);
        if (!mem) refuse(RKNN_ERR_FAIL, "rknn_create_mem: too many tensor mems");
    }
    leave(c);
    log_call("rknn_create_mem", ctx, mem ? 0 : -1, "\"size\":%u", size);
    return mem;
}

EXPORT int rknn_set_io_mem(rknn_context ctx, rknn_tensor_mem *mem, rknn_tensor_attr *attr) {
    int rc;
    ctx_t *c = enter(ctx, "rknn_set_io_mem", &rc);
    if (!c) {
        log_call("rknn_set_io_mem", ctx, rc, NULL);
        return rc;
    }
    const model_t *m = c->model;
    pthread_mutex_lock(&g_lock);
    mem_t *slot = find_mem(mem);
    bool ours = slot && slot->ctx == ctx;
    pthread_mutex_unlock(&g_lock);
    rc = 0;
    bool input = attr && !strcmp(attr->name, "pixel_values");
    bool output = attr && !strcmp(attr->name, "image_features");
    if (!mem || !attr) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_set_io_mem: %s is NULL", mem ? "attr" : "mem");
    else if (!slot) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_set_io_mem: mem was not made by rknn_create_mem (or destroyed)");
    else if (!ours) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_set_io_mem: mem belongs to another context");
    else if ((!input && !output) || attr->index != 0)
        rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_set_io_mem: attr names no tensor of the model (%.64s, index %u)", attr->name, attr->index);
    else if (attr->pass_through > 1 || attr->pass_through) rc = refuse(RKNN_ERR_PARAM_INVALID, "rknn_set_io_mem: pass_through not emulated");
    else if (input) {
        if (attr->type != RKNN_TENSOR_UINT8 || attr->fmt != RKNN_TENSOR_NHWC)
            rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_set_io_mem: input type %d fmt %d not emulated (UINT8 NHWC only)", (int)attr->type, (int)attr->fmt);
        else if (attr->w_stride != m->w_stride || attr->size_with_stride != in_stride_bytes(m) * type_size(m->in_type))
            rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_set_io_mem: input attr w_stride %u / size_with_stride %u are not the queried %u / %zu",
                        attr->w_stride, attr->size_with_stride, m->w_stride, in_stride_bytes(m) * type_size(m->in_type));
        else if ((uint64_t)mem->offset + in_stride_bytes(m) > mem->size)
            rc = refuse(RKNN_ERR_INPUT_INVALID, "rknn_set_io_mem: mem size %u < %u", mem->size, in_stride_bytes(m));
        else {
            c->in_mem = mem;
            c->input_set = false;
        }
    } else {
        uint32_t need = out_elems(m) * (uint32_t)type_size(attr->type);
        if (attr->type != RKNN_TENSOR_FLOAT32 && attr->type != (rknn_tensor_type)m->out_type)
            rc = refuse(RKNN_ERR_OUTPUT_INVALID, "rknn_set_io_mem: output type %d not emulated (FLOAT32 or the native type)", (int)attr->type);
        else if ((uint64_t)mem->offset + need > mem->size)
            rc = refuse(RKNN_ERR_OUTPUT_INVALID, "rknn_set_io_mem: mem size %u < %u", mem->size, need);
        else {
            c->out_mem = mem;
            c->out_mem_type = attr->type;
        }
    }
    leave(c);
    log_call("rknn_set_io_mem", ctx, rc, "\"tensor\":\"%s\"", input ? "input" : output ? "output" : "?");
    return rc;
}

EXPORT int rknn_destroy_mem(rknn_context ctx, rknn_tensor_mem *mem) {
    int rc;
    ctx_t *c = enter(ctx, "rknn_destroy_mem", &rc);
    if (!c) {
        log_call("rknn_destroy_mem", ctx, rc, NULL);
        return rc;
    }
    rc = 0;
    pthread_mutex_lock(&g_lock);
    mem_t *slot = find_mem(mem);
    if (!mem) rc = RKNN_ERR_PARAM_INVALID;
    else if (!slot) rc = RKNN_ERR_PARAM_INVALID;
    else if (slot->ctx != ctx) rc = RKNN_ERR_CTX_INVALID;
    else slot->mem = NULL;
    pthread_mutex_unlock(&g_lock);
    if (rc) refuse(rc, "rknn_destroy_mem: %s", !mem ? "mem is NULL" : rc == RKNN_ERR_CTX_INVALID ? "mem belongs to another context"
                                                                      : "unknown mem (destroyed twice?)");
    else {
        if (c->in_mem == mem) c->in_mem = NULL; /* unbound: a later run has no input */
        if (c->out_mem == mem) c->out_mem = NULL;
        free(mem->virt_addr);
        free(mem);
    }
    leave(c);
    log_call("rknn_destroy_mem", ctx, rc, NULL);
    return rc;
}

/* ================================================================================ control (tests) */

EXPORT void double_reset(void) {
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < MAX_CONTEXTS; i++)
        if (g_ctx[i].destroyed) g_ctx[i].handle = 0; /* live contexts stay usable */
    g_log_len = g_log_count = 0;
    if (g_log) g_log[0] = 0;
    g_last_error[0] = 0;
    g_provider = NULL;
    g_provider_ud = NULL;
    g_delay_us = 0;
    g_fail_init = 0;
    g_compute = 1;
    snprintf(g_soc, sizeof g_soc, "rk3588");
    pthread_mutex_unlock(&g_lock);
    atomic_store(&g_bytes_copied, 0);
}

EXPORT const char *double_calls_json(void) {
    pthread_mutex_lock(&g_lock);
    free(g_log_out);
    g_log_out = malloc(g_log_len + 3);
    snprintf(g_log_out, g_log_len + 3, "[%s]", g_log ? g_log : "");
    pthread_mutex_unlock(&g_lock);
    return g_log_out;
}

EXPORT const char *double_last_error(void) {
    static char copy[sizeof g_last_error];
    pthread_mutex_lock(&g_lock);
    memcpy(copy, g_last_error, sizeof copy);
    pthread_mutex_unlock(&g_lock);
    return copy;
}

EXPORT void double_set_output_provider(output_provider fn, void *userdata) {
    pthread_mutex_lock(&g_lock);
    g_provider = fn;
    g_provider_ud = userdata;
    pthread_mutex_unlock(&g_lock);
}

EXPORT void double_set_delay_us(int us) { g_delay_us = us; }
EXPORT void double_fail_init(int code) { g_fail_init = code; }
EXPORT void double_set_compute(int on) { g_compute = on; }
EXPORT void double_set_soc(const char *soc) { snprintf(g_soc, sizeof g_soc, "%s", soc ? soc : "rk3588"); }
EXPORT unsigned long long double_bytes_copied(void) { return atomic_load(&g_bytes_copied); }

EXPORT int double_live_contexts(void) {
    int n = 0;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < MAX_CONTEXTS; i++) n += g_ctx[i].handle && !g_ctx[i].destroyed;
    pthread_mutex_unlock(&g_lock);
    return n;
}

EXPORT int double_live_mems(void) {
    int n = 0;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < MAX_MEMS; i++) n += g_mem[i].mem != NULL;
    pthread_mutex_unlock(&g_lock);
    return n;
}
