/* steplane: a split stage's steady decode step, read and answered in one native call each way.
 *
 * mesh/split/step_lane.py says when it is used and why (a step's Python runs on caches that the stage's
 * compute has just flushed: ~240 us a stage, against ~70 us here). This file only moves and checks bytes:
 * it never decides what a frame means. `take` accepts a record only when it is exactly the record the
 * generic path accepted last on the link except for its request id and step (same length, same header
 * bytes), its values are finite and its step is in bounds; anything else goes back to the generic path
 * untouched (RAW: not opened) or opened (OPENED: the plaintext, its counter used). `send` seals and sends
 * the answer whose header Python built, filling in the step, the compute time and the values.
 *
 * Records: u32 LE length + AES-256-GCM(nonce = u32 LE direction + u64 LE counter) of u32 LE request id +
 * payload, as mesh/split/tensor_link.py writes them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <openssl/evp.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define LENGTH_BYTES 4
#define TAG_BYTES 16
#define BUFFER_BYTES 65536 /* tensor_link.FIRST_READ: a decode step's record is read whole at once */
#define MAX_STEP 0x80000000u
#define STEP_AT 4          /* the step's offset in INPUT_HEAD and OUTPUT_HEAD */
#define MICROS_AT 20       /* the compute time's offset in OUTPUT_HEAD */
#define RAW 0
#define OPENED 1
#define CLOSED -1
#define TIMED_OUT -2

typedef struct {
    EVP_CIPHER_CTX *open_ctx, *seal_ctx;
    unsigned char in[BUFFER_BYTES], plain[BUFFER_BYTES], out[BUFFER_BYTES + LENGTH_BYTES + TAG_BYTES];
} Keys;

static const char KEYS[] = "shoal.steplane.keys";

static void keys_free(PyObject *capsule) {
    Keys *keys = PyCapsule_GetPointer(capsule, KEYS);
    if (keys == NULL) return;
    EVP_CIPHER_CTX_free(keys->open_ctx);
    EVP_CIPHER_CTX_free(keys->seal_ctx);
    PyMem_RawFree(keys);
}

/* keys(key: bytes[32]) -> capsule: one link end's AES-256-GCM contexts and buffers. */
static PyObject *make_keys(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer key;
    if (nargs != 1) return PyErr_Format(PyExc_TypeError, "keys(key)");
    if (PyObject_GetBuffer(args[0], &key, PyBUF_SIMPLE) < 0) return NULL;
    if (key.len != 32) {
        PyBuffer_Release(&key);
        return PyErr_Format(PyExc_ValueError, "a tensor link key has 32 bytes");
    }
    Keys *keys = PyMem_RawCalloc(1, sizeof(Keys));
    if (keys == NULL) { PyBuffer_Release(&key); return PyErr_NoMemory(); }
    keys->open_ctx = EVP_CIPHER_CTX_new();
    keys->seal_ctx = EVP_CIPHER_CTX_new();
    int ok = keys->open_ctx && keys->seal_ctx
        && EVP_DecryptInit_ex(keys->open_ctx, EVP_aes_256_gcm(), NULL, key.buf, NULL) == 1
        && EVP_EncryptInit_ex(keys->seal_ctx, EVP_aes_256_gcm(), NULL, key.buf, NULL) == 1;
    PyBuffer_Release(&key);
    PyObject *capsule = ok ? PyCapsule_New(keys, KEYS, keys_free) : NULL;
    if (capsule == NULL) {
        EVP_CIPHER_CTX_free(keys->open_ctx);
        EVP_CIPHER_CTX_free(keys->seal_ctx);
        PyMem_RawFree(keys);
        return ok ? NULL : PyErr_Format(PyExc_RuntimeError, "OpenSSL refused the AES-256-GCM key");
    }
    return capsule;
}

