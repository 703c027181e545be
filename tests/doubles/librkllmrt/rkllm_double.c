/*
 * rkllm_double.c — a strict test double of Rockchip's librkllmrt.so (the RKLLM runtime).
 *
 * Written for the rksmolvlm test suite from the published rkllm.h layout facts (struct
 * fields in order, enums, prototypes, LP64 sizes/offsets); no vendor file is copied.
 * One source, two ABIs chosen at compile time:
 *
 *   cc -shared -fPIC -O1 -Wall -Werror -DRKLLM_ABI=130 -o librkllmrt.so rkllm_double.c -lpthread
 *   cc -shared -fPIC -O1 -Wall -Werror -DRKLLM_ABI=123 -o librkllmrt.so rkllm_double.c -lpthread
 *
 * It runs no model. It checks what it receives, refuses (returns -1 and prints
 * "E rkllm-double: <reason>" to stderr) what the real runtime would refuse or what the
 * double cannot emulate, records what it received for the tests (double_* functions),
 * and streams a scripted sequence of callback events. See README.md next to this file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#ifndef RKLLM_ABI
#error "define RKLLM_ABI=123 (runtime 1.2.3 ABI) or RKLLM_ABI=130 (runtime 1.3.0 ABI)"
#endif
#if RKLLM_ABI != 123 && RKLLM_ABI != 130
#error "RKLLM_ABI must be 123 or 130"
#endif

#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------------------------------ */
/* The API types (own definitions, same field order and types as the header of each version)  */
/* ------------------------------------------------------------------------------------------ */

typedef void *LLMHandle;

typedef enum { RKLLM_RUN_NORMAL = 0, RKLLM_RUN_WAITING = 1, RKLLM_RUN_FINISH = 2, RKLLM_RUN_ERROR = 3 } LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
    RKLLM_INFER_GET_LOGITS = 2
} RKLLMInferMode;

#if RKLLM_ABI == 130
typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed, uint64_t len);
typedef int (*LLMTokenizerCallback)(void *userdata, const char *text, int32_t text_len, int32_t *tokens,
                                    int32_t n_tokens_max);
#endif

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#if RKLLM_ABI == 130
    bool ignore_eos_token;
#endif
    bool is_async;
#if RKLLM_ABI == 123
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

#if RKLLM_ABI == 123
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
#else
typedef struct {
    char *prompt;
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
} RKLLMMultiModalInput;
#endif

typedef struct {
    const char *role;
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int num_tokens;
} RKLLMCrossAttnParam;

#if RKLLM_ABI == 130
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if RKLLM_ABI == 130
    RKLLMSamplingParam *sampling_params;
#endif
    int keep_history;
#if RKLLM_ABI == 130
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);

#if RKLLM_ABI == 130
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#endif

/* ------------------------------------------------------------------------------------------ */
/* Layout checks (LP64 values computed from the vendor headers with g++ 12)                    */
/* ------------------------------------------------------------------------------------------ */

#define SA_SIZE(T, n) _Static_assert(sizeof(T) == (n), "sizeof(" #T ") != " #n)
#define SA_OFF(T, f, n) _Static_assert(offsetof(T, f) == (n), "offsetof(" #T ", " #f ") != " #n)

_Static_assert(sizeof(void *) == 8, "the double models the LP64 ABI (x86_64/aarch64) only");
_Static_assert(sizeof(bool) == 1, "bool must be 1 byte");
_Static_assert(sizeof(LLMCallState) == 4 && sizeof(RKLLMInputType) == 4 && sizeof(RKLLMInferMode) == 4,
               "enums must be int-sized");

SA_SIZE(RKLLMExtendParam, 120);
SA_OFF(RKLLMExtendParam, base_domain_id, 0);
SA_OFF(RKLLMExtendParam, embed_flash, 4);
SA_OFF(RKLLMExtendParam, enabled_cpus_num, 5);
SA_OFF(RKLLMExtendParam, enabled_cpus_mask, 8);
SA_OFF(RKLLMExtendParam, n_batch, 12);
SA_OFF(RKLLMExtendParam, use_cross_attn, 13);
SA_OFF(RKLLMExtendParam, reserved, 14);

SA_OFF(RKLLMParam, model_path, 0);
SA_OFF(RKLLMParam, max_context_len, 8);
SA_OFF(RKLLMParam, max_new_tokens, 12);
SA_OFF(RKLLMParam, top_k, 16);
SA_OFF(RKLLMParam, n_keep, 20);
SA_OFF(RKLLMParam, top_p, 24);
SA_OFF(RKLLMParam, temperature, 28);
SA_OFF(RKLLMParam, repeat_penalty, 32);
SA_OFF(RKLLMParam, frequency_penalty, 36);
SA_OFF(RKLLMParam, presence_penalty, 40);
SA_OFF(RKLLMParam, mirostat, 44);
SA_OFF(RKLLMParam, mirostat_tau, 48);
SA_OFF(RKLLMParam, mirostat_eta, 52);
SA_OFF(RKLLMParam, skip_special_token, 56);
#if RKLLM_ABI == 123
SA_SIZE(RKLLMParam, 208);
SA_OFF(RKLLMParam, is_async, 57);
SA_OFF(RKLLMParam, img_start, 64);
SA_OFF(RKLLMParam, img_end, 72);
SA_OFF(RKLLMParam, img_content, 80);
SA_OFF(RKLLMParam, extend_param, 88);
#else
SA_SIZE(RKLLMParam, 184);
SA_OFF(RKLLMParam, ignore_eos_token, 57);
SA_OFF(RKLLMParam, is_async, 58);
SA_OFF(RKLLMParam, extend_param, 60);
#endif

SA_SIZE(RKLLMLoraAdapter, 24);
SA_SIZE(RKLLMEmbedInput, 16);
SA_OFF(RKLLMEmbedInput, embed, 0);
SA_OFF(RKLLMEmbedInput, n_tokens, 8);
SA_SIZE(RKLLMTokenInput, 16);
SA_OFF(RKLLMTokenInput, input_ids, 0);
SA_OFF(RKLLMTokenInput, n_tokens, 8);

#if RKLLM_ABI == 123
SA_SIZE(RKLLMMultiModalInput, 48);
SA_OFF(RKLLMMultiModalInput, prompt, 0);
SA_OFF(RKLLMMultiModalInput, image_embed, 8);
SA_OFF(RKLLMMultiModalInput, n_image_tokens, 16);
SA_OFF(RKLLMMultiModalInput, n_image, 24);
SA_OFF(RKLLMMultiModalInput, image_width, 32);
SA_OFF(RKLLMMultiModalInput, image_height, 40);
SA_SIZE(RKLLMInput, 64);
#else
SA_SIZE(RKLLMMultiModalInput, 144);
SA_OFF(RKLLMMultiModalInput, prompt, 0);
SA_OFF(RKLLMMultiModalInput, image, 8);
SA_OFF(RKLLMMultiModalInput, video, 72);
SA_OFF(RKLLMMultiModalInput, image.image_embed, 8);
SA_OFF(RKLLMMultiModalInput, image.n_image_tokens, 16);
SA_OFF(RKLLMMultiModalInput, image.n_image, 24);
SA_OFF(RKLLMMultiModalInput, image.image_start, 32);
SA_OFF(RKLLMMultiModalInput, image.image_end, 40);
SA_OFF(RKLLMMultiModalInput, image.image_content, 48);
SA_OFF(RKLLMMultiModalInput, image.image_width, 56);
SA_OFF(RKLLMMultiModalInput, image.image_height, 64);
SA_OFF(RKLLMMultiModalInput, video.video_embed, 72);
SA_OFF(RKLLMMultiModalInput, video.frame_height, 136);
SA_SIZE(RKLLMInput, 160);
#endif
SA_OFF(RKLLMInput, role, 0);
SA_OFF(RKLLMInput, enable_thinking, 8);
SA_OFF(RKLLMInput, input_type, 12);
SA_OFF(RKLLMInput, prompt_input, 16);
SA_OFF(RKLLMInput, embed_input, 16);
SA_OFF(RKLLMInput, token_input, 16);
SA_OFF(RKLLMInput, multimodal_input, 16);

SA_SIZE(RKLLMLoraParam, 8);
SA_SIZE(RKLLMPromptCacheParam, 16);
SA_SIZE(RKLLMCrossAttnParam, 40);

SA_OFF(RKLLMInferParam, mode, 0);
SA_OFF(RKLLMInferParam, lora_params, 8);
SA_OFF(RKLLMInferParam, prompt_cache_params, 16);
#if RKLLM_ABI == 123
SA_SIZE(RKLLMInferParam, 32);
SA_OFF(RKLLMInferParam, keep_history, 24);
#else
SA_SIZE(RKLLMSamplingParam, 36);
SA_SIZE(RKLLMInferParam, 40);
SA_OFF(RKLLMInferParam, sampling_params, 24);
SA_OFF(RKLLMInferParam, keep_history, 32);
SA_OFF(RKLLMInferParam, max_new_tokens, 36);
#endif

