/*
 * What native.py checks when it loads the library: the text of each status code, and the size and
 * field offsets of each struct it passes (ember.h), which must match its ctypes mirrors.
 */
#include "ember.h"

/* The status's name (e.g. "EMBER_E_TOPK") and what it says failed; NULL for a code that is none. */
const char *ember_status_name(int status) {
    switch (status) {
#define EMBER_STATUS_NAME(name, code, message) \
    case code: return #name;
        EMBER_STATUSES(EMBER_STATUS_NAME)
#undef EMBER_STATUS_NAME
    }
    return NULL;
}

const char *ember_status_message(int status) {
    switch (status) {
#define EMBER_STATUS_MESSAGE(name, code, message) \
    case code: return message;
        EMBER_STATUSES(EMBER_STATUS_MESSAGE)
#undef EMBER_STATUS_MESSAGE
    }
    return NULL;
}

typedef struct {
    const char *type, *field; /* field NULL: the struct's size */
    int64_t value;
} layout_entry;

#define SIZE(T) {#T, NULL, (int64_t)sizeof(T)}
#define FIELD(T, F) {#T, #F, (int64_t)offsetof(T, F)}
static const layout_entry layout[] = {
    SIZE(ember_linear),
    FIELD(ember_linear, packed),
    FIELD(ember_linear, d),
    FIELD(ember_linear, m),
    SIZE(ember_decode_layer),
    FIELD(ember_decode_layer, input_norm),
    FIELD(ember_decode_layer, post_norm),
    FIELD(ember_decode_layer, qkv),
    FIELD(ember_decode_layer, o_proj),
    FIELD(ember_decode_layer, gate_up),
    FIELD(ember_decode_layer, down),
    FIELD(ember_decode_layer, k_cache),
    FIELD(ember_decode_layer, v_cache),
    FIELD(ember_decode_layer, window),
    SIZE(ember_decode_step),
    FIELD(ember_decode_step, layers),
    FIELD(ember_decode_step, num_layers),
    FIELD(ember_decode_step, hidden),
    FIELD(ember_decode_step, heads),
    FIELD(ember_decode_step, kv_heads),
    FIELD(ember_decode_step, head_dim),
    FIELD(ember_decode_step, inter),
    FIELD(ember_decode_step, eps),
    FIELD(ember_decode_step, scale),
    FIELD(ember_decode_step, bf16_weights),
    FIELD(ember_decode_step, bf16_cache),
    FIELD(ember_decode_step, block_size),
    FIELD(ember_decode_step, rows),
    FIELD(ember_decode_step, rot),
    FIELD(ember_decode_step, table_width),
    FIELD(ember_decode_step, delta),
    FIELD(ember_decode_step, residual),
    FIELD(ember_decode_step, cos),
    FIELD(ember_decode_step, sin),
    FIELD(ember_decode_step, slots),
    FIELD(ember_decode_step, tables),
    FIELD(ember_decode_step, row_seq),
    FIELD(ember_decode_step, lens),
    FIELD(ember_decode_step, chunk_rows),
    FIELD(ember_decode_step, threads),
};
#undef SIZE
#undef FIELD

/* sizeof(type) (field NULL) or offsetof(type, field) in bytes; -1 for a type or field this build lacks. */
int64_t ember_layout(const char *type, const char *field) {
    for (size_t i = 0; i < sizeof layout / sizeof layout[0]; i++) {
        const layout_entry *e = &layout[i];
        if (strcmp(e->type, type) != 0) continue;
        if (field == NULL ? e->field == NULL : (e->field != NULL && strcmp(e->field, field) == 0)) return e->value;
    }
    return -1;
}

/* The name of field i (0, 1, ...) of `type`, in declaration order; NULL past its last. */
const char *ember_layout_field(const char *type, int64_t i) {
    for (size_t j = 0; j < sizeof layout / sizeof layout[0]; j++) {
        const layout_entry *e = &layout[j];
        if (e->field == NULL || strcmp(e->type, type) != 0) continue;
        if (i-- == 0) return e->field;
    }
    return NULL;
}