static void nonce(unsigned char out[12], uint32_t direction, uint64_t counter) {
    for (int i = 0; i < 4; i++) out[i] = (unsigned char)(direction >> (8 * i));
    for (int i = 0; i < 8; i++) out[4 + i] = (unsigned char)(counter >> (8 * i));
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* The first four arguments of every call: the socket, the link end's keys, the direction, the counter. */
static int link_args(PyObject *const *args, int *fd, Keys **keys, uint32_t *direction, uint64_t *counter) {
    *fd = (int)PyLong_AsLong(args[0]);
    *keys = PyCapsule_GetPointer(args[1], KEYS);
    *direction = (uint32_t)PyLong_AsUnsignedLong(args[2]);
    *counter = (uint64_t)PyLong_AsUnsignedLongLong(args[3]);
    return *keys != NULL && !PyErr_Occurred();
}

static PyObject *handed_back(int kind, const unsigned char *data, Py_ssize_t size) {
    return Py_BuildValue("(iy#)", kind, (const char *)data, size);
}

/* take(fd, keys, direction, counter, head, inputs) -> int | (RAW | OPENED, bytes)
 *
 * One recv (never waits: the caller saw the socket readable). `head`: the payload's header as the last
 * accepted record had it (INPUT_HEAD + its one sequence id), the step's 4 bytes ignored; `inputs`: a
 * writable float32 buffer of the step's values. Returns (request id << 32 | step) when the record was that
 * step (its values copied into `inputs`, the counter used); (RAW, bytes read) when it was not opened
 * (the counter unused: the generic reader takes the bytes, and fails the same way on a bad record); (OPENED,
 * plaintext) when it opened but is not such a step (the counter used). */
static PyObject *take(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    Keys *keys;
    uint32_t direction;
    uint64_t counter;
    if (nargs != 6) return PyErr_Format(PyExc_TypeError, "take(fd, keys, direction, counter, head, inputs)");
    if (!link_args(args, &fd, &keys, &direction, &counter)) return NULL;
    Py_buffer head, inputs;
    if (PyObject_GetBuffer(args[4], &head, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[5], &inputs, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&head);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t plain_size = 4 + head.len + inputs.len;
    ssize_t got = recv(fd, keys->in, BUFFER_BYTES, MSG_DONTWAIT);
    if (got <= 0) {  /* closed, or nothing after all: the generic reader finds out which */
        result = handed_back(RAW, keys->in, 0);
        goto done;
    }
    if (head.len < STEP_AT + 4 || plain_size + TAG_BYTES + LENGTH_BYTES != got
            || le32(keys->in) != (uint32_t)(plain_size + TAG_BYTES)) {
        result = handed_back(RAW, keys->in, got);
        goto done;
    }
    unsigned char iv[12];
    int size = 0, final = 0;
    nonce(iv, direction, counter);
    const unsigned char *sealed = keys->in + LENGTH_BYTES;
    if (EVP_DecryptInit_ex(keys->open_ctx, NULL, NULL, NULL, iv) != 1
            || EVP_DecryptUpdate(keys->open_ctx, keys->plain, &size, sealed, (int)plain_size) != 1
            || EVP_CIPHER_CTX_ctrl(keys->open_ctx, EVP_CTRL_GCM_SET_TAG, TAG_BYTES,
                                   (void *)(sealed + plain_size)) != 1
            || EVP_DecryptFinal_ex(keys->open_ctx, keys->plain + size, &final) != 1) {
        result = handed_back(RAW, keys->in, got);  /* the generic reader refuses it (and ends the link) */
        goto done;
    }
    const unsigned char *payload = keys->plain + 4;
    const unsigned char *want = head.buf;
    uint32_t step = le32(payload + STEP_AT);
    int same = memcmp(payload, want, STEP_AT) == 0
        && memcmp(payload + STEP_AT + 4, want + STEP_AT + 4, head.len - STEP_AT - 4) == 0
        && step <= MAX_STEP;
    const float *values = (const float *)(payload + head.len);
    Py_ssize_t count = inputs.len / (Py_ssize_t)sizeof(float);
    for (Py_ssize_t i = 0; same && i < count; i++) {
        float v;
        memcpy(&v, values + i, sizeof v);
        if (!isfinite(v)) same = 0;
    }
    if (!same) {
        result = handed_back(OPENED, keys->plain, plain_size);
        goto done;
    }
    memcpy(inputs.buf, values, inputs.len);
    result = PyLong_FromUnsignedLongLong((unsigned long long)le32(keys->plain) << 32 | step);
done:
    PyBuffer_Release(&head);
    PyBuffer_Release(&inputs);
    return result;
}

/* The lowest index of the row's largest value, NaN counting as largest (numpy's argmax). */
static Py_ssize_t argmax(const float *row, Py_ssize_t n) {
    Py_ssize_t best = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (isnan(row[i])) return i;
        if (row[i] > row[best]) best = i;
    }
    return best;
}

static int send_all(int fd, const unsigned char *data, size_t size, int timeout_ms) {
    size_t sent = 0;
    while (sent < size) {
        ssize_t n = send(fd, data + sent, size - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) { sent += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
        struct pollfd want = {fd, POLLOUT, 0};
        int ready;
        Py_BEGIN_ALLOW_THREADS
        ready = poll(&want, 1, timeout_ms);
        Py_END_ALLOW_THREADS
        if (ready == 0) return TIMED_OUT;
        if (ready < 0 && errno != EINTR) return -errno;
    }
    return 0;
}

/* send(fd, keys, direction, counter, request_id, head, step, micros_at, micros, argmax, values,
 *      closed_check, timeout_ms) -> int
 *
 * Seal and send u32 request id + `head` (with `step` at byte 4, and `micros` at `micros_at` unless it is
 * negative) + the values: `values` (float32, C order) as they are, or with `argmax` the row's argmax as
 * (int32 id, float32 value). With `closed_check`, first makes sure nothing came back on the socket (a link
 * used one way turns readable when the peer closed it): CLOSED (-1), nothing sealed. Else the counter is
 * used; returns 0, TIMED_OUT (-2) or -errno. */
static PyObject *send_step(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    Keys *keys;
    uint32_t direction;
    uint64_t counter;
    if (nargs != 13) return PyErr_Format(PyExc_TypeError, "send() takes 13 arguments");
    if (!link_args(args, &fd, &keys, &direction, &counter)) return NULL;
    uint32_t request_id = (uint32_t)PyLong_AsUnsignedLong(args[4]);
    uint32_t step = (uint32_t)PyLong_AsUnsignedLong(args[6]);
    long micros_at = PyLong_AsLong(args[7]);
    uint32_t micros = (uint32_t)PyLong_AsUnsignedLong(args[8]);
    int top_1 = PyObject_IsTrue(args[9]);
    int closed_check = PyObject_IsTrue(args[11]);
    int timeout_ms = (int)PyLong_AsLong(args[12]);
    if (PyErr_Occurred()) return NULL;
    if (closed_check) {
        struct pollfd back = {fd, POLLIN, 0};
        if (poll(&back, 1, 0) != 0) return PyLong_FromLong(CLOSED);
    }
    Py_buffer head, values;
    if (PyObject_GetBuffer(args[5], &head, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[10], &values, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&head);
        return NULL;
    }
    Py_ssize_t data_size = top_1 ? 8 : values.len;
    Py_ssize_t plain_size = 4 + head.len + data_size;
    if (head.len < STEP_AT + 4 || plain_size > BUFFER_BYTES
            || (micros_at >= 0 && micros_at + 4 > head.len) || (top_1 && values.len < 4)) {
        PyBuffer_Release(&head);
        PyBuffer_Release(&values);
        return PyErr_Format(PyExc_ValueError, "a steady step's answer does not fit its head");
    }
    unsigned char *plain = keys->out + LENGTH_BYTES;  /* sealed in place: GCM is a stream mode */
    put_le32(plain, request_id);
    memcpy(plain + 4, head.buf, head.len);
    put_le32(plain + 4 + STEP_AT, step);
    if (micros_at >= 0) put_le32(plain + 4 + micros_at, micros);
    unsigned char *data = plain + 4 + head.len;
    if (top_1) {
        const float *row = values.buf;
        Py_ssize_t best = argmax(row, values.len / (Py_ssize_t)sizeof(float));
        put_le32(data, (uint32_t)best);
        memcpy(data + 4, row + best, 4);
    } else {
        memcpy(data, values.buf, values.len);
    }
    PyBuffer_Release(&head);
    PyBuffer_Release(&values);
    unsigned char iv[12];
    int size = 0, final = 0;
    nonce(iv, direction, counter);
    if (EVP_EncryptInit_ex(keys->seal_ctx, NULL, NULL, NULL, iv) != 1
            || EVP_EncryptUpdate(keys->seal_ctx, plain, &size, plain, (int)plain_size) != 1
            || EVP_EncryptFinal_ex(keys->seal_ctx, plain + size, &final) != 1
            || EVP_CIPHER_CTX_ctrl(keys->seal_ctx, EVP_CTRL_GCM_GET_TAG, TAG_BYTES, plain + plain_size) != 1)
        return PyErr_Format(PyExc_RuntimeError, "OpenSSL could not seal a record");
    put_le32(keys->out, (uint32_t)(plain_size + TAG_BYTES));
    return PyLong_FromLong(send_all(fd, keys->out, LENGTH_BYTES + plain_size + TAG_BYTES, timeout_ms));
}

/* answer(fd, keys, direction, counter, head, request_id, vocab) -> int | None
 *
 * The origin's read of a steady step's answer: the argmax of one logits row (`head`: OUTPUT_HEAD as the
 * answer to the armed step has it; its step and compute time are not compared). Looks at the socket without
 * taking from it (MSG_PEEK) and takes the record only when it is that answer to `request_id`, with an id in
 * [0, vocab): then returns (id << 32 | compute µs) and the counter is used. Else None, with the socket as it
 * was, for the generic reader. */
static PyObject *answer(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    Keys *keys;
    uint32_t direction;
    uint64_t counter;
    if (nargs != 7) return PyErr_Format(PyExc_TypeError, "answer() takes 7 arguments");
    if (!link_args(args, &fd, &keys, &direction, &counter)) return NULL;
    uint32_t request_id = (uint32_t)PyLong_AsUnsignedLong(args[5]);
    uint32_t vocab = (uint32_t)PyLong_AsUnsignedLong(args[6]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer head;
    if (PyObject_GetBuffer(args[4], &head, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t plain_size = 4 + head.len + 8;
    ssize_t record = LENGTH_BYTES + plain_size + TAG_BYTES;
    ssize_t got = record < BUFFER_BYTES ? recv(fd, keys->in, record + 1, MSG_PEEK | MSG_DONTWAIT) : -1;
    int taken = 0;
    uint32_t id = 0, micros = 0;
    if (got == record && head.len >= MICROS_AT + 4 && le32(keys->in) == (uint32_t)(plain_size + TAG_BYTES)) {
        unsigned char iv[12];
        int size = 0, final = 0;
        nonce(iv, direction, counter);
        const unsigned char *sealed = keys->in + LENGTH_BYTES;
        const unsigned char *payload = keys->plain + 4;
        const unsigned char *want = head.buf;
        if (EVP_DecryptInit_ex(keys->open_ctx, NULL, NULL, NULL, iv) == 1
                && EVP_DecryptUpdate(keys->open_ctx, keys->plain, &size, sealed, (int)plain_size) == 1
                && EVP_CIPHER_CTX_ctrl(keys->open_ctx, EVP_CTRL_GCM_SET_TAG, TAG_BYTES,
                                       (void *)(sealed + plain_size)) == 1
                && EVP_DecryptFinal_ex(keys->open_ctx, keys->plain + size, &final) == 1
                && le32(keys->plain) == request_id
                && memcmp(payload, want, STEP_AT) == 0
                && memcmp(payload + STEP_AT + 4, want + STEP_AT + 4, MICROS_AT - STEP_AT - 4) == 0
                && memcmp(payload + MICROS_AT + 4, want + MICROS_AT + 4, head.len - MICROS_AT - 4) == 0) {
            id = le32(payload + head.len);
            micros = le32(payload + MICROS_AT);
            taken = id < vocab && recv(fd, keys->in, record, MSG_DONTWAIT) == record;
        }
    }
    PyBuffer_Release(&head);
    if (!taken) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong((unsigned long long)id << 32 | micros);
}

static PyMethodDef methods[] = {
    {"keys", (PyCFunction)(void (*)(void))make_keys, METH_FASTCALL, "AES-256-GCM contexts for one key."},
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL, "Read one steady step, or hand it back."},
    {"send", (PyCFunction)(void (*)(void))send_step, METH_FASTCALL, "Seal and send a steady step's answer."},
    {"answer", (PyCFunction)(void (*)(void))answer, METH_FASTCALL, "Take a steady step's argmax answer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_steplane", NULL, -1, methods};

PyMODINIT_FUNC PyInit__steplane(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "RAW", RAW) < 0 || PyModule_AddIntConstant(m, "OPENED", OPENED) < 0
            || PyModule_AddIntConstant(m, "CLOSED", CLOSED) < 0
            || PyModule_AddIntConstant(m, "TIMED_OUT", TIMED_OUT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