SA_SIZE(RKLLMResultLastHiddenLayer, 16);
SA_SIZE(RKLLMResultLogits, 16);
SA_SIZE(RKLLMPerfStat, 20);
SA_OFF(RKLLMPerfStat, prefill_time_ms, 0);
SA_OFF(RKLLMPerfStat, prefill_tokens, 4);
SA_OFF(RKLLMPerfStat, generate_time_ms, 8);
SA_OFF(RKLLMPerfStat, generate_tokens, 12);
SA_OFF(RKLLMPerfStat, memory_usage_mb, 16);
SA_SIZE(RKLLMResult, 72);
SA_OFF(RKLLMResult, text, 0);
SA_OFF(RKLLMResult, token_id, 8);
SA_OFF(RKLLMResult, last_hidden_layer, 16);
SA_OFF(RKLLMResult, logits, 32);
SA_OFF(RKLLMResult, perf, 48);
#if RKLLM_ABI == 130
SA_SIZE(RKLLMCallback, 48);
SA_OFF(RKLLMCallback, result_callback, 0);
SA_OFF(RKLLMCallback, result_userdata, 8);
SA_OFF(RKLLMCallback, tokenizer_callback, 16);
SA_OFF(RKLLMCallback, tokenizer_userdata, 24);
SA_OFF(RKLLMCallback, embed_callback, 32);
SA_OFF(RKLLMCallback, embed_userdata, 40);
#endif

/* ------------------------------------------------------------------------------------------ */
/* Double state                                                                               */
/* ------------------------------------------------------------------------------------------ */

#define MAX_CONTEXT_LIMIT 16384 /* documented build(max_context) ceiling */
#define HANDLE_MAGIC 0x524b4c4cu /* "RKLL" */

typedef struct DHandle {
    uint32_t magic;
    int alive;
    struct DHandle *next;
    RKLLMParam param; /* copy; model_path points to model_path_copy */
    char *model_path_copy;
#if RKLLM_ABI == 123
    LLMResultCallback cb;
#else
    RKLLMCallback cbs;
#endif
    atomic_int running;
    atomic_int abort_req;
    int history;  /* tokens in the emulated KV cache (guarded by g_lock) */
    int paused;   /* last run ended because the callback returned 1 */
    char *tmpl[3]; /* chat template: system prompt, prefix, postfix */
} DHandle;

typedef struct {
    int32_t token_id;
    char *text; /* NULL allowed */
    int state;
} Event;

typedef struct {
    char *s;
    size_t len, cap;
} Buf;

/* Everything below is guarded by g_lock. Handles are never freed (only marked dead) so a
 * destroyed handle's address is never reused and stays recognisable as "destroyed". */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static DHandle *g_handles;
static DHandle *g_last_handle;
static Event *g_script;
static size_t g_script_len, g_script_cap, g_script_pos;
static int g_delay_us, g_prefill_delay_us, g_hidden, g_error_rc;
static Buf g_run_json, g_init_json, g_tmpl_json;
static char *g_run_json_out, *g_init_json_out, *g_tmpl_json_out;
static float *g_last_embed;
static size_t g_last_embed_len;
static int32_t *g_last_tokens;
static size_t g_last_tokens_len;
static int g_vocab;         /* vocabulary of RKLLM_INFER_GET_LOGITS runs (double_set_vocab) */
static Buf g_calls;         /* every finished accepted run since double_reset, as JSON objects */
static size_t g_n_calls;
static char *g_calls_out;
static unsigned long long g_logits_floats; /* floats handed out in logits callbacks since double_reset */
/* GET_LOGITS logits provider (double_set_logits_provider): fills the rows instead of the hash formula.
 * Called once per logits callback with that step's input: the run's input in prefill (EMBED: n x hidden
 * floats, TOKEN: n ids; the other pointer NULL), then the runtime's own sampled id (TOKEN, n = 1) per step.
 * `pos` is the KV position of the first row, `keep_history` the run's. Returns 0, else the run stops. */
typedef int (*DoubleLogitsProvider)(void *userdata, const float *embed, const int32_t *tokens, int n, int hidden,
                                    int keep_history, int pos, float *out, int vocab);
static DoubleLogitsProvider g_provider;
static void *g_provider_ud;

static pthread_mutex_t g_err_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_last_error[512];

__attribute__((format(printf, 1, 2))) static int fail(const char *fmt, ...) {
    char msg[480];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&g_err_lock);
    snprintf(g_last_error, sizeof g_last_error, "%s", msg);
    pthread_mutex_unlock(&g_err_lock);
    fprintf(stderr, "E rkllm-double: %s\n", msg);
    fflush(stderr);
    return -1;
}

/* ---- small string buffer for JSON ---- */

static void buf_reserve(Buf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *s = realloc(b->s, cap);
    if (!s) abort();
    b->s = s;
    b->cap = cap;
}

__attribute__((format(printf, 2, 3))) static void buf_printf(Buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static void buf_clear(Buf *b) {
    b->len = 0;
    buf_reserve(b, 0);
    b->s[0] = 0;
}

/* JSON string (or null). Bytes >= 0x80 are passed through (UTF-8 assumed). */
static void buf_jstr(Buf *b, const char *s) {
    if (!s) {
        buf_printf(b, "null");
        return;
    }
    buf_printf(b, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            buf_printf(b, "\\%c", *p);
        else if (*p < 0x20)
            buf_printf(b, "\\u%04x", *p);
        else
            buf_printf(b, "%c", *p);
    }
    buf_printf(b, "\"");
}

static void buf_jfloat(Buf *b, double v) {
    if (isfinite(v))
        buf_printf(b, "%.9g", v);
    else
        buf_printf(b, "null");
}

/* Publish a JSON buffer: copy to the string handed out (the handed-out pointer stays valid
 * until the next publish of the same record). */
static void publish(Buf *b, char **out) {
    char *s = strdup(b->s ? b->s : "null");
    if (!s) abort();
    free(*out);
    *out = s;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Sleep `us` microseconds in slices, returning early (1) when the abort flag is raised. */
static int sleep_abortable(DHandle *h, int us) {
    while (us > 0) {
        if (atomic_load(&h->abort_req)) return 1;
        int step = us < 500 ? us : 500;
        struct timespec ts = {0, (long)step * 1000L};
        while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
        }
        us -= step;
    }
    return atomic_load(&h->abort_req) ? 1 : 0;
}

static unsigned char raw_u8(const void *base, size_t off) { return ((const unsigned char *)base)[off]; }

/* Must hold g_lock. */
static DHandle *find_handle(LLMHandle handle, int *destroyed) {
    *destroyed = 0;
    for (DHandle *h = g_handles; h; h = h->next) {
        if ((void *)h == handle) {
            if (h->magic == HANDLE_MAGIC && h->alive) return h;
            *destroyed = 1;
            return NULL;
        }
    }
    return NULL;
}

static DHandle *get_handle(LLMHandle handle, const char *fn) {
    int destroyed;
    pthread_mutex_lock(&g_lock);
    DHandle *h = find_handle(handle, &destroyed);
    pthread_mutex_unlock(&g_lock);
    if (!h) {
        if (!handle)
            fail("%s: handle is NULL", fn);
        else if (destroyed)
            fail("%s: handle %p was destroyed", fn, handle);
        else
            fail("%s: unknown handle %p (not returned by rkllm_init)", fn, handle);
    }
    return h;
}

/* ---- sampling value checks shared by init and (1.3.0) per-run sampling params ---- */

static int check_sampling(const char *where, int32_t top_k, float top_p, float temperature, float repeat_penalty,
                          float frequency_penalty, float presence_penalty, int32_t mirostat, float mirostat_tau,
                          float mirostat_eta) {
    if (top_k < 0) return fail("%s: top_k %d < 0", where, top_k);
    if (!(top_p > 0.0f && top_p <= 1.0f)) return fail("%s: top_p %g not in (0, 1]", where, (double)top_p);
    if (!(temperature >= 0.0f) || !isfinite(temperature))
        return fail("%s: temperature %g < 0 or not finite", where, (double)temperature);
    if (!isfinite(repeat_penalty)) return fail("%s: repeat_penalty is not finite", where);
    if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f))
        return fail("%s: frequency_penalty %g not in [-2, 2]", where, (double)frequency_penalty);
    if (!isfinite(presence_penalty)) return fail("%s: presence_penalty is not finite", where);
    if (mirostat < 0 || mirostat > 2) return fail("%s: mirostat %d not in {0, 1, 2}", where, mirostat);
    if (!isfinite(mirostat_tau) || !isfinite(mirostat_eta))
        return fail("%s: mirostat_tau/mirostat_eta not finite", where);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Real API                                                                                   */
/* ------------------------------------------------------------------------------------------ */

EXPORT RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.model_path = NULL;
    p.max_context_len = 512; /* the double's choice (real default undocumented) */
    p.max_new_tokens = 512;  /* the double's choice (real default undocumented) */
    p.top_k = 40;
    p.n_keep = 0;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.mirostat = 0;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.is_async = false;
    p.extend_param.base_domain_id = 0;
    p.extend_param.enabled_cpus_num = 4; /* documented default */
    p.extend_param.n_batch = 1;
    return p;
}

static void record_init(const DHandle *h) {
    const RKLLMParam *p = &h->param;
    Buf *b = &g_init_json;
    buf_clear(b);
    buf_printf(b, "{\"abi\":%d,\"model_path\":", RKLLM_ABI);
    buf_jstr(b, p->model_path);
    buf_printf(b, ",\"max_context_len\":%d,\"max_new_tokens\":%d,\"top_k\":%d,\"n_keep\":%d", p->max_context_len,
               p->max_new_tokens, p->top_k, p->n_keep);
    buf_printf(b, ",\"top_p\":");
    buf_jfloat(b, p->top_p);
    buf_printf(b, ",\"temperature\":");
    buf_jfloat(b, p->temperature);
    buf_printf(b, ",\"repeat_penalty\":");
    buf_jfloat(b, p->repeat_penalty);
    buf_printf(b, ",\"frequency_penalty\":");
    buf_jfloat(b, p->frequency_penalty);
    buf_printf(b, ",\"presence_penalty\":");
    buf_jfloat(b, p->presence_penalty);
    buf_printf(b, ",\"mirostat\":%d,\"mirostat_tau\":", p->mirostat);
    buf_jfloat(b, p->mirostat_tau);
    buf_printf(b, ",\"mirostat_eta\":");
    buf_jfloat(b, p->mirostat_eta);
    buf_printf(b, ",\"skip_special_token\":%d", p->skip_special_token ? 1 : 0);
#if RKLLM_ABI == 130
    buf_printf(b, ",\"ignore_eos_token\":%d", p->ignore_eos_token ? 1 : 0);
#endif
    buf_printf(b, ",\"is_async\":%d", p->is_async ? 1 : 0);
#if RKLLM_ABI == 123
    buf_printf(b, ",\"img_start\":");
    buf_jstr(b, p->img_start);
    buf_printf(b, ",\"img_end\":");
    buf_jstr(b, p->img_end);
    buf_printf(b, ",\"img_content\":");
    buf_jstr(b, p->img_content);
#endif
    const RKLLMExtendParam *e = &p->extend_param;
    buf_printf(b,
               ",\"base_domain_id\":%d,\"embed_flash\":%d,\"enabled_cpus_num\":%d,\"enabled_cpus_mask\":%u,"
               "\"n_batch\":%u,\"use_cross_attn\":%d",
               e->base_domain_id, e->embed_flash, e->enabled_cpus_num, e->enabled_cpus_mask, e->n_batch,
               e->use_cross_attn);
#if RKLLM_ABI == 130
    buf_printf(b, ",\"tokenizer_callback\":%d,\"embed_callback\":%d,\"result_userdata\":%lu",
               h->cbs.tokenizer_callback ? 1 : 0, h->cbs.embed_callback ? 1 : 0,
               (unsigned long)(uintptr_t)h->cbs.result_userdata);
#endif
    buf_printf(b, "}");
    publish(b, &g_init_json_out);
}

#if RKLLM_ABI == 123
EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback)
#else
EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback)
#endif
{
    if (!handle) return fail("rkllm_init: handle pointer is NULL");
    *handle = NULL;
    if (!param) return fail("rkllm_init: param is NULL");
#if RKLLM_ABI == 123
    if (!callback) return fail("rkllm_init: callback is NULL");
#else
    if (!callback) return fail("rkllm_init: callback struct is NULL");
    if (!callback->result_callback) return fail("rkllm_init: callback->result_callback is NULL");
#endif
    if (!param->model_path) return fail("rkllm_init: model_path is NULL");
    struct stat st;
    if (stat(param->model_path, &st) != 0) return fail("rkllm_init: model_path '%s' does not exist", param->model_path);
    if (!S_ISREG(st.st_mode)) return fail("rkllm_init: model_path '%s' is not a regular file", param->model_path);
    if (param->max_context_len <= 0 || param->max_context_len > MAX_CONTEXT_LIMIT)
        return fail("rkllm_init: max_context_len %d not in [1, %d]", param->max_context_len, MAX_CONTEXT_LIMIT);
    if (param->max_new_tokens <= 0) return fail("rkllm_init: max_new_tokens %d <= 0", param->max_new_tokens);
    if (param->n_keep < -1 || param->n_keep > param->max_context_len)
        return fail("rkllm_init: n_keep %d not in [-1, max_context_len]", param->n_keep);
    if (check_sampling("rkllm_init", param->top_k, param->top_p, param->temperature, param->repeat_penalty,
                       param->frequency_penalty, param->presence_penalty, param->mirostat, param->mirostat_tau,
                       param->mirostat_eta))
        return -1;
    /* bool fields: the raw byte must be 0 or 1 (anything else means a layout mismatch). */
    if (raw_u8(param, offsetof(RKLLMParam, skip_special_token)) > 1)
        return fail("rkllm_init: skip_special_token byte is %u (not a bool; layout mismatch?)",
                    raw_u8(param, offsetof(RKLLMParam, skip_special_token)));
#if RKLLM_ABI == 130
    if (raw_u8(param, offsetof(RKLLMParam, ignore_eos_token)) > 1)
        return fail("rkllm_init: ignore_eos_token byte is %u (not a bool; layout mismatch?)",
                    raw_u8(param, offsetof(RKLLMParam, ignore_eos_token)));
#endif
    if (raw_u8(param, offsetof(RKLLMParam, is_async)) > 1)
        return fail("rkllm_init: is_async byte is %u (not a bool; layout mismatch?)",
                    raw_u8(param, offsetof(RKLLMParam, is_async)));
    const RKLLMExtendParam *e = &param->extend_param;
    if (e->n_batch < 1 || e->n_batch > 8)
        return fail("rkllm_init: extend_param.n_batch %u not in [1, 8]", e->n_batch);
    if (e->use_cross_attn != 0) return fail("rkllm_init: extend_param.use_cross_attn %d: not emulated", e->use_cross_attn);
    if (e->enabled_cpus_num < 0 || e->enabled_cpus_num > 8)
        return fail("rkllm_init: extend_param.enabled_cpus_num %d not in [0, 8]", e->enabled_cpus_num);
    if (e->enabled_cpus_mask & ~0xffu)
        return fail("rkllm_init: extend_param.enabled_cpus_mask 0x%x has bits above CPU7", e->enabled_cpus_mask);
    if (e->embed_flash != 0 && e->embed_flash != 1)
        return fail("rkllm_init: extend_param.embed_flash %d not 0/1", e->embed_flash);
    if (e->base_domain_id < 0) return fail("rkllm_init: extend_param.base_domain_id %d < 0", e->base_domain_id);
    for (size_t i = 0; i < sizeof e->reserved; i++)
        if (e->reserved[i])
            return fail("rkllm_init: extend_param.reserved[%zu] is %u, not 0 (struct layout mismatch?)", i,
                        e->reserved[i]);

    DHandle *h = calloc(1, sizeof *h);
    if (!h) return fail("rkllm_init: out of memory");
    h->magic = HANDLE_MAGIC;
    h->alive = 1;
    h->param = *param;
    h->model_path_copy = strdup(param->model_path);
    h->param.model_path = h->model_path_copy;
#if RKLLM_ABI == 123
    /* img_* strings are only recorded, not kept */
    h->cb = callback;
#else
    h->cbs = *callback;
#endif
    atomic_init(&h->running, 0);
    atomic_init(&h->abort_req, 0);

    pthread_mutex_lock(&g_lock);
    record_init(h);
#if RKLLM_ABI == 123
    h->param.img_start = h->param.img_end = h->param.img_content = NULL;
#endif
    h->next = g_handles;
    g_handles = h;
    g_last_handle = h;
    pthread_mutex_unlock(&g_lock);
    fprintf(stderr, "I rkllm-double: rkllm-runtime double (ABI %d), model %s, max_context_len %d\n", RKLLM_ABI,
            h->model_path_copy, h->param.max_context_len);
    *handle = h;
    return 0;
}

/* A run that passed validation, with everything copied out of the caller's structs. */
typedef struct {
    DHandle *h;
    void *userdata;
    int n_tokens;
    int max_new;
    int keep_history;
    int history_before;
    int mode;
    int vocab;      /* GET_LOGITS: the vocabulary size (rows are vocab floats) */
    uint32_t *keys; /* GET_LOGITS: one key per input position (token id, or a hash of the embedding row) */
    DoubleLogitsProvider provider; /* GET_LOGITS: the provider set when the run started (NULL: the formula) */
    void *provider_ud;
    float *embed;   /* GET_LOGITS with a provider: copy of the EMBED input (n_tokens x hidden), else NULL */
    int32_t *tokens; /* same for TOKEN input */
    int hidden;
    double t0;
} Job;

enum { STOP_DONE, STOP_MAXTOK, STOP_ABORT, STOP_PAUSE, STOP_ERROR, STOP_CB_INVALID };
static const char *const STOP_NAMES[] = {"finish", "max_new_tokens", "abort", "pause", "error", "callback_invalid"};

static int deliver(const Job *j, RKLLMResult *r, LLMCallState state) {
#if RKLLM_ABI == 123
    return j->h->cb(r, j->userdata, state);
#else
    void *ud = j->userdata ? j->userdata : j->h->cbs.result_userdata;
    return j->h->cbs.result_callback(r, ud, state);
#endif
}

/* 1: valid and means pause; 0: continue; -1: invalid return value */
static int callback_verdict(int rc) {
    if (rc == 0) return 0;
    if (rc == 1) return 1;
#if RKLLM_ABI == 130
    if (rc == 2) return 0; /* "release the current output buffer": nothing to release here */
#endif
    return -1;
}

static int script_pop(Event *ev) {
    int ok = 0;
    pthread_mutex_lock(&g_lock);
    if (g_script_pos < g_script_len) {
        Event *src = &g_script[g_script_pos++];
        ev->token_id = src->token_id;
        ev->state = src->state;
        ev->text = src->text ? strdup(src->text) : NULL;
        ok = 1;
    }
    pthread_mutex_unlock(&g_lock);
    return ok;
}

static int script_pending(void) {
    pthread_mutex_lock(&g_lock);
    int n = g_script_pos < g_script_len;
    pthread_mutex_unlock(&g_lock);
    return n;
}

static void script_reset_locked(void) {
    for (size_t i = 0; i < g_script_len; i++) free(g_script[i].text);
    g_script_len = g_script_pos = 0;
}

/* ---- GET_LOGITS: deterministic logits computed from the inputs ----
 * Row of KV position `pos` whose input has key `key` (the token id; for an embedding row the
 * FNV-1a hash of its float bytes): logit[v] = (fmix32(seed ^ v * 0x27d4eb2f) >> 8) * 2^-24 * 8,
 * seed = fmix32(pos * 0x9e3779b1 ^ key) -- exact in float32, so a test recomputes it bit for bit. */
static uint32_t fmix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x85ebca6bu;
    x ^= x >> 13;
    x *= 0xc2b2ae35u;
    x ^= x >> 16;
    return x;
}

static void logits_row(float *out, int vocab, uint32_t pos, uint32_t key) {
    uint32_t seed = fmix32(pos * 0x9e3779b1u ^ key);
    for (int v = 0; v < vocab; v++)
        out[v] = (float)(fmix32(seed ^ (uint32_t)v * 0x27d4eb2fu) >> 8) * (8.0f / 16777216.0f);
}

static uint32_t fnv1a(const void *data, size_t n) {
    const unsigned char *p = data;
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

static int32_t argmax_row(const float *row, int vocab) {
    int32_t best = 0;
    for (int v = 1; v < vocab; v++)
        if (row[v] > row[best]) best = v;
    return best;
}

/* Deliver one logits callback of `rows` rows (positions first_pos.., keys[]), then poison and free
 * the buffer: it is valid only during the callback, as in the real runtime. Returns the verdict. */
static int deliver_logits(const Job *j, int rows, uint32_t first_pos, const uint32_t *keys, int32_t *sampled,
                          int *released, int first) {
    size_t n = (size_t)rows * (size_t)j->vocab;
    float *buf = malloc(n * sizeof(float));
    if (!buf) abort();
    if (j->provider) {
        for (size_t i = 0; i < n; i++) buf[i] = NAN; /* a row the provider leaves unfilled is caught below */
        int32_t own = (int32_t)keys[0];
        const float *embed = first ? j->embed : NULL;
        const int32_t *tokens = first ? j->tokens : &own;
        int rc = j->provider(j->provider_ud, embed, tokens, rows, j->hidden, j->keep_history, (int)first_pos, buf,
                             j->vocab);
        int finite = 1;
        for (size_t i = 0; i < n && finite; i++) finite = isfinite(buf[i]);
        if (rc != 0 || !finite) {
            free(buf);
            fail("rkllm_run: the logits provider %s", rc != 0 ? "failed" : "left a non-finite logit");
            return -2; /* the run stops without FINISH and rkllm_run returns -1 */
        }
    } else {
        for (int r = 0; r < rows; r++)
            logits_row(buf + (size_t)r * j->vocab, j->vocab, first_pos + (uint32_t)r, keys[r]);
    }
    *sampled = argmax_row(buf + (size_t)(rows - 1) * j->vocab, j->vocab); /* the runtime samples by itself */
    RKLLMResult res;
    memset(&res, 0, sizeof res);
    res.text = NULL;
    res.token_id = *sampled;
    res.logits.logits = buf;
    res.logits.vocab_size = j->vocab;
    res.logits.num_tokens = rows;
    int raw = deliver(j, &res, RKLLM_RUN_NORMAL);
    if (RKLLM_ABI == 130 && raw == 2) (*released)++; /* "release the current output buffer" */
    int v = callback_verdict(raw);
    for (size_t i = 0; i < n; i++) buf[i] = NAN;
    free(buf);
    pthread_mutex_lock(&g_lock);
    g_logits_floats += n;
    pthread_mutex_unlock(&g_lock);
    return v;
}

/* GET_LOGITS run: the prefill callback carries every input position (n_tokens x vocab, rknn-llm
 * #245); the runtime samples a token from the last row (greedy here) and, while it may generate
 * more, forwards it and delivers 1 x vocab per step. The last sampled token is never forwarded, so
 * the KV cache grows by n_tokens + generated - 1. */
static void stream_logits(Job *j, int delay, int *stop, int *generated, int *delivered, int *released, Buf *rows) {
    DHandle *h = j->h;
    int32_t sampled = -1;
    buf_printf(rows, "[");
    while (*stop == STOP_DONE) {
        if (atomic_load(&h->abort_req)) {
            *stop = STOP_ABORT;
            break;
        }
        if (*generated >= j->max_new) {
            *stop = STOP_MAXTOK;
            break;
        }
        int first = *generated == 0;
        if (!first && sleep_abortable(h, delay)) {
            *stop = STOP_ABORT;
            break;
        }
        uint32_t key = (uint32_t)sampled;
        int n = first ? j->n_tokens : 1;
        uint32_t pos = (uint32_t)(j->history_before + (first ? 0 : j->n_tokens + *generated - 1));
        int v = deliver_logits(j, n, pos, first ? j->keys : &key, &sampled, released, first);
        if (v == -2) {
            *stop = STOP_CB_INVALID;
            break;
        }
        buf_printf(rows, "%s%d", first ? "" : ",", n);
        (*delivered)++;
        (*generated)++;
        if (v < 0) {
            fail("rkllm_run: result callback returned an invalid value (valid: 0 continue, 1 pause%s)",
                 RKLLM_ABI == 130 ? ", 2 release buffer" : "");
            *stop = STOP_CB_INVALID;
            break;
        }
        if (v == 1) {
            *stop = STOP_PAUSE;
            break;
        }
    }
    buf_printf(rows, "]");
}

static int stream(Job *j) {
    DHandle *h = j->h;
    int stop = STOP_DONE, generated = 0, delivered = 0, rc = 0;
    int delay, prefill_delay;
    Buf rows = {0};
    pthread_mutex_lock(&g_lock);
    delay = g_delay_us;
    prefill_delay = g_prefill_delay_us;
    pthread_mutex_unlock(&g_lock);

    if (sleep_abortable(h, prefill_delay)) stop = STOP_ABORT;
    double t_first = now_ms();
    int released = 0;
    if (j->mode == RKLLM_INFER_GET_LOGITS) stream_logits(j, delay, &stop, &generated, &delivered, &released, &rows);
    while (j->mode == RKLLM_INFER_GENERATE && stop == STOP_DONE) {
        if (atomic_load(&h->abort_req)) {
            stop = STOP_ABORT;
            break;
        }
        if (generated >= j->max_new) {
            stop = STOP_MAXTOK;
            break;
        }
        if (!script_pending()) break;
        if (sleep_abortable(h, delay)) {
            stop = STOP_ABORT;
            break;
        }
        Event ev;
        if (!script_pop(&ev)) break;
        RKLLMResult r;
        memset(&r, 0, sizeof r);
        r.text = ev.text;
        r.token_id = ev.token_id;
        int v = callback_verdict(deliver(j, &r, (LLMCallState)ev.state));
        delivered++;
        if (ev.state == RKLLM_RUN_NORMAL) generated++;
        if (ev.text) {
            memset(ev.text, 0, strlen(ev.text)); /* the text is only valid during the callback */
            free(ev.text);
        }
        if (ev.state == RKLLM_RUN_ERROR) {
            stop = STOP_ERROR;
            break;
        }
        if (v < 0) {
            fail("rkllm_run: result callback returned an invalid value (valid: 0 continue, 1 pause%s)",
                 RKLLM_ABI == 130 ? ", 2 release buffer" : "");
            stop = STOP_CB_INVALID;
            break;
        }
        if (v == 1) {
            stop = STOP_PAUSE;
            break;
        }
    }
    double t_end = now_ms();

    if (stop == STOP_DONE || stop == STOP_MAXTOK || stop == STOP_ABORT) {
        RKLLMResult r;
        memset(&r, 0, sizeof r);
        r.text = NULL;
        r.token_id = -1;
        r.perf.prefill_time_ms = (float)(t_first - j->t0);
        r.perf.prefill_tokens = j->n_tokens;
        r.perf.generate_time_ms = (float)(t_end - t_first);
        r.perf.generate_tokens = generated;
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        r.perf.memory_usage_mb = ru.ru_maxrss > 0 ? (float)ru.ru_maxrss / 1024.0f : 1.0f;
        int v = callback_verdict(deliver(j, &r, RKLLM_RUN_FINISH));
        delivered++;
        if (v < 0) {
            fail("rkllm_run: result callback returned an invalid value on FINISH");
            rc = -1;
        }
    } else if (stop == STOP_ERROR) {
        pthread_mutex_lock(&g_lock);
        rc = g_error_rc;
        pthread_mutex_unlock(&g_lock);
    } else if (stop == STOP_CB_INVALID) {
        rc = -1;
    }

    pthread_mutex_lock(&g_lock);
    if (stop != STOP_PAUSE && j->mode == RKLLM_INFER_GENERATE) {
        /* the rest of the script belongs to this finished generation */
        script_reset_locked();
    }
    /* GET_LOGITS: the last token the runtime sampled was never forwarded (see stream_logits) */
    int forwarded = j->n_tokens + (j->mode == RKLLM_INFER_GET_LOGITS ? (generated > 0 ? generated - 1 : 0) : generated);
    if (stop == STOP_PAUSE) {
        h->history = j->history_before + forwarded;
        h->paused = 1;
    } else {
        h->history = j->keep_history ? j->history_before + forwarded : 0;
        h->paused = 0;
    }
    g_last_handle = h;
    /* close the JSON record opened by record_run() */
    Buf *b = &g_run_json;
    static const char open_tail[] = ",\"stop\":null}";
    size_t tl = sizeof open_tail - 1;
    if (b->len >= tl && memcmp(b->s + b->len - tl, open_tail, tl) == 0) { /* not reset meanwhile */
        b->len -= tl;
        buf_printf(b, ",\"logits_rows\":%s,\"released\":%d", rows.s ? rows.s : "null", released);
        buf_printf(b, ",\"stop\":\"%s\",\"delivered\":%d,\"generated\":%d,\"rc\":%d,\"history_after\":%d}",
                   STOP_NAMES[stop], delivered, generated, rc, h->history);
        publish(b, &g_run_json_out);
        buf_printf(&g_calls, "%s%s", g_n_calls ? "," : "", b->s);
        g_n_calls++;
    }
    pthread_mutex_unlock(&g_lock);
    free(rows.s);
    free(j->keys);
    free(j->embed);
    free(j->tokens);
    j->keys = NULL;
    j->embed = NULL;
    j->tokens = NULL;
    atomic_store(&h->running, 0);
    return rc;
}

static void *async_main(void *arg) {
    Job *j = arg;
    stream(j);
    free(j);
    return NULL;
}

/* Validate a run. On success returns 0 with the handle marked running, the input recorded
 * and `j` filled in. */
static int prepare_run(const char *fn, LLMHandle handle, RKLLMInput *in, RKLLMInferParam *ip, void *userdata,
                       int is_async, Job *j) {
    DHandle *h = get_handle(handle, fn);
    if (!h) return -1;
    if (!in) return fail("%s: rkllm_input is NULL", fn);
    if (!in->role) return fail("%s: rkllm_input->role is NULL (must be \"user\" or \"tool\")", fn);
    if (strcmp(in->role, "user") != 0 && strcmp(in->role, "tool") != 0)
        return fail("%s: rkllm_input->role '%.40s' is not \"user\" or \"tool\"", fn, in->role);
    unsigned thinking = raw_u8(in, offsetof(RKLLMInput, enable_thinking));
    if (thinking > 1) return fail("%s: enable_thinking byte is %u (not a bool; layout mismatch?)", fn, thinking);
    int itype;
    memcpy(&itype, (const char *)in + offsetof(RKLLMInput, input_type), sizeof itype);
    if (itype < 0 || itype > 3) return fail("%s: input_type %d not in 0..3", fn, itype);
    if (itype == RKLLM_INPUT_PROMPT) return fail("%s: input_type RKLLM_INPUT_PROMPT: not emulated", fn);
    if (itype == RKLLM_INPUT_MULTIMODAL) return fail("%s: input_type RKLLM_INPUT_MULTIMODAL: not emulated", fn);
    size_t n_tokens;
    int hidden;
    pthread_mutex_lock(&g_lock);
    hidden = g_hidden;
    pthread_mutex_unlock(&g_lock);
    if (itype == RKLLM_INPUT_EMBED) {
        if (!in->embed_input.embed) return fail("%s: embed_input.embed is NULL", fn);
        if (in->embed_input.n_tokens == 0) return fail("%s: embed_input.n_tokens is 0", fn);
        if (hidden <= 0) return fail("%s: EMBED input but double_set_hidden() was not called (test setup)", fn);
        n_tokens = in->embed_input.n_tokens;
    } else {
        if (!in->token_input.input_ids) return fail("%s: token_input.input_ids is NULL", fn);
        if (in->token_input.n_tokens == 0) return fail("%s: token_input.n_tokens is 0", fn);
        n_tokens = in->token_input.n_tokens;
    }
    if (!ip) return fail("%s: rkllm_infer_params is NULL", fn);
    int mode;
    memcpy(&mode, (const char *)ip + offsetof(RKLLMInferParam, mode), sizeof mode);
    if (mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER)
        return fail("%s: infer mode RKLLM_INFER_GET_LAST_HIDDEN_LAYER: not emulated", fn);
    if (mode != RKLLM_INFER_GENERATE && mode != RKLLM_INFER_GET_LOGITS)
        return fail("%s: infer mode %d is not a RKLLMInferMode", fn, mode);
    if (mode == RKLLM_INFER_GET_LOGITS && h->param.extend_param.n_batch > 1) /* rknn-llm #406 */
        return fail("%s: Getting the logits is not supported for multiple batches (n_batch %u)", fn,
                    h->param.extend_param.n_batch);
    if (mode == RKLLM_INFER_GENERATE && h->param.extend_param.n_batch > 1)
        return fail("%s: n_batch %u: batched runs are not emulated", fn, h->param.extend_param.n_batch);
    int vocab;
    pthread_mutex_lock(&g_lock);
    vocab = g_vocab;
    pthread_mutex_unlock(&g_lock);
    if (mode == RKLLM_INFER_GET_LOGITS && vocab <= 0)
        return fail("%s: RKLLM_INFER_GET_LOGITS but double_set_vocab() was not called (test setup)", fn);
    if (ip->lora_params) return fail("%s: lora_params set but no LoRA adapter can be loaded (not emulated)", fn);
    if (ip->prompt_cache_params) return fail("%s: prompt_cache_params: not emulated", fn);
    if (ip->keep_history != 0 && ip->keep_history != 1)
        return fail("%s: keep_history %d not 0/1", fn, ip->keep_history);
    int max_new = h->param.max_new_tokens;
#if RKLLM_ABI == 130
    const RKLLMSamplingParam *sp = ip->sampling_params;
    if (sp && check_sampling(fn, sp->top_k, sp->top_p, sp->temperature, sp->repeat_penalty, sp->frequency_penalty,
                             sp->presence_penalty, sp->mirostat, sp->mirostat_tau, sp->mirostat_eta))
        return -1;
    if (ip->max_new_tokens > 0) max_new = ip->max_new_tokens;
#endif
    if (itype == RKLLM_INPUT_TOKEN)
        for (size_t i = 0; i < n_tokens; i++)
            if (in->token_input.input_ids[i] < 0)
                return fail("%s: token_input.input_ids[%zu] = %d is negative", fn, i, in->token_input.input_ids[i]);

    int expected = 0;
    if (!atomic_compare_exchange_strong(&h->running, &expected, 1))
        return fail("%s: a run is already in progress on this handle", fn);

    pthread_mutex_lock(&g_lock);
    int destroyed;
    if (!find_handle(handle, &destroyed)) { /* destroyed meanwhile */
        pthread_mutex_unlock(&g_lock);
        atomic_store(&h->running, 0);
        return fail("%s: handle %p was destroyed", fn, handle);
    }
    int history_before = (ip->keep_history || h->paused) ? h->history : 0;
    long long need = (long long)history_before + (long long)n_tokens + (long long)max_new;
    if (need > h->param.max_context_len) {
        pthread_mutex_unlock(&g_lock);
        atomic_store(&h->running, 0);
        return fail("%s: context overflow: history %d + n_tokens %zu + max_new_tokens %d = %lld > max_context_len %d",
                    fn, history_before, n_tokens, max_new, need, h->param.max_context_len);
    }

    /* record */
    double embed_sum = 0.0;
    size_t nonfinite = 0;
    if (itype == RKLLM_INPUT_EMBED) {
        size_t n = n_tokens * (size_t)hidden;
        float *copy = malloc(n * sizeof(float));
        if (!copy) {
            pthread_mutex_unlock(&g_lock);
            atomic_store(&h->running, 0);
            return fail("%s: out of memory copying the embeddings", fn);
        }
        memcpy(copy, in->embed_input.embed, n * sizeof(float));
        for (size_t i = 0; i < n; i++) {
            if (isfinite(copy[i]))
                embed_sum += copy[i];
            else
                nonfinite++;
        }
        free(g_last_embed);
        g_last_embed = copy;
        g_last_embed_len = n;
        free(g_last_tokens);
        g_last_tokens = NULL;
        g_last_tokens_len = 0;
    } else {
        int32_t *copy = malloc(n_tokens * sizeof(int32_t));
        if (!copy) {
            pthread_mutex_unlock(&g_lock);
            atomic_store(&h->running, 0);
            return fail("%s: out of memory copying the tokens", fn);
        }
        memcpy(copy, in->token_input.input_ids, n_tokens * sizeof(int32_t));
        free(g_last_tokens);
        g_last_tokens = copy;
        g_last_tokens_len = n_tokens;
        free(g_last_embed);
        g_last_embed = NULL;
        g_last_embed_len = 0;
    }
    Buf *b = &g_run_json;
    buf_clear(b);
    buf_printf(b, "{\"abi\":%d,\"function\":\"%s\",\"role\":", RKLLM_ABI, fn);
    buf_jstr(b, in->role);
    buf_printf(b, ",\"enable_thinking\":%u,\"input_type\":%d,\"n_tokens\":%zu,\"keep_history\":%d,\"mode\":%d",
               thinking, itype, n_tokens, ip->keep_history, mode);
#if RKLLM_ABI == 130
    buf_printf(b, ",\"max_new_tokens\":%d,\"sampling\":", ip->max_new_tokens);
    if (sp) {
        buf_printf(b, "{\"top_k\":%d,\"top_p\":", sp->top_k);
        buf_jfloat(b, sp->top_p);
        buf_printf(b, ",\"temperature\":");
        buf_jfloat(b, sp->temperature);
        buf_printf(b, ",\"repeat_penalty\":");
        buf_jfloat(b, sp->repeat_penalty);
        buf_printf(b, ",\"frequency_penalty\":");
        buf_jfloat(b, sp->frequency_penalty);
        buf_printf(b, ",\"presence_penalty\":");
        buf_jfloat(b, sp->presence_penalty);
        buf_printf(b, ",\"mirostat\":%d,\"mirostat_tau\":", sp->mirostat);
        buf_jfloat(b, sp->mirostat_tau);
        buf_printf(b, ",\"mirostat_eta\":");
        buf_jfloat(b, sp->mirostat_eta);
        buf_printf(b, "}");
    } else {
        buf_printf(b, "null");
    }
#else
    buf_printf(b, ",\"max_new_tokens\":null,\"sampling\":null");
#endif
    buf_printf(b, ",\"effective_max_new_tokens\":%d,\"history_before\":%d,\"hidden\":", max_new, history_before);
    if (itype == RKLLM_INPUT_EMBED) {
        buf_printf(b, "%d,\"embed_sum\":", hidden);
        if (nonfinite)
            buf_printf(b, "null");
        else
            buf_printf(b, "%.17g", embed_sum);
        buf_printf(b, ",\"embed_nonfinite\":%zu", nonfinite);
    } else {
        buf_printf(b, "null,\"embed_sum\":null,\"embed_nonfinite\":0");
    }
    buf_printf(b, ",\"tokens\":");
    if (itype == RKLLM_INPUT_TOKEN) {
        buf_printf(b, "[");
        for (size_t i = 0; i < n_tokens; i++) buf_printf(b, "%s%d", i ? "," : "", in->token_input.input_ids[i]);
        buf_printf(b, "]");
    } else {
        buf_printf(b, "null");
    }
    buf_printf(b, ",\"userdata\":%lu,\"async\":%d,\"stop\":null}", (unsigned long)(uintptr_t)userdata, is_async);
    publish(b, &g_run_json_out);
    g_last_handle = h;
    pthread_mutex_unlock(&g_lock);

    uint32_t *keys = NULL;
    if (mode == RKLLM_INFER_GET_LOGITS) {
        keys = malloc(n_tokens * sizeof *keys);
        if (!keys) abort();
        for (size_t i = 0; i < n_tokens; i++)
            keys[i] = itype == RKLLM_INPUT_TOKEN ? (uint32_t)in->token_input.input_ids[i]
                                                 : fnv1a(in->embed_input.embed + i * (size_t)hidden,
                                                         (size_t)hidden * sizeof(float));
    }
    float *embed_copy = NULL;
    int32_t *tokens_copy = NULL;
    pthread_mutex_lock(&g_lock);
    DoubleLogitsProvider provider = mode == RKLLM_INFER_GET_LOGITS ? g_provider : NULL;
    void *provider_ud = g_provider_ud;
    pthread_mutex_unlock(&g_lock);
    if (provider) { /* the caller's buffers may be freed once rkllm_run_async returns */
        if (itype == RKLLM_INPUT_TOKEN) {
            tokens_copy = malloc(n_tokens * sizeof *tokens_copy);
            if (!tokens_copy) abort();
            memcpy(tokens_copy, in->token_input.input_ids, n_tokens * sizeof *tokens_copy);
        } else {
            embed_copy = malloc(n_tokens * (size_t)hidden * sizeof *embed_copy);
            if (!embed_copy) abort();
            memcpy(embed_copy, in->embed_input.embed, n_tokens * (size_t)hidden * sizeof *embed_copy);
        }
    }
    atomic_store(&h->abort_req, 0); /* an abort only affects a run in progress */
    j->provider = provider;
    j->provider_ud = provider_ud;
    j->embed = embed_copy;
    j->tokens = tokens_copy;
    j->hidden = hidden;
    j->mode = mode;
    j->vocab = vocab;
    j->keys = keys;
    j->h = h;
    j->userdata = userdata;
    j->n_tokens = (int)n_tokens;
    j->max_new = max_new;
    j->keep_history = ip->keep_history;
    j->history_before = history_before;
    j->t0 = now_ms();
    return 0;
}

EXPORT int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params, void *userdata) {
    Job j;
    if (prepare_run("rkllm_run", handle, rkllm_input, rkllm_infer_params, userdata, 0, &j)) return -1;
    return stream(&j);
}

EXPORT int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                           void *userdata) {
    Job *j = malloc(sizeof *j);
    if (!j) return fail("rkllm_run_async: out of memory");
    if (prepare_run("rkllm_run_async", handle, rkllm_input, rkllm_infer_params, userdata, 1, j)) {
        free(j);
        return -1;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    int err = pthread_create(&t, &attr, async_main, j);
    pthread_attr_destroy(&attr);
    if (err) {
        atomic_store(&j->h->running, 0);
        free(j);
        return fail("rkllm_run_async: pthread_create failed (%d)", err);
    }
    return 0;
}

EXPORT int rkllm_abort(LLMHandle handle) {
    DHandle *h = get_handle(handle, "rkllm_abort");
    if (!h) return -1;
    atomic_store(&h->abort_req, 1);
    return 0;
}

EXPORT int rkllm_is_running(LLMHandle handle) {
    DHandle *h = get_handle(handle, "rkllm_is_running");
    if (!h) return -1;
    int running = atomic_load(&h->running) ? 1 : 0;
#if RKLLM_ABI == 123
    return running ? 0 : 1; /* 1.2.3 header: "0 if a task is running, non-zero for otherwise" */
#else
    return running; /* 1.3.0 header: "1 if a task is running" */
#endif
}

EXPORT int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    DHandle *h = get_handle(handle, "rkllm_clear_kv_cache");
    if (!h) return -1;
    if (keep_system_prompt != 0 && keep_system_prompt != 1)
        return fail("rkllm_clear_kv_cache: keep_system_prompt %d not 0/1", keep_system_prompt);
    if (atomic_load(&h->running)) return fail("rkllm_clear_kv_cache: a run is in progress");
    if ((start_pos == NULL) != (end_pos == NULL))
        return fail("rkllm_clear_kv_cache: start_pos and end_pos must both be NULL or both be set");
    pthread_mutex_lock(&g_lock);
    if (!start_pos) {
        h->history = 0; /* the double keeps no system prompt in its cache */
        h->paused = 0;
        pthread_mutex_unlock(&g_lock);
        return 0;
    }
    int s = start_pos[0], e = end_pos[0], hist = h->history, paused = h->paused;
    pthread_mutex_unlock(&g_lock);
    if (!paused)
        return fail("rkllm_clear_kv_cache: a range is only valid while generation is paused (callback returned 1)"
                    " in single-turn mode");
    if (s == e) return 0;
    if (s < 0 || s > e || e > hist)
        return fail("rkllm_clear_kv_cache: range [%d, %d) invalid for a cache of %d tokens", s, e, hist);
    pthread_mutex_lock(&g_lock);
    h->history -= e - s;
    pthread_mutex_unlock(&g_lock);
    return 0;
}

EXPORT int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    DHandle *h = get_handle(handle, "rkllm_get_kv_cache_size");
    if (!h) return -1;
    if (!cache_sizes) return fail("rkllm_get_kv_cache_size: cache_sizes is NULL");
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < h->param.extend_param.n_batch; i++) cache_sizes[i] = h->history; /* one per batch */
    pthread_mutex_unlock(&g_lock);
    return 0;
}

EXPORT int rkllm_destroy(LLMHandle handle) {
    DHandle *h = get_handle(handle, "rkllm_destroy");
    if (!h) return -1;
    if (atomic_load(&h->running))
        return fail("rkllm_destroy: a run is in progress (abort it and wait for rkllm_run to return first)");
    pthread_mutex_lock(&g_lock);
    h->alive = 0;
    free(h->model_path_copy);
    h->model_path_copy = NULL;
    h->param.model_path = NULL;
    for (int i = 0; i < 3; i++) {
        free(h->tmpl[i]);
        h->tmpl[i] = NULL;
    }
    pthread_mutex_unlock(&g_lock);
    return 0;
}

EXPORT int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                   const char *prompt_postfix) {
    DHandle *h = get_handle(handle, "rkllm_set_chat_template");
    if (!h) return -1;
    if (!system_prompt || !prompt_prefix || !prompt_postfix)
        return fail("rkllm_set_chat_template: NULL string (pass \"\" for an empty part)");
    if (atomic_load(&h->running)) return fail("rkllm_set_chat_template: a run is in progress");
    pthread_mutex_lock(&g_lock);
    const char *src[3] = {system_prompt, prompt_prefix, prompt_postfix};
    for (int i = 0; i < 3; i++) {
        free(h->tmpl[i]);
        h->tmpl[i] = strdup(src[i]);
    }
    Buf *b = &g_tmpl_json;
    buf_clear(b);
    buf_printf(b, "{\"system_prompt\":");
    buf_jstr(b, system_prompt);
    buf_printf(b, ",\"prompt_prefix\":");
    buf_jstr(b, prompt_prefix);
    buf_printf(b, ",\"prompt_postfix\":");
    buf_jstr(b, prompt_postfix);
    buf_printf(b, "}");
    publish(b, &g_tmpl_json_out);
    pthread_mutex_unlock(&g_lock);
    return 0;
}

EXPORT int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                    const char *tool_response_str) {
    (void)system_prompt, (void)tools, (void)tool_response_str;
    if (!get_handle(handle, "rkllm_set_function_tools")) return -1;
    return fail("rkllm_set_function_tools: not emulated");
}

EXPORT int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter) {
    (void)lora_adapter;
    if (!get_handle(handle, "rkllm_load_lora")) return -1;
    return fail("rkllm_load_lora: not emulated");
}

EXPORT int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path) {
    (void)prompt_cache_path;
    if (!get_handle(handle, "rkllm_load_prompt_cache")) return -1;
    return fail("rkllm_load_prompt_cache: not emulated");
}

EXPORT int rkllm_release_prompt_cache(LLMHandle handle) {
    if (!get_handle(handle, "rkllm_release_prompt_cache")) return -1;
    return fail("rkllm_release_prompt_cache: not emulated");
}

EXPORT int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params) {
    (void)cross_attn_params;
    if (!get_handle(handle, "rkllm_set_cross_attn_params")) return -1;
    return fail("rkllm_set_cross_attn_params: not emulated");
}

/* ------------------------------------------------------------------------------------------ */
/* Control / inspection API for tests (double_*)                                              */
/* ------------------------------------------------------------------------------------------ */

EXPORT int double_abi(void) { return RKLLM_ABI; }

EXPORT const char *double_last_run_json(void) {
    pthread_mutex_lock(&g_lock);
    const char *s = g_run_json_out ? g_run_json_out : "null";
    pthread_mutex_unlock(&g_lock);
    return s;
}

EXPORT const char *double_init_json(void) {
    pthread_mutex_lock(&g_lock);
    const char *s = g_init_json_out ? g_init_json_out : "null";
    pthread_mutex_unlock(&g_lock);
    return s;
}

EXPORT const char *double_chat_template_json(void) {
    pthread_mutex_lock(&g_lock);
    const char *s = g_tmpl_json_out ? g_tmpl_json_out : "null";
    pthread_mutex_unlock(&g_lock);
    return s;
}

EXPORT const char *double_last_error(void) {
    static char copy[sizeof g_last_error];
    pthread_mutex_lock(&g_err_lock);
    memcpy(copy, g_last_error, sizeof copy);
    pthread_mutex_unlock(&g_err_lock);
    return copy;
}

EXPORT void double_set_vocab(int vocab) {
    pthread_mutex_lock(&g_lock);
    g_vocab = vocab > 0 ? vocab : 0;
    pthread_mutex_unlock(&g_lock);
}

EXPORT const char *double_calls_json(void) {
    pthread_mutex_lock(&g_lock);
    size_t len = g_calls.len;
    char *s = malloc(len + 3);
    if (!s) abort();
    s[0] = '[';
    if (len) memcpy(s + 1, g_calls.s, len);
    s[len + 1] = ']';
    s[len + 2] = 0;
    free(g_calls_out);
    g_calls_out = s;
    pthread_mutex_unlock(&g_lock);
    return s;
}

EXPORT size_t double_calls_count(void) {
    pthread_mutex_lock(&g_lock);
    size_t n = g_n_calls;
    pthread_mutex_unlock(&g_lock);
    return n;
}

EXPORT unsigned long long double_logits_floats(void) {
    pthread_mutex_lock(&g_lock);
    unsigned long long n = g_logits_floats;
    pthread_mutex_unlock(&g_lock);
    return n;
}

/* GET_LOGITS rows from `fn` instead of the formula (NULL restores the formula); runs started afterwards use it. */
EXPORT void double_set_logits_provider(DoubleLogitsProvider fn, void *userdata) {
    pthread_mutex_lock(&g_lock);
    g_provider = fn;
    g_provider_ud = userdata;
    pthread_mutex_unlock(&g_lock);
}

EXPORT void double_logits_row(float *out, int vocab, uint32_t pos, uint32_t key) {
    if (out && vocab > 0) logits_row(out, vocab, pos, key);
}

EXPORT void double_set_hidden(int hidden) {
    pthread_mutex_lock(&g_lock);
    g_hidden = hidden > 0 ? hidden : 0;
    pthread_mutex_unlock(&g_lock);
}

EXPORT size_t double_copy_last_embed(float *out, size_t max_floats) {
    pthread_mutex_lock(&g_lock);
    size_t n = g_last_embed_len;
    if (out && g_last_embed) {
        if (n > max_floats) n = max_floats;
        memcpy(out, g_last_embed, n * sizeof(float));
    } else {
        n = out ? 0 : n; /* out == NULL: report the number available */
    }
    pthread_mutex_unlock(&g_lock);
    return n;
}

EXPORT size_t double_copy_last_tokens(int32_t *out, size_t max_tokens) {
    pthread_mutex_lock(&g_lock);
    size_t n = g_last_tokens_len;
    if (out && g_last_tokens) {
        if (n > max_tokens) n = max_tokens;
        memcpy(out, g_last_tokens, n * sizeof(int32_t));
    } else {
        n = out ? 0 : n;
    }
    pthread_mutex_unlock(&g_lock);
    return n;
}

EXPORT int double_history_tokens(void) {
    pthread_mutex_lock(&g_lock);
    int n = (g_last_handle && g_last_handle->alive) ? g_last_handle->history : -1;
    pthread_mutex_unlock(&g_lock);
    return n;
}

EXPORT void double_script_reset(void) {
    pthread_mutex_lock(&g_lock);
    script_reset_locked();
    pthread_mutex_unlock(&g_lock);
}

EXPORT int double_script_push(int32_t token_id, const char *text, int state) {
    if (state != RKLLM_RUN_NORMAL && state != RKLLM_RUN_WAITING && state != RKLLM_RUN_ERROR)
        return fail("double_script_push: state %d not NORMAL(0)/WAITING(1)/ERROR(3)", state);
    pthread_mutex_lock(&g_lock);
    if (g_script_len == g_script_cap) {
        size_t cap = g_script_cap ? g_script_cap * 2 : 64;
        Event *s = realloc(g_script, cap * sizeof *s);
        if (!s) abort();
        g_script = s;
        g_script_cap = cap;
    }
    Event *ev = &g_script[g_script_len++];
    ev->token_id = token_id;
    ev->text = text ? strdup(text) : NULL;
    ev->state = state;
    pthread_mutex_unlock(&g_lock);
    return 0;
}

EXPORT size_t double_script_pending(void) {
    pthread_mutex_lock(&g_lock);
    size_t n = g_script_len - g_script_pos;
    pthread_mutex_unlock(&g_lock);
    return n;
}

EXPORT void double_set_delay_us(int us) {
    pthread_mutex_lock(&g_lock);
    g_delay_us = us > 0 ? us : 0;
    pthread_mutex_unlock(&g_lock);
}

EXPORT void double_set_prefill_delay_us(int us) {
    pthread_mutex_lock(&g_lock);
    g_prefill_delay_us = us > 0 ? us : 0;
    pthread_mutex_unlock(&g_lock);
}

EXPORT void double_set_error_rc(int rc) {
    pthread_mutex_lock(&g_lock);
    g_error_rc = rc;
    pthread_mutex_unlock(&g_lock);
}

EXPORT void double_reset(void) {
    pthread_mutex_lock(&g_lock);
    script_reset_locked();
    g_delay_us = g_prefill_delay_us = g_hidden = g_error_rc = g_vocab = 0;
    g_provider = NULL;
    g_provider_ud = NULL;
    g_calls.len = 0;
    g_n_calls = 0;
    g_logits_floats = 0;
    free(g_last_embed);
    g_last_embed = NULL;
    g_last_embed_len = 0;
    free(g_last_tokens);
    g_last_tokens = NULL;
    g_last_tokens_len = 0;
    /* handed-out strings are not freed (a caller may still hold one); they become "null" */
    g_run_json_out = g_init_json_out = g_tmpl_json_out = NULL;
    g_run_json.len = g_init_json.len = g_tmpl_json.len = 0;
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_lock(&g_err_lock);
    g_last_error[0] = 0;
    pthread_mutex_unlock(&g_err_lock);
}

/* ---- layout introspection ---- */

typedef struct {
    const char *st, *field;
    long off;
} FieldOff;

#define F(T, f) {#T, #f, (long)offsetof(T, f)}
static const FieldOff FIELDS[] = {
    F(RKLLMExtendParam, base_domain_id), F(RKLLMExtendParam, embed_flash), F(RKLLMExtendParam, enabled_cpus_num),
    F(RKLLMExtendParam, enabled_cpus_mask), F(RKLLMExtendParam, n_batch), F(RKLLMExtendParam, use_cross_attn),
    F(RKLLMExtendParam, reserved),
    F(RKLLMParam, model_path), F(RKLLMParam, max_context_len), F(RKLLMParam, max_new_tokens), F(RKLLMParam, top_k),
    F(RKLLMParam, n_keep), F(RKLLMParam, top_p), F(RKLLMParam, temperature), F(RKLLMParam, repeat_penalty),
    F(RKLLMParam, frequency_penalty), F(RKLLMParam, presence_penalty), F(RKLLMParam, mirostat),
    F(RKLLMParam, mirostat_tau), F(RKLLMParam, mirostat_eta), F(RKLLMParam, skip_special_token),
#if RKLLM_ABI == 130
    F(RKLLMParam, ignore_eos_token),
#endif
    F(RKLLMParam, is_async),
#if RKLLM_ABI == 123
    F(RKLLMParam, img_start), F(RKLLMParam, img_end), F(RKLLMParam, img_content),
#endif
    F(RKLLMParam, extend_param),
    F(RKLLMEmbedInput, embed), F(RKLLMEmbedInput, n_tokens),
    F(RKLLMTokenInput, input_ids), F(RKLLMTokenInput, n_tokens),
    F(RKLLMInput, role), F(RKLLMInput, enable_thinking), F(RKLLMInput, input_type), F(RKLLMInput, prompt_input),
    F(RKLLMInput, embed_input), F(RKLLMInput, token_input), F(RKLLMInput, multimodal_input),
    F(RKLLMInferParam, mode), F(RKLLMInferParam, lora_params), F(RKLLMInferParam, prompt_cache_params),
#if RKLLM_ABI == 130
    F(RKLLMInferParam, sampling_params), F(RKLLMInferParam, max_new_tokens),
#endif
    F(RKLLMInferParam, keep_history),
#if RKLLM_ABI == 130
    F(RKLLMSamplingParam, top_k), F(RKLLMSamplingParam, top_p), F(RKLLMSamplingParam, temperature),
    F(RKLLMSamplingParam, repeat_penalty), F(RKLLMSamplingParam, frequency_penalty),
    F(RKLLMSamplingParam, presence_penalty), F(RKLLMSamplingParam, mirostat), F(RKLLMSamplingParam, mirostat_tau),
    F(RKLLMSamplingParam, mirostat_eta),
    F(RKLLMCallback, result_callback), F(RKLLMCallback, result_userdata), F(RKLLMCallback, tokenizer_callback),
    F(RKLLMCallback, tokenizer_userdata), F(RKLLMCallback, embed_callback), F(RKLLMCallback, embed_userdata),
    F(RKLLMMultiModalInput, prompt), F(RKLLMMultiModalInput, image), F(RKLLMMultiModalInput, video),
#else
    F(RKLLMMultiModalInput, prompt), F(RKLLMMultiModalInput, image_embed), F(RKLLMMultiModalInput, n_image_tokens),
    F(RKLLMMultiModalInput, n_image), F(RKLLMMultiModalInput, image_width), F(RKLLMMultiModalInput, image_height),
#endif
    F(RKLLMPerfStat, prefill_time_ms), F(RKLLMPerfStat, prefill_tokens), F(RKLLMPerfStat, generate_time_ms),
    F(RKLLMPerfStat, generate_tokens), F(RKLLMPerfStat, memory_usage_mb),
    F(RKLLMResult, text), F(RKLLMResult, token_id), F(RKLLMResult, last_hidden_layer), F(RKLLMResult, logits),
    F(RKLLMResult, perf),
    F(RKLLMResultLastHiddenLayer, hidden_states), F(RKLLMResultLastHiddenLayer, embd_size),
    F(RKLLMResultLastHiddenLayer, num_tokens),
    F(RKLLMResultLogits, logits), F(RKLLMResultLogits, vocab_size), F(RKLLMResultLogits, num_tokens),
    F(RKLLMLoraAdapter, lora_adapter_path), F(RKLLMLoraAdapter, lora_adapter_name), F(RKLLMLoraAdapter, scale),
    F(RKLLMLoraParam, lora_adapter_name),
    F(RKLLMPromptCacheParam, save_prompt_cache), F(RKLLMPromptCacheParam, prompt_cache_path),
};
#undef F

typedef struct {
    const char *name;
    size_t size;
} StructSize;

#define S(T) {#T, sizeof(T)}
static const StructSize SIZES[] = {
    S(RKLLMExtendParam), S(RKLLMParam), S(RKLLMLoraAdapter), S(RKLLMEmbedInput), S(RKLLMTokenInput),
    S(RKLLMMultiModalInput), S(RKLLMInput), S(RKLLMLoraParam), S(RKLLMPromptCacheParam), S(RKLLMCrossAttnParam),
#if RKLLM_ABI == 130
    S(RKLLMSamplingParam), S(RKLLMCallback),
#endif
    S(RKLLMInferParam), S(RKLLMResultLastHiddenLayer), S(RKLLMResultLogits), S(RKLLMPerfStat), S(RKLLMResult),
};
#undef S

EXPORT size_t double_sizeof(const char *struct_name) {
    if (!struct_name) return 0;
    for (size_t i = 0; i < sizeof SIZES / sizeof SIZES[0]; i++)
        if (strcmp(SIZES[i].name, struct_name) == 0) return SIZES[i].size;
    return 0;
}

EXPORT long double_offsetof(const char *struct_name, const char *field) {
    if (!struct_name || !field) return -1;
    for (size_t i = 0; i < sizeof FIELDS / sizeof FIELDS[0]; i++)
        if (strcmp(FIELDS[i].st, struct_name) == 0 && strcmp(FIELDS[i].field, field) == 0) return FIELDS[i].off;
    return -1;
}
