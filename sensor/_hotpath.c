/* The BPF tiers' process records (fork, exec, exit) turned into table updates and ECS events
 * in C: the compiled twin of _on_fork, _on_exec and _on_exit in sensor/ebpf.py and of the
 * ProcessTable methods they call (fork, exec, exit, ecs).
 *
 * An exec storm brings three records per spawn, and in Python each one costs several
 * microseconds of interpreter overhead; the sensor's CPU budget is a quarter of auditd's.
 * This module does the same work on the same objects: the table's dicts, ProcessInfo
 * instances (whose slots it reads and writes directly), the same ECS fragment cache. Events
 * are the same dicts, in the same key order. Every other record type, and every rare path
 * (a process unknown to the table, argv missing, cwd unknown, a new cgroup), calls the
 * Python code, so there is one implementation of each of those.
 *
 * tests/bpf/test_hotpath.py feeds the same records to both paths and compares the events
 * (as JSON, so key order counts), the counters and the table. The sensor uses the Python path
 * when this module is not built (scripts/setup.sh builds it) or EDR_HOTPATH=0.
 *
 * Layouts come from bpf/events.h, the header the BPF programs are compiled with.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <linux/types.h>
#include <openssl/evp.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "bpf/events.h"

/* ProcessInfo's fields, in declaration order; init checks the class has exactly these. */
enum {
    F_PID,
    F_PPID,
    F_START_TICKS,
    F_ENTITY_ID,
    F_COMM,
    F_EXECUTABLE,
    F_ARGS,
    F_ARGS_TRUNCATED,
    F_CWD,
    F_UID,
    F_GID,
    F_LOGINUID,
    F_CONTAINER_ID,
    F_SHA256,
    F_EXIT_CODE,
    F_ECS_CACHE,
    F_ECS_LINE,
    F_COUNT,
};
static const char *const FIELD_NAMES[F_COUNT] = {
    "pid", "ppid", "start_ticks", "entity_id", "comm", "executable", "args", "args_truncated",
    "cwd", "uid", "gid", "loginuid", "container_id", "sha256", "exit_code", "ecs_cache",
    "ecs_line",
};

enum { A_FORK, A_EXEC, A_EXIT, A_COUNT };

typedef struct {
    PyObject_HEAD
    PyObject *src;          /* the TracepointSource */
    PyTypeObject *info_type; /* ProcessInfo */
    Py_ssize_t off[F_COUNT]; /* slot offsets in a ProcessInfo */
    PyObject *live;         /* table._live (dict) */
    PyObject *exited;       /* table._exited (OrderedDict) */
    PyObject *containers;   /* table._containers (dict) */
    PyObject *lock;         /* table._lock */
    PyObject *acquire, *release, *move_to_end, *popitem; /* their bound methods */
    int realpath_monotonic; /* the realpath cache runs on time.monotonic: hits read here */
    PyObject *table;
    PyObject *host;
    PyObject *tier;         /* str */
    PyObject *schema;       /* int */
    PyObject *skel[A_COUNT][3]; /* category list, type list, action str */
    PyObject *event_tpl[A_COUNT]; /* the action's "event" dict, copied per event */
    PyObject *edr_tpl;      /* {"tier", "schema"}, copied per event */
    /* Sub-dicts shared by the fragments of many processes, as the fragment's own sub-dicts
     * already are by the events of one process: nothing downstream mutates them. */
    PyObject *user_cache;   /* uid -> (name, loginuid, user dict) */
    PyObject *group_cache;  /* gid -> group dict */
    PyObject *parent_cache; /* ppid -> (entity_id, executable, args, comm, parent dict) */
    PyObject *by_tag;       /* dict int -> Python handler */
    PyObject *decode_error; /* DecodeError class */
    PyObject *unknown;      /* UNKNOWN */
    PyObject *user_names;   /* process_table._user_names */
    PyObject *user_name;    /* process_table.user_name */
    PyObject *resolve_path; /* capture.resolve_path */
    PyObject *realpath;     /* src._realpath */
    PyObject *proc_link, *proc_cmdline, *proc_loginuid;
    PyObject *emit;         /* ctx.emit, read by handle() when there is no pending list */
    PyObject *record_failed; /* src._record_failed(raw, exc) */
    PyObject *encode;       /* orjson.dumps: an object to JSON bytes */
    /* '","event":{..},"host":{..},"edr":{..},"process":' per action, for encoded lines */
    PyObject *line_prefix[A_COUNT];
    char id_prefix[256];
    Py_ssize_t id_prefix_len;
    int cgroup_ids_usable;
    long clk_tck;
    Py_ssize_t exited_kept;
    /* per handle() call */
    PyObject *pending;      /* list or NULL: emit through self->emit */
    PyObject *writes_by_pid;
    PyObject *boot_epoch;   /* int */
    long long boot_epoch_ns;
    int emit_forks, process;
    int lines; /* ctx.takes_lines: events go as encoded lines (see emit_line) */
    /* the lines not yet handed over: one chunk (see flush_lines) */
    char *lbuf;
    Py_ssize_t llen, lcap;
    PyObject *lcuts;              /* list [offset, executable, pid, ...] or NULL */
    Py_ssize_t lcount[A_COUNT];   /* lines per action in the chunk */
    /* the last second formatted by iso_timestamp */
    long long ts_sec;
    char ts_text[80];
    int ts_len;
} Hot;

/* interned strings */
static PyObject *s_kind, *s_event, *s_category, *s_type, *s_action, *s_timestamp, *s_host,
    *s_edr, *s_tier, *s_schema, *s_process, *s_pid, *s_entity_id, *s_name, *s_executable,
    *s_args, *s_args_count, *s_command_line, *s_args_truncated, *s_working_directory, *s_start,
    *s_parent, *s_user, *s_id, *s_audit, *s_group, *s_container, *s_hash, *s_sha256,
    *s_exit_code, *s_thread, *s_exit_signal, *s_space, *s_exe, *s_cwd, *s_acquire, *s_release,
    *s_move_to_end, *s_popitem, *s_lookup, *s_refresh_container, *s_container_for,
    *s_forget_writes, *s_cloexec_only, *s_boot_epoch_ns, *s_empty, *s__cache, *s_hits, *s_one;

#define SLOT(o, i) (*(PyObject **)((char *)(o) + self->off[i]))

static inline uint32_t rd32(const char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline int32_t rds32(const char *p) { int32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const char *p) { uint64_t v; memcpy(&v, p, 8); return v; }


/* Set a slot; steals nothing (takes a new reference to v). */
static void set_slot(Hot *self, PyObject *o, int i, PyObject *v)
{
    PyObject *old = SLOT(o, i);
    Py_INCREF(v);
    SLOT(o, i) = v;
    Py_XDECREF(old);
}

/* A ProcessInfo from the table that the C side can read: exactly that class, every slot set
 * (Python raises AttributeError on an unset slot; so does this). Checked once where an object
 * comes out of the table; slots are then read directly. */
static int usable(Hot *self, PyObject *o)
{
    if (Py_TYPE(o) != self->info_type) {
        PyErr_Format(PyExc_TypeError, "process table holds a %s, not a ProcessInfo",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    for (int i = 0; i < F_COUNT; i++) {
        if (SLOT(o, i) == NULL) {
            PyErr_Format(PyExc_AttributeError, "'%s' object has no attribute '%s'",
                         Py_TYPE(o)->tp_name, FIELD_NAMES[i]);
            return -1;
        }
    }
    return 0;
}

static PyObject *decode_error(Hot *self, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg != NULL) {
        PyErr_SetObject(self->decode_error, msg);
        Py_DECREF(msg);
    }
    return NULL;
}

/* _cstr: up to the first NUL, UTF-8 with undecodable bytes as \xNN escapes. */
static PyObject *cstr(const char *p, size_t max)
{
    const char *end = memchr(p, 0, max);
    return PyUnicode_DecodeUTF8(p, end ? end - p : (Py_ssize_t)max, "backslashreplace");
}

/* -- table helpers ------------------------------------------------------------------------- */

static int lock(Hot *self)
{
    PyObject *r = PyObject_CallNoArgs(self->acquire);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int unlock(Hot *self)
{
    PyObject *r = PyObject_CallNoArgs(self->release);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Release the lock on a failure path, keeping the failure's exception. */
static void unlock_on_error(Hot *self)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (unlock(self) < 0) { /* the first error is the one to report */
        PyErr_Clear();
    }
    PyErr_Restore(et, ev, tb);
}

/* ProcessTable.get: live, else recently exited, else NULL without an error (borrowed). */
static PyObject *table_get(Hot *self, PyObject *pid)
{
    PyObject *info = PyDict_GetItemWithError(self->live, pid);
    if (info == NULL && !PyErr_Occurred())
        info = PyDict_GetItemWithError(self->exited, pid);
    return info;
}

/* ProcessTable.lookup (new reference): the Python method reads /proc for unknown pids. */
static PyObject *table_lookup(Hot *self, PyObject *pid)
{
    PyObject *info = table_get(self, pid);
    if (info != NULL) {
        Py_INCREF(info);
    } else if (!PyErr_Occurred()) {
        info = PyObject_CallMethodOneArg(self->table, s_lookup, pid);
    }
    if (info != NULL && usable(self, info) < 0)
        Py_CLEAR(info);
    return info;
}

/* Fetched once at import: EVP_sha256() in a digest call is fetched and freed per call. */
static EVP_MD *sha256_md;

/* v in decimal at p; returns the end. Per-event formatting without printf's parsing. */
static char *put_decimal(char *p, unsigned long long v)
{
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

/* ProcessTable.entity_id: urlsafe base64 of sha256("<prefix><pid>:<start ticks>")[:18]. */
static PyObject *entity_id(Hot *self, unsigned long pid, unsigned long long start_ticks)
{
    static const char b64[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char buf[320];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    char out[24];
    memcpy(buf, self->id_prefix, self->id_prefix_len); /* at most 200 bytes (Hot_init) */
    char *end = put_decimal(buf + self->id_prefix_len, pid);
    *end++ = ':';
    end = put_decimal(end, start_ticks);
    if (!EVP_Digest(buf, (size_t)(end - buf), md, &mdlen, sha256_md, NULL)) {
        PyErr_SetString(PyExc_RuntimeError, "SHA-256 failed");
        return NULL;
    }
    for (int i = 0, j = 0; i < 18; i += 3, j += 4) {
        uint32_t v = (uint32_t)md[i] << 16 | (uint32_t)md[i + 1] << 8 | md[i + 2];
        out[j] = b64[v >> 18];
        out[j + 1] = b64[(v >> 12) & 63];
        out[j + 2] = b64[(v >> 6) & 63];
        out[j + 3] = b64[v & 63];
    }
    return PyUnicode_FromStringAndSize(out, 24);
}

/* backplane.schema.iso_timestamp: seconds formatted once per second, then the microseconds.
 * Nanoseconds are 128-bit: datetime reaches year 9999, beyond a long long of nanoseconds. */
/* backplane.schema.iso_timestamp into out (at least ISO_TS_MAX bytes): its length, or -1 */
#define ISO_TS_MAX 96
static Py_ssize_t iso_timestamp_buf(Hot *self, __int128 ns, char *out)
{
    __int128 sec = ns / 1000000000, us = ns / 1000;
    if (ns % 1000000000 < 0)
        sec -= 1; /* floor division, as Python's // */
    if (ns % 1000 < 0)
        us -= 1;
    us %= 1000000;
    if (us < 0)
        us += 1000000;
    if (sec != self->ts_sec || self->ts_text[0] == 0) {
        /* datetime's range: years 1 to 9999 */
        if (sec < -62135596800LL || sec > 253402300799LL) {
            PyErr_SetString(PyExc_ValueError, "timestamp is out of range");
            return -1;
        }
        time_t t = (time_t)sec;
        struct tm tm;
        if (gmtime_r(&t, &tm) == NULL) {
            PyErr_SetString(PyExc_OverflowError, "timestamp out of range");
            return -1;
        }
        int n = snprintf(self->ts_text, sizeof self->ts_text, "%04d-%02d-%02dT%02d:%02d:%02d",
                         tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                         tm.tm_sec);
        if (n < 0 || (size_t)n >= sizeof self->ts_text) {
            PyErr_SetString(PyExc_OverflowError, "timestamp out of range");
            return -1;
        }
        self->ts_len = n;
        self->ts_sec = (long long)sec;
    }
    /* the second's text, then ".uuuuuuZ" */
    memcpy(out, self->ts_text, self->ts_len);
    char *p = out + self->ts_len;
    *p++ = '.';
    for (int i = 5, v = (int)us; i >= 0; i--, v /= 10)
        p[i] = (char)('0' + v % 10);
    p[6] = 'Z';
    return self->ts_len + 8;
}

static PyObject *iso_timestamp(Hot *self, __int128 ns)
{
    char out[ISO_TS_MAX];
    Py_ssize_t n = iso_timestamp_buf(self, ns, out);
    return n < 0 ? NULL : PyUnicode_FromStringAndSize(out, n);
}

static PyObject *iso_timestamp_obj(Hot *self, PyObject *ns)
{
    /* divmod in Python integers: datetime's range is beyond a long long of nanoseconds */
    PyObject *giga = PyLong_FromLong(1000000000L);
    PyObject *qr = giga ? PyNumber_Divmod(ns, giga) : NULL;
    Py_XDECREF(giga);
    if (qr == NULL)
        return NULL;
    int overflow = 0;
    long long sec = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(qr, 0), &overflow);
    long long rem = PyLong_AsLongLong(PyTuple_GET_ITEM(qr, 1));
    Py_DECREF(qr);
    if (PyErr_Occurred())
        return NULL;
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "timestamp out of range");
        return NULL;
    }
    return iso_timestamp(self, (__int128)sec * 1000000000 + rem);
}

/* ProcessInfo.name: the executable's base name, else comm (new reference). */
static PyObject *info_name(Hot *self, PyObject *info)
{
    PyObject *exe = SLOT(info, F_EXECUTABLE);
    if (PyObject_IsTrue(exe) == 1) {
        if (!PyUnicode_Check(exe)) {
            PyErr_Format(PyExc_TypeError, "executable is a %s, not a str", Py_TYPE(exe)->tp_name);
            return NULL;
        }
        Py_ssize_t len = PyUnicode_GET_LENGTH(exe);
        Py_ssize_t slash = PyUnicode_FindChar(exe, '/', 0, len, -1);
        if (slash == -2)
            return NULL;
        return PyUnicode_Substring(exe, slash + 1, len);
    }
    return Py_NewRef(SLOT(info, F_COMM));
}

static int set_str(PyObject *d, PyObject *key, PyObject *value)
{
    /* steals value */
    if (value == NULL)
        return -1;
    int rc = PyDict_SetItem(d, key, value);
    Py_DECREF(value);
    return rc;
}

/* {key: value} (new reference) */
static PyObject *single(PyObject *key, PyObject *value)
{
    PyObject *d = PyDict_New();
    if (d != NULL && PyDict_SetItem(d, key, value) < 0)
        Py_CLEAR(d);
    return d;
}

/* {"id": str(value)} */
static PyObject *id_dict(PyObject *value)
{
    PyObject *text = PyObject_Str(value);
    if (text == NULL)
        return NULL;
    PyObject *d = single(s_id, text);
    Py_DECREF(text);
    return d;
}

/* The shared sub-dict caches: key -> (state..., dict), a dict reused while the state it was
 * built from is equal; a cache starts over when it reaches SHARED_CACHE_MAX entries. */
#define SHARED_CACHE_MAX 4096

/* The dict cached under key for this state (new reference); NULL without an exception when
 * there is none or its state differs. */
static PyObject *cache_get(PyObject *cache, PyObject *key, PyObject *const *state, int n)
{
    PyObject *hit = PyDict_GetItemWithError(cache, key);
    if (hit == NULL || !PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) != n + 1)
        return NULL;
    Py_INCREF(hit); /* the comparisons could run code that replaces the entry */
    int same = 1;
    for (int i = 0; i < n && same == 1; i++)
        same = PyObject_RichCompareBool(PyTuple_GET_ITEM(hit, i), state[i], Py_EQ);
    PyObject *d = same == 1 ? Py_NewRef(PyTuple_GET_ITEM(hit, n)) : NULL;
    Py_DECREF(hit);
    return d;
}

static int cache_put(PyObject *cache, PyObject *key, PyObject *const *state, int n, PyObject *d)
{
    PyObject *entry = PyTuple_New(n + 1);
    if (entry == NULL)
        return -1;
    for (int i = 0; i < n; i++)
        PyTuple_SET_ITEM(entry, i, Py_NewRef(state[i]));
    PyTuple_SET_ITEM(entry, n, Py_NewRef(d));
    if (PyDict_GET_SIZE(cache) >= SHARED_CACHE_MAX)
        PyDict_Clear(cache);
    int rc = PyDict_SetItem(cache, key, entry);
    Py_DECREF(entry);
    return rc;
}

/* process.start: boot_epoch_ns + start_ticks * 1_000_000_000 // CLK_TCK (new reference);
 * in C integers when the ticks fit, else in Python integers. */
static PyObject *start_time(Hot *self, PyObject *ticks)
{
    if (PyLong_CheckExact(ticks)) {
        int overflow = 0;
        long long t = PyLong_AsLongLongAndOverflow(ticks, &overflow);
        if (t == -1 && PyErr_Occurred())
            return NULL;
        if (!overflow && t >= 0)
            return iso_timestamp(self, (__int128)self->boot_epoch_ns +
                                           (__int128)t * 1000000000 / self->clk_tck);
    }
    PyObject *giga = PyLong_FromLong(1000000000L), *tck = PyLong_FromLong(self->clk_tck);
    PyObject *a = giga ? PyNumber_Multiply(ticks, giga) : NULL;
    PyObject *b = a && tck ? PyNumber_FloorDivide(a, tck) : NULL;
    PyObject *ns = b ? PyNumber_Add(self->boot_epoch, b) : NULL;
    Py_XDECREF(giga);
    Py_XDECREF(tck);
    Py_XDECREF(a);
    Py_XDECREF(b);
    if (ns == NULL)
        return NULL;
    PyObject *ts = iso_timestamp_obj(self, ns);
    Py_DECREF(ns);
    return ts;
}

/* process.parent (new reference): one dict per parent state, shared by its children's
 * fragments; an exec storm's children all have the same parent. */
static PyObject *parent_fields(Hot *self, PyObject *ppid, PyObject *parent)
{
    if (parent == NULL)
        return single(s_pid, ppid);
    PyObject *state[4] = {SLOT(parent, F_ENTITY_ID), SLOT(parent, F_EXECUTABLE),
                          SLOT(parent, F_ARGS), SLOT(parent, F_COMM)};
    PyObject *pfields = cache_get(self->parent_cache, ppid, state, 4);
    if (pfields != NULL || PyErr_Occurred())
        return pfields;
    pfields = single(s_pid, ppid);
    if (pfields == NULL || PyDict_SetItem(pfields, s_entity_id, state[0]) < 0 ||
        set_str(pfields, s_name, info_name(self, parent)) < 0)
        goto fail;
    int t = PyObject_IsTrue(state[1]);
    if (t < 0 || (t && PyDict_SetItem(pfields, s_executable, state[1]) < 0))
        goto fail;
    t = PyObject_IsTrue(state[2]);
    if (t < 0 ||
        (t && set_str(pfields, s_command_line, PyUnicode_Join(s_space, state[2])) < 0) ||
        cache_put(self->parent_cache, ppid, state, 4, pfields) < 0)
        goto fail;
    return pfields;
fail:
    Py_XDECREF(pfields);
    return NULL;
}

/* user (new reference): {"id", "name"?, "audit"?}, one dict per (uid, name, login uid). */
static PyObject *user_fields(Hot *self, PyObject *uid, PyObject *loginuid)
{
    PyObject *name = PyDict_GetItemWithError(self->user_names, uid);
    if (name != NULL)
        Py_INCREF(name);
    else if (!PyErr_Occurred())
        name = PyObject_CallOneArg(self->user_name, uid);
    if (name == NULL)
        return NULL;
    PyObject *state[2] = {name, loginuid};
    PyObject *user = cache_get(self->user_cache, uid, state, 2);
    if (user != NULL || PyErr_Occurred())
        goto out;
    user = id_dict(uid);
    if (user == NULL)
        goto out;
    int t = PyObject_IsTrue(name);
    if (t < 0 || (t && PyDict_SetItem(user, s_name, name) < 0) ||
        (loginuid != Py_None && set_str(user, s_audit, id_dict(loginuid)) < 0) ||
        cache_put(self->user_cache, uid, state, 2, user) < 0)
        Py_CLEAR(user);
out:
    Py_DECREF(name);
    return user;
}

/* group (new reference): {"id": str(gid)}, one dict per gid. */
static PyObject *group_fields(Hot *self, PyObject *gid)
{
    PyObject *group = cache_get(self->group_cache, gid, NULL, 0);
    if (group != NULL || PyErr_Occurred())
        return group;
    group = id_dict(gid);
    if (group != NULL && cache_put(self->group_cache, gid, NULL, 0, group) < 0)
        Py_CLEAR(group);
    return group;
}

/* ProcessTable._build_ecs */
static PyObject *build_ecs(Hot *self, PyObject *info, PyObject *parent)
{
    PyObject *proc = NULL, *pfields = NULL, *fields = NULL, *v, *user = NULL;
    proc = PyDict_New();
    if (proc == NULL)
        return NULL;
    if (PyDict_SetItem(proc, s_pid, SLOT(info, F_PID)) < 0 ||
        PyDict_SetItem(proc, s_entity_id, SLOT(info, F_ENTITY_ID)) < 0 ||
        set_str(proc, s_name, info_name(self, info)) < 0)
        goto fail;
    v = SLOT(info, F_EXECUTABLE);
    int t = PyObject_IsTrue(v);
    if (t < 0 || (t && PyDict_SetItem(proc, s_executable, v) < 0))
        goto fail;
    v = SLOT(info, F_ARGS);
    t = PyObject_IsTrue(v);
    if (t < 0)
        goto fail;
    if (t) {
        Py_ssize_t n = PyObject_Size(v);
        if (n < 0 || PyDict_SetItem(proc, s_args, v) < 0 ||
            set_str(proc, s_args_count, PyLong_FromSsize_t(n)) < 0 ||
            set_str(proc, s_command_line, PyUnicode_Join(s_space, v)) < 0)
            goto fail;
        t = PyObject_IsTrue(SLOT(info, F_ARGS_TRUNCATED));
        if (t < 0 || (t && PyDict_SetItem(proc, s_args_truncated, Py_True) < 0))
            goto fail;
    }
    v = SLOT(info, F_CWD);
    t = PyObject_IsTrue(v);
    if (t < 0 || (t && PyDict_SetItem(proc, s_working_directory, v) < 0))
        goto fail;
    v = SLOT(info, F_START_TICKS);
    t = PyObject_IsTrue(v);
    if (t < 0)
        goto fail;
    if (t && set_str(proc, s_start, start_time(self, v)) < 0)
        goto fail;
    pfields = parent_fields(self, SLOT(info, F_PPID), parent);
    if (pfields == NULL || PyDict_SetItem(proc, s_parent, pfields) < 0)
        goto fail;
    Py_CLEAR(pfields);
    fields = PyDict_New();
    if (fields == NULL || PyDict_SetItem(fields, s_process, proc) < 0)
        goto fail;
    Py_CLEAR(proc);
    v = SLOT(info, F_UID);
    if (v != Py_None) {
        user = user_fields(self, v, SLOT(info, F_LOGINUID));
        if (user == NULL || PyDict_SetItem(fields, s_user, user) < 0)
            goto fail;
        Py_CLEAR(user);
    }
    v = SLOT(info, F_GID);
    if (v != Py_None && set_str(fields, s_group, group_fields(self, v)) < 0)
        goto fail;
    v = SLOT(info, F_CONTAINER_ID);
    t = PyObject_IsTrue(v);
    if (t < 0)
        goto fail;
    if (t && set_str(fields, s_container, single(s_id, v)) < 0)
        goto fail;
    return fields;
fail:
    Py_XDECREF(proc);
    Py_XDECREF(pfields);
    Py_XDECREF(fields);
    Py_XDECREF(user);
    return NULL;
}

/* ProcessTable.ecs's cached fragment, rebuilt when its state changed (new reference). */
static PyObject *fragment(Hot *self, PyObject *info)
{
    PyObject *parent = NULL, *key = NULL, *frag = NULL;
    PyObject *ppid = SLOT(info, F_PPID);
    int t = PyObject_IsTrue(ppid);
    if (t < 0)
        return NULL;
    if (t) {
        parent = table_get(self, ppid);
        if (parent == NULL && PyErr_Occurred())
            return NULL;
        if (parent != NULL && usable(self, parent) < 0)
            return NULL;
    }
    key = PyTuple_Pack(9, SLOT(info, F_EXECUTABLE), SLOT(info, F_COMM), SLOT(info, F_CWD), ppid,
                       SLOT(info, F_CONTAINER_ID), parent ? parent : Py_None,
                       parent ? SLOT(parent, F_EXECUTABLE) : Py_None,
                       parent ? SLOT(parent, F_ARGS) : Py_None,
                       parent ? SLOT(parent, F_COMM) : Py_None);
    if (key == NULL)
        return NULL;
    PyObject *cached = SLOT(info, F_ECS_CACHE);
    int hit = 0;
    if (cached != Py_None) {
        if (!PyTuple_Check(cached) || PyTuple_GET_SIZE(cached) != 2) {
            PyErr_SetString(PyExc_TypeError, "ProcessInfo.ecs_cache is not a (key, fields) pair");
            goto fail;
        }
        hit = PyObject_RichCompareBool(PyTuple_GET_ITEM(cached, 0), key, Py_EQ);
        if (hit < 0)
            goto fail;
    }
    if (!hit) {
        PyObject *built = build_ecs(self, info, parent);
        if (built == NULL)
            goto fail;
        PyObject *pair = PyTuple_Pack(2, key, built);
        Py_DECREF(built);
        if (pair == NULL)
            goto fail;
        set_slot(self, info, F_ECS_CACHE, pair);
        Py_DECREF(pair);
        cached = pair; /* held by the slot */
    }
    Py_CLEAR(key);
    frag = Py_NewRef(PyTuple_GET_ITEM(cached, 1));
    if (!PyDict_Check(frag)) {
        PyErr_SetString(PyExc_TypeError, "ProcessInfo.ecs_cache fields are not a dict");
        goto fail;
    }
    return frag;
fail:
    Py_XDECREF(key);
    Py_XDECREF(frag);
    return NULL;
}

/* ProcessTable.ecs: the cached fragment (new reference) and, in *proc_out, a copy of its
 * "process" dict that this event extends (new reference). */
static PyObject *ecs(Hot *self, PyObject *info, PyObject **proc_out)
{
    PyObject *proc = NULL;
    PyObject *frag = fragment(self, info);
    if (frag == NULL)
        return NULL;
    PyObject *p = PyDict_GetItemWithError(frag, s_process);
    if (p == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, s_process);
        goto fail;
    }
    proc = PyDict_Copy(p);
    if (proc == NULL)
        goto fail;
    PyObject *sha = SLOT(info, F_SHA256);
    int t = PyObject_IsTrue(sha);
    if (t < 0)
        goto fail;
    if (t && set_str(proc, s_hash, single(s_sha256, sha)) < 0)
        goto fail;
    PyObject *code = SLOT(info, F_EXIT_CODE);
    if (code != Py_None && PyDict_SetItem(proc, s_exit_code, code) < 0)
        goto fail;
    *proc_out = proc;
    return frag;
fail:
    Py_XDECREF(frag);
    Py_XDECREF(proc);
    return NULL;
}

/* Source.event: backplane.schema.new_event plus the process fields (new reference). */
static PyObject *make_event(Hot *self, int action, PyObject *info, uint64_t ktime)
{
    PyObject *ev = NULL, *frag = NULL, *proc = NULL;
    __int128 epoch_ns = (__int128)self->boot_epoch_ns + (__int128)ktime;
    ev = PyDict_New();
    if (ev == NULL || set_str(ev, s_timestamp, iso_timestamp(self, epoch_ns)) < 0 ||
        set_str(ev, s_event, PyDict_Copy(self->event_tpl[action])) < 0 ||
        PyDict_SetItem(ev, s_host, self->host) < 0 ||
        set_str(ev, s_edr, PyDict_Copy(self->edr_tpl)) < 0)
        goto fail;
    /* the fragment's keys in its order, its "process" replaced by this event's copy (a
     * replaced value keeps its key's place) */
    frag = ecs(self, info, &proc);
    if (frag == NULL || PyDict_Update(ev, frag) < 0 || PyDict_SetItem(ev, s_process, proc) < 0)
        goto fail;
    Py_DECREF(frag);
    Py_DECREF(proc);
    return ev;
fail:
    Py_XDECREF(ev);
    Py_XDECREF(frag);
    Py_XDECREF(proc);
    return NULL;
}

/* Hand an event over: to the pending list, else to ctx.emit. Consumes the reference. */
static int deliver(Hot *self, PyObject *ev)
{
    int rc = 0;
    if (self->pending != NULL) {
        rc = PyList_Append(self->pending, ev);
    } else {
        PyObject *r = PyObject_CallOneArg(self->emit, ev);
        if (r == NULL)
            rc = -1;
        Py_XDECREF(r);
    }
    Py_DECREF(ev);
    return rc;
}

static int flush_lines(Hot *self);

/* Hand an event dict over, after the lines before it. Consumes the reference. */
static int emit(Hot *self, PyObject *ev)
{
    if (flush_lines(self) < 0) {
        Py_DECREF(ev);
        return -1;
    }
    return deliver(self, ev);
}

/* -- encoded lines ------------------------------------------------------------------------- */

/* With ctx.takes_lines (the pipeline writes NDJSON, no policy reads process events), a process
 * event goes over as its finished line, which the writer copies out: no event dict is built,
 * copied, encoded and freed per event. The line is byte for byte NdjsonSink's encoding of the
 * dict make_event builds (tests/bpf/test_hotpath.py checks it); the fragment's parts are
 * encoded once per fragment, so an exec and its exit share them. The lines of a batch go into
 * one buffer, handed over as one item (flush_lines) before any other event and at the end:
 *   (lines, cuts, counts)  lines: the NDJSON bytes; cuts: [offset, executable, pid, ...] for
 *                          each exec whose process.hash the writer inserts at offset
 *                          (EventPipeline._count_and_enrich); counts: {action: lines}.
 * A tuple, because a list in the pipeline's queue is a batch. Without a pending list (events
 * one by one to ctx.emit) each record's lines go at once, so a failing emit is that record's.
 * Anything else (a fragment or a value orjson refuses, an event with a field added by its
 * record) goes as a dict, so the rare paths keep one implementation. */

/* Hand the buffered lines over as one (lines, cuts, counts) item. */
static int flush_lines(Hot *self)
{
    if (self->llen == 0)
        return 0;
    PyObject *data = PyBytes_FromStringAndSize(self->lbuf, self->llen);
    PyObject *counts = PyDict_New(), *cuts = self->lcuts ? self->lcuts : PyList_New(0), *item;
    self->lcuts = NULL;
    self->llen = 0;
    int ok = data != NULL && counts != NULL && cuts != NULL;
    for (int a = 0; a < A_COUNT; a++) {
        if (ok && self->lcount[a] > 0) {
            PyObject *n = PyLong_FromSsize_t(self->lcount[a]);
            ok = n != NULL && PyDict_SetItem(counts, self->skel[a][2], n) == 0;
            Py_XDECREF(n);
        }
        self->lcount[a] = 0;
    }
    item = ok ? PyTuple_Pack(3, data, cuts, counts) : NULL;
    Py_XDECREF(data);
    Py_XDECREF(counts);
    Py_XDECREF(cuts);
    return item == NULL ? -1 : deliver(self, item);
}

/* Room for n more bytes in the line buffer. */
static char *line_room(Hot *self, Py_ssize_t n)
{
    if (self->llen + n > self->lcap) {
        Py_ssize_t cap = self->lcap ? self->lcap : 65536;
        while (cap < self->llen + n)
            cap *= 2;
        char *b = PyMem_Realloc(self->lbuf, cap);
        if (b == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        self->lbuf = b;
        self->lcap = cap;
    }
    return self->lbuf + self->llen;
}

static char *put(char *q, const void *p, size_t n)
{
    memcpy(q, p, n);
    return q + n;
}

/* encode(o): JSON object bytes (new reference); NULL with *refused set when encode raised
 * TypeError (orjson's JSONEncodeError: say, a lone surrogate), NULL alone on other errors. */
static PyObject *encode_object(Hot *self, PyObject *o, int *refused)
{
    PyObject *b = PyObject_CallOneArg(self->encode, o);
    if (b == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            *refused = 1;
        }
        return NULL;
    }
    Py_ssize_t n = PyBytes_Check(b) ? PyBytes_GET_SIZE(b) : 0;
    if (n < 2 || PyBytes_AS_STRING(b)[0] != '{' || PyBytes_AS_STRING(b)[n - 1] != '}') {
        Py_DECREF(b);
        PyErr_SetString(PyExc_TypeError, "Hot(encode=...) must turn a dict into JSON bytes");
        return NULL;
    }
    return b;
}

/* The fragment frag of info, encoded in two parts: open, its process object without the
 * closing brace; tail, that brace, the fragment's other keys and the line's end. Cached in
 * info's ecs_line slot as (frag, open, tail) while frag is the same object, (frag, None, None)
 * when it cannot be encoded. 1 with borrowed *open and *tail, 0 for "not as a line", -1 on
 * error. */
static int fragment_parts(Hot *self, PyObject *info, PyObject *frag, PyObject **open,
                          PyObject **tail)
{
    PyObject *c = SLOT(info, F_ECS_LINE);
    if (!(PyTuple_Check(c) && PyTuple_GET_SIZE(c) == 3 && PyTuple_GET_ITEM(c, 0) == frag)) {
        PyObject *proc = PyDict_GetItemWithError(frag, s_process);
        if (proc == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetObject(PyExc_KeyError, s_process);
            return -1;
        }
        PyObject *rest = PyDict_Copy(frag), *p = NULL, *r = NULL, *o = NULL, *t = NULL;
        int refused = 0;
        if (rest != NULL && PyDict_DelItem(rest, s_process) == 0 &&
            (p = encode_object(self, proc, &refused)) != NULL &&
            (r = encode_object(self, rest, &refused)) != NULL) {
            /* an empty process object would need no comma before its extras: as a dict */
            Py_ssize_t np = PyBytes_GET_SIZE(p), nr = PyBytes_GET_SIZE(r);
            refused = np <= 2;
            if (!refused && (o = PyBytes_FromStringAndSize(PyBytes_AS_STRING(p), np - 1)) &&
                (t = PyBytes_FromStringAndSize(NULL, nr > 2 ? nr + 2 : 3))) {
                char *q = PyBytes_AS_STRING(t);
                *q++ = '}';
                if (nr > 2) {
                    *q++ = ',';
                    q = put(q, PyBytes_AS_STRING(r) + 1, nr - 2);
                }
                *q++ = '}';
                *q = '\n';
            }
        }
        c = refused ? PyTuple_Pack(3, frag, Py_None, Py_None)
            : t     ? PyTuple_Pack(3, frag, o, t)
                    : NULL;
        Py_XDECREF(rest);
        Py_XDECREF(p);
        Py_XDECREF(r);
        Py_XDECREF(o);
        Py_XDECREF(t);
        if (c == NULL)
            return -1;
        set_slot(self, info, F_ECS_LINE, c);
        Py_DECREF(c); /* held by the slot */
    }
    if (PyTuple_GET_ITEM(c, 1) == Py_None)
        return 0;
    *open = PyTuple_GET_ITEM(c, 1);
    *tail = PyTuple_GET_ITEM(c, 2);
    return 1;
}

/* process.hash as make_event writes it, when sha is a hex digest; 0 otherwise (then the
 * event goes as a dict, whose encoder handles any value). */
static int hex_digest(PyObject *sha, const char **s, Py_ssize_t *n)
{
    if (!PyUnicode_CheckExact(sha) || !PyUnicode_IS_ASCII(sha))
        return 0;
    *n = PyUnicode_GET_LENGTH(sha);
    *s = (const char *)PyUnicode_DATA(sha);
    if (*n > 128)
        return 0;
    for (Py_ssize_t i = 0; i < *n; i++) {
        char ch = (*s)[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F')))
            return 0;
    }
    return 1;
}

/* make_event, encoded into the line buffer: 1 done, 0 not as a line (the caller builds the
 * dict), -1 error. */
static int emit_line(Hot *self, int action, PyObject *info, uint64_t ktime)
{
    static const char ts_key[] = "{\"@timestamp\":\"", hash_a[] = ",\"hash\":{\"sha256\":\"",
                      hash_b[] = "\"}";
    PyObject *frag, *open, *tail;
    char ts[ISO_TS_MAX], code[40];
    const char *sha_s = NULL;
    Py_ssize_t sha_n = 0, ts_n, code_n = 0;

    /* what a line cannot hold goes as a dict, whose encoder decides */
    PyObject *sha = SLOT(info, F_SHA256);
    int has_sha = PyObject_IsTrue(sha);
    if (has_sha < 0)
        return -1;
    if (has_sha && !hex_digest(sha, &sha_s, &sha_n))
        return 0;
    PyObject *exit_code = SLOT(info, F_EXIT_CODE);
    if (exit_code != Py_None) {
        int overflow = 1;
        long long v = 0;
        if (PyLong_CheckExact(exit_code)) /* not a bool, which encodes as true or false */
            v = PyLong_AsLongLongAndOverflow(exit_code, &overflow);
        if (overflow)
            return 0;
        code_n = snprintf(code, sizeof code, ",\"exit_code\":%lld", v);
    }
    frag = fragment(self, info);
    if (frag == NULL)
        return -1;
    int rc = fragment_parts(self, info, frag, &open, &tail);
    Py_DECREF(frag);
    if (rc <= 0)
        return rc;
    Py_INCREF(open); /* the slot is replaced when the fragment changes */
    Py_INCREF(tail);
    rc = -1;
    ts_n = iso_timestamp_buf(self, (__int128)self->boot_epoch_ns + (__int128)ktime, ts);
    if (ts_n < 0)
        goto out;
    PyObject *prefix = self->line_prefix[action];
    Py_ssize_t n_head = (Py_ssize_t)sizeof ts_key - 1 + ts_n + PyBytes_GET_SIZE(prefix) +
                        PyBytes_GET_SIZE(open);
    Py_ssize_t n_hash = has_sha ? (Py_ssize_t)(sizeof hash_a - 1 + sha_n + sizeof hash_b - 1) : 0;
    char *q = line_room(self, n_head + n_hash + code_n + PyBytes_GET_SIZE(tail));
    if (q == NULL)
        goto out;
    q = put(q, ts_key, sizeof ts_key - 1);
    q = put(q, ts, ts_n);
    q = put(q, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix));
    q = put(q, PyBytes_AS_STRING(open), PyBytes_GET_SIZE(open));
    if (has_sha) { /* make_event: hash, then exit_code */
        q = put(q, hash_a, sizeof hash_a - 1);
        q = put(q, sha_s, sha_n);
        q = put(q, hash_b, sizeof hash_b - 1);
    }
    q = put(q, code, code_n);
    if (action == A_EXEC && !has_sha) {
        /* the writer adds the digest here, after exit_code as on the dict */
        PyObject *off = PyLong_FromSsize_t(q - self->lbuf);
        if (off == NULL)
            goto out;
        if (self->lcuts == NULL && (self->lcuts = PyList_New(0)) == NULL) {
            Py_DECREF(off);
            goto out;
        }
        int bad = PyList_Append(self->lcuts, off) < 0 ||
                  PyList_Append(self->lcuts, SLOT(info, F_EXECUTABLE)) < 0 ||
                  PyList_Append(self->lcuts, SLOT(info, F_PID)) < 0;
        Py_DECREF(off);
        if (bad) {
            /* the cut list is the chunk's: take its partial entry back out */
            Py_ssize_t n = PyList_GET_SIZE(self->lcuts);
            PyList_SetSlice(self->lcuts, n - n % 3, n, NULL);
            goto out;
        }
    }
    q = put(q, PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail));
    self->llen = q - self->lbuf;
    self->lcount[action]++;
    rc = 1;
out:
    Py_DECREF(open);
    Py_DECREF(tail);
    return rc;
}

static int forget_writes(Hot *self, PyObject *pid, int cloexec_only)
{
    int has = PyDict_Contains(self->writes_by_pid, pid);
    if (has <= 0)
        return has;
    PyObject *meth = PyObject_GetAttr(self->src, s_forget_writes);
    if (meth == NULL)
        return -1;
    PyObject *r;
    if (cloexec_only) {
        PyObject *args[2] = {pid, Py_True};
        PyObject *names = PyTuple_Pack(1, s_cloexec_only);
        r = names ? PyObject_Vectorcall(meth, args, 1, names) : NULL;
        Py_XDECREF(names);
    } else {
        r = PyObject_CallOneArg(meth, pid);
    }
    Py_DECREF(meth);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* -- records ------------------------------------------------------------------------------- */

/* RealpathCache.__call__ (sensor/ebpf.py): a fresh hit is answered here, counted in the
 * cache's ``hits``; anything else (a miss, an expired entry, a test's clock) calls it. */
static PyObject *resolve_links(Hot *self, PyObject *path)
{
    if (self->realpath_monotonic) {
        PyObject *cache = PyObject_GetAttr(self->realpath, s__cache); /* replaced on trims */
        if (cache == NULL)
            return NULL;
        PyObject *hit = PyDict_Check(cache) ? PyDict_GetItemWithError(cache, path) : NULL;
        if (hit != NULL && PyTuple_Check(hit) && PyTuple_GET_SIZE(hit) == 2 &&
            PyFloat_Check(PyTuple_GET_ITEM(hit, 1))) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
            if (PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(hit, 1)) > now) {
                PyObject *resolved = Py_NewRef(PyTuple_GET_ITEM(hit, 0));
                Py_DECREF(cache);
                PyObject *hits = PyObject_GetAttr(self->realpath, s_hits);
                PyObject *one = hits ? PyNumber_Add(hits, s_one) : NULL;
                int rc = one ? PyObject_SetAttr(self->realpath, s_hits, one) : -1;
                Py_XDECREF(hits);
                Py_XDECREF(one);
                if (rc < 0) {
                    Py_DECREF(resolved);
                    return NULL;
                }
                return resolved;
            }
        }
        Py_DECREF(cache);
        if (PyErr_Occurred())
            return NULL;
    }
    return PyObject_CallOneArg(self->realpath, path);
}

/* Build the action's event for info and hand it over. With outer set, ev[outer][key] = value
 * first; value is consumed, and NULL there is the failure of the call that made it. */
static int emit_event(Hot *self, int action, PyObject *info, uint64_t ktime, PyObject *outer,
                      PyObject *key, PyObject *value)
{
    PyObject *ev = NULL;
    int rc = -1;
    if (outer != NULL && value == NULL)
        return -1;
    if (outer == NULL && self->lines) {
        rc = emit_line(self, action, info, ktime);
        if (rc != 0)
            return rc < 0 ? -1 : 0;
        rc = -1;
    }
    ev = make_event(self, action, info, ktime);
    if (ev == NULL)
        goto out;
    if (outer != NULL) {
        PyObject *inner = PyDict_GetItemWithError(ev, outer);
        if (inner == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetObject(PyExc_KeyError, outer);
            goto out;
        }
        if (PyObject_SetItem(inner, key, value) < 0)
            goto out;
    }
    rc = emit(self, ev); /* consumes ev */
    ev = NULL;
out:
    Py_XDECREF(ev);
    Py_XDECREF(value);
    return rc;
}

/* _check_size: a record shorter than its type's layout is a decode error. */
static int too_short(Hot *self, const char *what, Py_ssize_t len, Py_ssize_t need)
{
    if (len >= need)
        return 0;
    decode_error(self, "%s record is %zd bytes, expected at least %zd", what, len, need);
    return 1;
}

static int rec_fork(Hot *self, const char *raw, Py_ssize_t len)
{
    if (too_short(self, "fork", len, sizeof(struct edr_fork_event)))
        return -1;
    const char *b = raw;
    uint32_t ppid_v = rd32(b + offsetof(struct edr_fork_event, ppid));
    uint32_t pid_v = rd32(b + offsetof(struct edr_fork_event, child_pid));
    uint64_t start_v = rd64(b + offsetof(struct edr_fork_event, child_start_ticks));
    uint32_t flags = rd32(b + offsetof(struct edr_fork_event, flags));
    uint64_t ktime = rd64(b + offsetof(struct edr_header, ktime_ns));
    PyObject *ppid = PyLong_FromUnsignedLong(ppid_v), *pid = PyLong_FromUnsignedLong(pid_v);
    PyObject *start = PyLong_FromUnsignedLongLong(start_v), *eid = NULL, *child = NULL;
    int rc = -1, locked = 0;
    if (ppid == NULL || pid == NULL || start == NULL)
        goto out;
    /* ProcessTable.fork */
    if (lock(self) < 0)
        goto out;
    locked = 1;
    PyObject *parent = PyDict_GetItemWithError(self->live, ppid);
    if (parent == NULL && PyErr_Occurred())
        goto out;
    if (parent != NULL && usable(self, parent) < 0)
        goto out;
    eid = entity_id(self, pid_v, start_v);
    if (eid == NULL)
        goto out;
    child = self->info_type->tp_alloc(self->info_type, 0);
    if (child == NULL)
        goto out;
    set_slot(self, child, F_PID, pid);
    set_slot(self, child, F_PPID, ppid);
    set_slot(self, child, F_START_TICKS, start);
    set_slot(self, child, F_ENTITY_ID, eid);
    set_slot(self, child, F_SHA256, Py_None);
    set_slot(self, child, F_EXIT_CODE, Py_None);
    set_slot(self, child, F_ECS_CACHE, Py_None);
    set_slot(self, child, F_ECS_LINE, Py_None);
    if (parent != NULL) {
        static const int inherited[] = {F_COMM, F_EXECUTABLE, F_ARGS, F_ARGS_TRUNCATED, F_CWD,
                                        F_UID, F_GID, F_LOGINUID, F_CONTAINER_ID, F_SHA256};
        for (size_t i = 0; i < sizeof inherited / sizeof inherited[0]; i++)
            set_slot(self, child, inherited[i], SLOT(parent, inherited[i]));
    } else {
        PyObject *args = PyList_New(0);
        if (args == NULL)
            goto out;
        set_slot(self, child, F_ARGS, args);
        Py_DECREF(args);
        set_slot(self, child, F_COMM, s_empty);
        set_slot(self, child, F_EXECUTABLE, Py_None);
        set_slot(self, child, F_ARGS_TRUNCATED, Py_False);
        set_slot(self, child, F_CWD, Py_None);
        set_slot(self, child, F_UID, Py_None);
        set_slot(self, child, F_GID, Py_None);
        set_slot(self, child, F_LOGINUID, Py_None);
        set_slot(self, child, F_CONTAINER_ID, Py_None);
    }
    if (PyDict_SetItem(self->live, pid, child) < 0)
        goto out;
    locked = 0;
    if (unlock(self) < 0)
        goto out;
    if (flags & EDR_FORK_INTO_CGROUP) {
        PyObject *r = PyObject_CallMethodOneArg(self->table, s_refresh_container, pid);
        if (r == NULL)
            goto out;
        Py_DECREF(r);
    }
    if (self->emit_forks && self->process &&
        emit_event(self, A_FORK, child, ktime, NULL, NULL, NULL) < 0)
        goto out;
    rc = 0;
out:
    if (locked)
        unlock_on_error(self);
    Py_XDECREF(ppid);
    Py_XDECREF(pid);
    Py_XDECREF(start);
    Py_XDECREF(eid);
    Py_XDECREF(child);
    return rc;
}

static int is_abs(PyObject *path)
{
    return PyUnicode_Check(path) && PyUnicode_GET_LENGTH(path) > 0 &&
           PyUnicode_READ_CHAR(path, 0) == '/';
}

/* Is os.path.normpath(path) == path for this absolute path? (no //, /./, /../, trailing /) */
static int is_normal_abs(const char *p, Py_ssize_t n)
{
    if (n < 1 || p[0] != '/')
        return 0;
    if (n == 1)
        return 1;
    if (p[n - 1] == '/')
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] != '/')
            continue;
        const char *seg = p + i + 1;
        Py_ssize_t rest = n - i - 1;
        if (rest > 0 && seg[0] == '/')
            return 0;
        if (rest >= 1 && seg[0] == '.' && (rest == 1 || seg[1] == '/'))
            return 0;
        if (rest >= 2 && seg[0] == '.' && seg[1] == '.' && (rest == 2 || seg[2] == '/'))
            return 0;
    }
    return 1;
}

/* split_args: NUL-separated strings, the empty string after a last NUL dropped. */
static PyObject *split_args(const char *buf, size_t size, uint32_t count)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    size_t pos = 0;
    uint32_t taken = 0;
    while (pos <= size && taken < count) {
        const char *nul = memchr(buf + pos, 0, size - pos);
        size_t end = nul ? (size_t)(nul - buf) : size;
        if (nul == NULL && end == pos)
            break; /* nothing after the last NUL (or an empty buffer) */
        PyObject *s = PyUnicode_DecodeUTF8(buf + pos, end - pos, "backslashreplace");
        if (s == NULL || PyList_Append(out, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(s);
        taken++;
        if (nul == NULL)
            break;
        pos = end + 1;
    }
    return out;
}

static int rec_exec(Hot *self, const char *raw, Py_ssize_t len)
{
    const Py_ssize_t fixed = offsetof(struct edr_exec_event, args);
    if (too_short(self, "exec", len, fixed))
        return -1;
    const char *b = raw;
    uint32_t pid_v = rd32(b + offsetof(struct edr_header, pid));
    uint32_t uid_v = rd32(b + offsetof(struct edr_header, uid));
    uint32_t gid_v = rd32(b + offsetof(struct edr_header, gid));
    uint64_t ktime = rd64(b + offsetof(struct edr_header, ktime_ns));
    uint32_t old_pid = rd32(b + offsetof(struct edr_exec_event, old_pid));
    uint32_t flags = rd32(b + offsetof(struct edr_exec_event, flags));
    uint32_t count = rd32(b + offsetof(struct edr_exec_event, args_count));
    uint32_t size = rd32(b + offsetof(struct edr_exec_event, args_size));
    uint64_t cgroup_id = rd64(b + offsetof(struct edr_exec_event, cgroup_id));
    uint32_t loginuid_v = rd32(b + offsetof(struct edr_exec_event, loginuid));
    if (size > EDR_ARGS_MAX_BYTES || count > EDR_ARGS_MAX_COUNT) {
        decode_error(self, "exec record claims %u args in %u bytes, beyond the bounds", count,
                     size);
        return -1;
    }
    if (too_short(self, "exec", len, fixed + (Py_ssize_t)size))
        return -1;
    PyObject *args = NULL, *comm = NULL, *filename = NULL, *pid = NULL, *uid = NULL, *gid = NULL;
    PyObject *loginuid = NULL, *exe = NULL, *info = NULL, *tmp = NULL, *argv = NULL;
    int rc = -1, locked = 0, t;
    if (!(flags & EDR_EXEC_NO_ARGS)) {
        int block = (flags & EDR_EXEC_ARGS_BLOCK) != 0; /* uncounted: keep the first MAX */
        args = split_args(b + fixed, size, block ? EDR_ARGS_MAX_COUNT + 1 : count);
        if (args == NULL)
            goto out;
        if (block && PyList_GET_SIZE(args) > EDR_ARGS_MAX_COUNT) {
            if (PyList_SetSlice(args, EDR_ARGS_MAX_COUNT, PY_SSIZE_T_MAX, NULL) < 0)
                goto out;
            flags |= EDR_EXEC_ARGS_TRUNCATED;
        }
    } else {
        args = Py_NewRef(Py_None);
    }
    comm = cstr(b + offsetof(struct edr_header, comm), EDR_COMM_LEN);
    filename = cstr(b + offsetof(struct edr_exec_event, filename), EDR_PATH_LEN);
    pid = PyLong_FromUnsignedLong(pid_v);
    uid = PyLong_FromUnsignedLong(uid_v);
    gid = PyLong_FromUnsignedLong(gid_v);
    if (comm == NULL || filename == NULL || pid == NULL || uid == NULL || gid == NULL)
        goto out;
    PyObject *args_truncated = flags & EDR_EXEC_ARGS_TRUNCATED ? Py_True : Py_False;
    if (!(flags & EDR_EXEC_HAVE_LOGINUID))
        loginuid = Py_NewRef(self->unknown);
    else if (loginuid_v == 0xFFFFFFFFu)
        loginuid = Py_NewRef(Py_None);
    else if ((loginuid = PyLong_FromUnsignedLong(loginuid_v)) == NULL)
        goto out;

    /* the executable: resolved against cwd, symlinks resolved (cached) */
    if (PyUnicode_GET_LENGTH(filename) > 0) {
        Py_ssize_t n;
        const char *p = PyUnicode_AsUTF8AndSize(filename, &n);
        if (p == NULL)
            goto out;
        if (is_normal_abs(p, n)) {
            exe = Py_NewRef(filename);
        } else {
            PyObject *known = table_get(self, pid);
            if (known == NULL && PyErr_Occurred())
                goto out;
            PyObject *cwd = Py_None;
            if (known != NULL) {
                if (usable(self, known) < 0)
                    goto out;
                cwd = SLOT(known, F_CWD);
            }
            exe = PyObject_CallFunctionObjArgs(self->resolve_path, filename, cwd, NULL);
            if (exe == NULL)
                goto out;
        }
        if (is_abs(exe)) {
            Py_SETREF(exe, resolve_links(self, exe));
            if (exe == NULL)
                goto out;
        }
        if (!is_abs(exe))
            Py_SETREF(exe, Py_NewRef(Py_None));
    } else {
        exe = Py_NewRef(Py_None);
    }

    /* ProcessTable.exec(refresh=False, cgroups_tracked=True) */
    info = table_lookup(self, pid);
    if (info == NULL)
        goto out;
    if (lock(self) < 0)
        goto out;
    locked = 1;
    if (exe != Py_None) {
        set_slot(self, info, F_EXECUTABLE, exe);
    } else {
        tmp = PyObject_CallFunctionObjArgs(self->proc_link, pid, s_exe, NULL);
        if (tmp == NULL || (t = PyObject_IsTrue(tmp)) < 0)
            goto out;
        if (t)
            set_slot(self, info, F_EXECUTABLE, tmp);
        Py_CLEAR(tmp);
    }
    if (args == Py_None) {
        argv = PyObject_CallOneArg(self->proc_cmdline, pid);
        if (argv == NULL)
            goto out;
        if (argv != Py_None) {
            PyObject *a, *tr;
            if (!PyArg_ParseTuple(argv, "OO", &a, &tr))
                goto out;
            Py_SETREF(args, Py_NewRef(a));
            args_truncated = tr;
        }
    }
    if (args != Py_None) {
        set_slot(self, info, F_ARGS, args);
        set_slot(self, info, F_ARGS_TRUNCATED, args_truncated);
    }
    if (PyUnicode_GET_LENGTH(comm) > 0) {
        set_slot(self, info, F_COMM, comm);
    } else {
        t = PyObject_IsTrue(SLOT(info, F_COMM));
        if (t < 0)
            goto out;
        if (!t) {
            tmp = info_name(self, info);
            if (tmp == NULL)
                goto out;
            set_slot(self, info, F_COMM, tmp);
            Py_CLEAR(tmp);
        }
    }
    set_slot(self, info, F_UID, uid);
    set_slot(self, info, F_GID, gid);
    set_slot(self, info, F_SHA256, Py_None);
    set_slot(self, info, F_ECS_CACHE, Py_None);
    set_slot(self, info, F_ECS_LINE, Py_None);
    if (SLOT(info, F_CWD) == Py_None) {
        tmp = PyObject_CallFunctionObjArgs(self->proc_link, pid, s_cwd, NULL);
        if (tmp == NULL)
            goto out;
        if (tmp != Py_None)
            set_slot(self, info, F_CWD, tmp);
        Py_CLEAR(tmp);
    }
    if (cgroup_id && self->cgroup_ids_usable) {
        PyObject *cg = PyLong_FromUnsignedLongLong(cgroup_id);
        if (cg == NULL)
            goto out;
        PyObject *cid = PyDict_GetItemWithError(self->containers, cg);
        if (cid != NULL) {
            set_slot(self, info, F_CONTAINER_ID, cid);
        } else if (!PyErr_Occurred()) {
            tmp = PyObject_CallMethodObjArgs(self->table, s_container_for, cg, pid,
                                             SLOT(info, F_CONTAINER_ID), NULL);
            if (tmp != NULL)
                set_slot(self, info, F_CONTAINER_ID, tmp);
            Py_CLEAR(tmp);
        }
        Py_DECREF(cg);
        if (PyErr_Occurred())
            goto out;
    }
    if (loginuid != self->unknown) {
        set_slot(self, info, F_LOGINUID, loginuid);
    } else if (SLOT(info, F_LOGINUID) == Py_None) {
        tmp = PyObject_CallOneArg(self->proc_loginuid, pid);
        if (tmp == NULL)
            goto out;
        set_slot(self, info, F_LOGINUID, tmp);
        Py_CLEAR(tmp);
    }
    if (PyDict_SetItem(self->live, pid, info) < 0)
        goto out;
    locked = 0;
    if (unlock(self) < 0)
        goto out;

    if (forget_writes(self, pid, 1) < 0)
        goto out;
    /* exec from a non-leader thread: process.thread = {"id": old_pid} */
    int thread = old_pid != pid_v;
    if (self->process &&
        emit_event(self, A_EXEC, info, ktime, thread ? s_process : NULL, s_thread,
                   thread ? Py_BuildValue("{OI}", s_id, (unsigned int)old_pid) : NULL) < 0)
        goto out;
    rc = 0;
out:
    if (locked)
        unlock_on_error(self);
    Py_XDECREF(args);
    Py_XDECREF(comm);
    Py_XDECREF(filename);
    Py_XDECREF(pid);
    Py_XDECREF(uid);
    Py_XDECREF(gid);
    Py_XDECREF(loginuid);
    Py_XDECREF(exe);
    Py_XDECREF(info);
    Py_XDECREF(tmp);
    Py_XDECREF(argv);
    return rc;
}

static int rec_exit(Hot *self, const char *raw, Py_ssize_t len)
{
    if (too_short(self, "exit", len, sizeof(struct edr_exit_event)))
        return -1;
    const char *b = raw;
    uint32_t pid_v = rd32(b + offsetof(struct edr_header, pid));
    uint64_t ktime = rd64(b + offsetof(struct edr_header, ktime_ns));
    int32_t code_v = rds32(b + offsetof(struct edr_exit_event, exit_code));
    int32_t sig_v = rds32(b + offsetof(struct edr_exit_event, signal));
    uint32_t flags = rd32(b + offsetof(struct edr_exit_event, flags));
    long long signal = flags & EDR_EXIT_HAVE_SIGNAL ? sig_v : 0;
    PyObject *pid = PyLong_FromUnsignedLong(pid_v), *code = NULL, *info = NULL, *r;
    int rc = -1, locked = 0;
    if (pid == NULL)
        return -1;
    /* killed by a signal: the code is -signal (see _on_exit) */
    if (flags & EDR_EXIT_HAVE_CODE)
        code = PyLong_FromLong(code_v);
    else if (signal)
        code = PyLong_FromLongLong(-signal);
    else
        code = Py_NewRef(Py_None);
    if (code == NULL)
        goto out;
    /* ProcessTable.exit */
    info = table_lookup(self, pid);
    if (info == NULL || lock(self) < 0)
        goto out;
    locked = 1;
    set_slot(self, info, F_EXIT_CODE, code);
    if (PyDict_DelItem(self->live, pid) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            goto out;
        PyErr_Clear();
    }
    if (PyObject_SetItem(self->exited, pid, info) < 0)
        goto out;
    r = PyObject_CallOneArg(self->move_to_end, pid);
    if (r == NULL)
        goto out;
    Py_DECREF(r);
    for (;;) {
        Py_ssize_t n = PyObject_Size(self->exited);
        if (n < 0)
            goto out;
        if (n <= self->exited_kept)
            break;
        r = PyObject_CallOneArg(self->popitem, Py_False);
        if (r == NULL)
            goto out;
        Py_DECREF(r);
    }
    locked = 0;
    if (unlock(self) < 0)
        goto out;
    if (forget_writes(self, pid, 0) < 0)
        goto out;
    if (self->process &&
        emit_event(self, A_EXIT, info, ktime, signal ? s_edr : NULL, s_exit_signal,
                   signal ? PyLong_FromLongLong(signal) : NULL) < 0)
        goto out;
    set_slot(self, info, F_ECS_LINE, Py_None); /* the last line of the process is out */
    rc = 0;
out:
    if (locked)
        unlock_on_error(self);
    Py_XDECREF(pid);
    Py_XDECREF(code);
    Py_XDECREF(info);
    return rc;
}

/* One record: a C handler for process records, the registered Python handler otherwise. */
static int handle_one(Hot *self, PyObject *raw)
{
    if (!PyBytes_Check(raw)) {
        PyErr_Format(PyExc_TypeError, "ring record is %s, not bytes", Py_TYPE(raw)->tp_name);
        return -1;
    }
    const char *b = PyBytes_AS_STRING(raw);
    Py_ssize_t len = PyBytes_GET_SIZE(raw);
    if (len < 4) {
        decode_error(self, "record of %zd bytes has no type tag", len);
        return -1;
    }
    uint32_t tag = rd32(b);
    switch (tag) {
    case EDR_EV_FORK:
        return rec_fork(self, b, len);
    case EDR_EV_EXEC:
        return rec_exec(self, b, len);
    case EDR_EV_EXIT:
        return rec_exit(self, b, len);
    default:
        break;
    }
    PyObject *key = PyLong_FromUnsignedLong(tag);
    if (key == NULL)
        return -1;
    PyObject *handler = PyDict_GetItemWithError(self->by_tag, key);
    Py_DECREF(key);
    if (handler == NULL) {
        if (!PyErr_Occurred())
            decode_error(self, "record with unknown type tag %u", tag);
        return -1;
    }
    if (flush_lines(self) < 0) /* the handler's events go after the lines before them */
        return -1;
    PyObject *r = PyObject_CallFunctionObjArgs(handler, self->src, raw, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *Hot_handle(Hot *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0]) || (args[1] != Py_None && !PyList_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "handle(records: list, pending: list | None)");
        return NULL;
    }
    PyObject *records = args[0];
    /* state that may change between batches */
    PyObject *ctx = NULL, *flag = NULL, *writes = NULL, *boot = NULL;
    int ok = 0;
    if ((ctx = PyObject_GetAttrString(self->src, "ctx")) == NULL ||
        (flag = PyObject_GetAttrString(ctx, "emit_forks")) == NULL ||
        (self->emit_forks = PyObject_IsTrue(flag)) < 0)
        goto done;
    Py_CLEAR(flag);
    if ((flag = PyObject_GetAttrString(ctx, "takes_lines")) == NULL ||
        (self->lines = PyObject_IsTrue(flag)) < 0)
        goto done;
    Py_CLEAR(flag);
    if ((flag = PyObject_GetAttrString(self->src, "_process")) == NULL ||
        (self->process = PyObject_IsTrue(flag)) < 0)
        goto done;
    if ((writes = PyObject_GetAttrString(self->src, "_writes_by_pid")) == NULL)
        goto done;
    if (!PyDict_Check(writes)) {
        PyErr_SetString(PyExc_TypeError, "_writes_by_pid is not a dict");
        goto done;
    }
    if ((boot = PyObject_GetAttr(self->table, s_boot_epoch_ns)) == NULL)
        goto done;
    self->boot_epoch_ns = PyLong_AsLongLong(boot);
    if (self->boot_epoch_ns == -1 && PyErr_Occurred())
        goto done;
    if (args[1] == Py_None) { /* events go one by one to ctx.emit, read now */
        PyObject *e = PyObject_GetAttrString(ctx, "emit");
        if (e == NULL)
            goto done;
        Py_XSETREF(self->emit, e);
    }
    ok = 1;
done:
    Py_XDECREF(ctx);
    Py_XDECREF(flag);
    if (!ok) {
        Py_XDECREF(writes);
        Py_XDECREF(boot);
        return NULL;
    }
    Py_XSETREF(self->writes_by_pid, writes);
    Py_XSETREF(self->boot_epoch, boot);
    self->pending = args[1] == Py_None ? NULL : args[1];
    Py_XINCREF(self->pending);

    PyObject *result = Py_None;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(records); i++) {
        PyObject *raw = PyList_GET_ITEM(records, i);
        Py_INCREF(raw);
        /* one by one to ctx.emit: the record's lines go now, and a failure is the record's */
        if (handle_one(self, raw) < 0 || (self->pending == NULL && flush_lines(self) < 0)) {
            /* as the Python loop: Exceptions are counted and logged, never fatal */
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                Py_DECREF(raw);
                result = NULL;
                break;
            }
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            PyErr_NormalizeException(&et, &ev, &tb);
            if (tb != NULL && ev != NULL)
                PyException_SetTraceback(ev, tb);
            PyObject *r = PyObject_CallFunctionObjArgs(self->record_failed, raw, ev, NULL);
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
            if (r == NULL) {
                Py_DECREF(raw);
                result = NULL;
                break;
            }
            Py_DECREF(r);
        }
        Py_DECREF(raw);
    }
    if (result != NULL) {
        if (flush_lines(self) < 0)
            result = NULL;
    } else { /* a batch that stopped still hands over the lines it made; its error wins */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (flush_lines(self) < 0)
            PyErr_Clear();
        PyErr_Restore(et, ev, tb);
    }
    Py_CLEAR(self->pending);
    Py_XINCREF(result);
    return result;
}

/* -- the type ------------------------------------------------------------------------------ */

/* Every object the type holds: the keyword that sets it at init (NULL: derived at init or
 * per call), so init, clear and traverse walk one list. */
static const struct {
    const char *kw;
    Py_ssize_t off;
} MEMBERS[] = {
    {"src", offsetof(Hot, src)}, {"table", offsetof(Hot, table)}, {"host", offsetof(Hot, host)},
    {"tier", offsetof(Hot, tier)}, {"schema", offsetof(Hot, schema)},
    {"by_tag", offsetof(Hot, by_tag)}, {"decode_error", offsetof(Hot, decode_error)},
    {"unknown", offsetof(Hot, unknown)}, {"user_names", offsetof(Hot, user_names)},
    {"user_name", offsetof(Hot, user_name)}, {"resolve_path", offsetof(Hot, resolve_path)},
    {"realpath", offsetof(Hot, realpath)}, {"proc_link", offsetof(Hot, proc_link)},
    {"proc_cmdline", offsetof(Hot, proc_cmdline)},
    {"proc_loginuid", offsetof(Hot, proc_loginuid)},
    {"record_failed", offsetof(Hot, record_failed)}, {"encode", offsetof(Hot, encode)},
    {NULL, offsetof(Hot, info_type)},
    {NULL, offsetof(Hot, live)}, {NULL, offsetof(Hot, exited)},
    {NULL, offsetof(Hot, containers)}, {NULL, offsetof(Hot, lock)},
    {NULL, offsetof(Hot, acquire)}, {NULL, offsetof(Hot, release)},
    {NULL, offsetof(Hot, move_to_end)}, {NULL, offsetof(Hot, popitem)},
    {NULL, offsetof(Hot, emit)}, {NULL, offsetof(Hot, pending)},
    {NULL, offsetof(Hot, writes_by_pid)}, {NULL, offsetof(Hot, boot_epoch)},
    {NULL, offsetof(Hot, edr_tpl)}, {NULL, offsetof(Hot, user_cache)},
    {NULL, offsetof(Hot, group_cache)}, {NULL, offsetof(Hot, parent_cache)},
};
#define MEMBER(self, i) (*(PyObject **)((char *)(self) + MEMBERS[i].off))
#define N_MEMBERS (sizeof MEMBERS / sizeof MEMBERS[0])

static PyObject *need(PyObject *kw, const char *name)
{
    PyObject *v = PyDict_GetItemString(kw, name);
    if (v == NULL)
        PyErr_Format(PyExc_TypeError, "Hot() needs %s", name);
    return v;
}

/* '","event":{..},"host":{..},"edr":{..},"process":' for action a (new reference): what
 * make_event puts between the timestamp's text and the process object, encoded once. */
static PyObject *line_prefix(Hot *self, int a)
{
    PyObject *parts[3] = {self->event_tpl[a], self->host, self->edr_tpl}, *enc[3] = {0};
    static const char *const keys[3] = {"\",\"event\":", ",\"host\":", ",\"edr\":"};
    static const char last[] = ",\"process\":";
    PyObject *out = NULL;
    int refused = 0;
    Py_ssize_t n = sizeof last - 1;
    for (int i = 0; i < 3; i++) {
        if (!PyDict_Check(parts[i])) {
            PyErr_SetString(PyExc_TypeError, "Hot(): host must be a dict");
            goto done;
        }
        enc[i] = encode_object(self, parts[i], &refused);
        if (enc[i] == NULL) {
            if (refused)
                PyErr_SetString(PyExc_TypeError, "Hot(): the host fields cannot be encoded");
            goto done;
        }
        n += (Py_ssize_t)strlen(keys[i]) + PyBytes_GET_SIZE(enc[i]);
    }
    out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL)
        goto done;
    char *q = PyBytes_AS_STRING(out);
    for (int i = 0; i < 3; i++) {
        q = put(q, keys[i], strlen(keys[i]));
        q = put(q, PyBytes_AS_STRING(enc[i]), PyBytes_GET_SIZE(enc[i]));
    }
    put(q, last, sizeof last - 1);
done:
    for (int i = 0; i < 3; i++)
        Py_XDECREF(enc[i]);
    return out;
}

static int Hot_init(Hot *self, PyObject *args, PyObject *kw)
{
    if (PyTuple_GET_SIZE(args) != 0 || kw == NULL) {
        PyErr_SetString(PyExc_TypeError, "Hot() takes keyword arguments only");
        return -1;
    }
    for (size_t i = 0; i < N_MEMBERS && MEMBERS[i].kw != NULL; i++) {
        PyObject *v = need(kw, MEMBERS[i].kw);
        if (v == NULL)
            return -1;
        Py_XSETREF(MEMBER(self, i), Py_NewRef(v));
    }
    if (!PyDict_Check(self->by_tag) || !PyDict_Check(self->user_names) ||
        !PyUnicode_Check(self->tier)) {
        PyErr_SetString(PyExc_TypeError, "Hot(): by_tag and user_names must be dicts, tier a str");
        return -1;
    }
    PyObject *info_type = need(kw, "info_type");
    if (info_type == NULL)
        return -1;
    if (!PyType_Check(info_type)) {
        PyErr_SetString(PyExc_TypeError, "info_type must be a class");
        return -1;
    }
    /* ProcessInfo must be a slots class with exactly these fields */
    PyObject *slot_names = PyObject_GetAttrString(info_type, "__slots__");
    if (slot_names == NULL)
        return -1;
    Py_ssize_t nslots = PyObject_Size(slot_names);
    Py_DECREF(slot_names);
    if (nslots != F_COUNT) {
        PyErr_Format(PyExc_TypeError, "ProcessInfo has %zd slots, the hot path knows %d", nslots,
                     F_COUNT);
        return -1;
    }
    for (int i = 0; i < F_COUNT; i++) {
        PyObject *d = PyDict_GetItemString(((PyTypeObject *)info_type)->tp_dict, FIELD_NAMES[i]);
        if (d == NULL || !PyObject_TypeCheck(d, &PyMemberDescr_Type) ||
            ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            PyErr_Format(PyExc_TypeError, "ProcessInfo.%s is not a slot", FIELD_NAMES[i]);
            return -1;
        }
        self->off[i] = ((PyMemberDescrObject *)d)->d_member->offset;
    }
    Py_XSETREF(self->info_type, (PyTypeObject *)Py_NewRef(info_type));

    static const char *table_attrs[] = {"_live", "_exited", "_containers", "_lock"};
    PyObject **table_slots[] = {&self->live, &self->exited, &self->containers, &self->lock};
    for (size_t i = 0; i < 4; i++) {
        PyObject *v = PyObject_GetAttrString(self->table, table_attrs[i]);
        if (v == NULL)
            return -1;
        Py_XSETREF(*table_slots[i], v);
    }
    if (!PyDict_CheckExact(self->live) || !PyDict_Check(self->exited) ||
        !PyDict_Check(self->containers)) {
        PyErr_SetString(PyExc_TypeError, "the process table's maps are not dicts");
        return -1;
    }
    struct {
        PyObject *owner;
        const char *name;
        PyObject **slot;
    } methods[] = {{self->lock, "acquire", &self->acquire}, {self->lock, "release", &self->release},
                   {self->exited, "move_to_end", &self->move_to_end},
                   {self->exited, "popitem", &self->popitem}};
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++) {
        PyObject *m = PyObject_GetAttrString(methods[i].owner, methods[i].name);
        if (m == NULL)
            return -1;
        Py_XSETREF(*methods[i].slot, m);
    }
    PyObject *monotonic = need(kw, "monotonic");
    if (monotonic == NULL)
        return -1;
    PyObject *clock = PyObject_GetAttrString(self->realpath, "_clock");
    if (clock == NULL)
        PyErr_Clear();
    self->realpath_monotonic = clock != NULL && clock == monotonic;
    Py_XDECREF(clock);
    PyObject *prefix = PyObject_GetAttrString(self->table, "_id_prefix");
    if (prefix == NULL)
        return -1;
    if (!PyBytes_Check(prefix) || PyBytes_GET_SIZE(prefix) > 200) {
        Py_DECREF(prefix);
        PyErr_SetString(PyExc_TypeError, "the table's id prefix is not bytes of at most 200");
        return -1;
    }
    self->id_prefix_len = PyBytes_GET_SIZE(prefix);
    memcpy(self->id_prefix, PyBytes_AS_STRING(prefix), self->id_prefix_len);
    Py_DECREF(prefix);
    PyObject *usable = PyObject_GetAttrString(self->table, "_cgroup_ids_usable");
    if (usable == NULL || (self->cgroup_ids_usable = PyObject_IsTrue(usable)) < 0) {
        Py_XDECREF(usable);
        return -1;
    }
    Py_DECREF(usable);

    PyObject *clk = need(kw, "clk_tck"), *kept = need(kw, "exited_kept");
    if (clk == NULL || kept == NULL)
        return -1;
    self->clk_tck = PyLong_AsLong(clk);
    self->exited_kept = PyLong_AsSsize_t(kept);
    if (PyErr_Occurred())
        return -1;
    if (self->clk_tck <= 0) {
        PyErr_SetString(PyExc_ValueError, "clk_tck must be positive");
        return -1;
    }
    PyObject *skeletons = need(kw, "skeletons"); /* (fork, exec, exit) skeleton triples */
    if (skeletons == NULL)
        return -1;
    if (!PyTuple_Check(skeletons) || PyTuple_GET_SIZE(skeletons) != A_COUNT) {
        PyErr_SetString(PyExc_TypeError, "skeletons must be a tuple of three triples");
        return -1;
    }
    for (int a = 0; a < A_COUNT; a++) {
        PyObject *triple = PyTuple_GET_ITEM(skeletons, a);
        if (!PyTuple_Check(triple) || PyTuple_GET_SIZE(triple) != 3) {
            PyErr_SetString(PyExc_TypeError, "a skeleton is a (category, type, action) triple");
            return -1;
        }
        for (int j = 0; j < 3; j++)
            Py_XSETREF(self->skel[a][j], Py_NewRef(PyTuple_GET_ITEM(triple, j)));
        PyObject *event = PyDict_New();
        if (event == NULL)
            return -1;
        Py_XSETREF(self->event_tpl[a], event);
        if (PyDict_SetItem(event, s_kind, s_event) < 0 ||
            PyDict_SetItem(event, s_category, self->skel[a][0]) < 0 ||
            PyDict_SetItem(event, s_type, self->skel[a][1]) < 0 ||
            PyDict_SetItem(event, s_action, self->skel[a][2]) < 0)
            return -1;
    }
    PyObject **fresh[] = {&self->edr_tpl, &self->user_cache, &self->group_cache,
                          &self->parent_cache};
    for (size_t i = 0; i < sizeof fresh / sizeof fresh[0]; i++) {
        PyObject *d = PyDict_New();
        if (d == NULL)
            return -1;
        Py_XSETREF(*fresh[i], d);
    }
    if (PyDict_SetItem(self->edr_tpl, s_tier, self->tier) < 0 ||
        PyDict_SetItem(self->edr_tpl, s_schema, self->schema) < 0)
        return -1;
    for (int a = 0; a < A_COUNT; a++) {
        PyObject *prefix = line_prefix(self, a);
        if (prefix == NULL)
            return -1;
        Py_XSETREF(self->line_prefix[a], prefix);
    }
    self->ts_text[0] = 0;
    return 0;
}

static int Hot_traverse(Hot *self, visitproc visit, void *arg)
{
    Py_VISIT(self->lcuts);
    for (size_t i = 0; i < N_MEMBERS; i++)
        Py_VISIT(MEMBER(self, i));
    for (int a = 0; a < A_COUNT; a++) {
        for (int j = 0; j < 3; j++)
            Py_VISIT(self->skel[a][j]);
        Py_VISIT(self->event_tpl[a]);
        Py_VISIT(self->line_prefix[a]);
    }
    return 0;
}

static int Hot_clear(Hot *self)
{
    Py_CLEAR(self->lcuts);
    for (size_t i = 0; i < N_MEMBERS; i++)
        Py_CLEAR(MEMBER(self, i));
    for (int a = 0; a < A_COUNT; a++) {
        for (int j = 0; j < 3; j++)
            Py_CLEAR(self->skel[a][j]);
        Py_CLEAR(self->event_tpl[a]);
        Py_CLEAR(self->line_prefix[a]);
    }
    return 0;
}

static void Hot_dealloc(Hot *self)
{
    PyObject_GC_UnTrack(self);
    Hot_clear(self);
    PyMem_Free(self->lbuf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Hot_methods[] = {
    {"handle", (PyCFunction)(void (*)(void))Hot_handle, METH_FASTCALL,
     "handle(records, pending): every record of a batch, in order; events go to pending "
     "(a list) or, when it is None, to ctx.emit"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HotType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sensor._hotpath.Hot",
    .tp_basicsize = sizeof(Hot),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The BPF tiers' record loop, with fork, exec and exit handled in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Hot_init,
    .tp_dealloc = (destructor)Hot_dealloc,
    .tp_traverse = (traverseproc)Hot_traverse,
    .tp_clear = (inquiry)Hot_clear,
    .tp_methods = Hot_methods,
};

static PyObject *mod_iso_timestamp(PyObject *mod, PyObject *ns)
{
    /* for tests: the C formatting of a timestamp */
    Hot tmp;
    (void)mod;
    memset(&tmp, 0, sizeof tmp);
    return iso_timestamp_obj(&tmp, ns);
}

/* RingReader.consume (sensor/ringbuf.py), without a Python step per record:
 * consume(consumer_map, producer_map, data_offset, mask, out) -> records appended.
 * The positions are read with acquire and the consumer position published with release
 * ordering, as libbpf's ring_buffer__consume does. */
#define RING_BUSY (1u << 31)
#define RING_DISCARD (1u << 30)

static PyObject *mod_consume(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    Py_ssize_t data_off, mask;
    if (nargs != 5 || !PyList_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "consume(consumer, producer, data_offset, mask, out)");
        return NULL;
    }
    data_off = PyLong_AsSsize_t(args[2]);
    mask = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer cb, pb;
    if (PyObject_GetBuffer(args[0], &cb, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &pb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&cb);
        return NULL;
    }
    PyObject *out = args[4];
    Py_ssize_t before = PyList_GET_SIZE(out);
    PyObject *result = NULL;
    if (cb.len < 8 || pb.len < data_off || data_off < 8 || mask < 0 ||
        pb.len < data_off + 2 * (mask + 1)) {
        PyErr_SetString(PyExc_ValueError, "ring mappings smaller than their layout");
        goto out;
    }
    const char *data = pb.buf;
    uint64_t cons = __atomic_load_n((uint64_t *)cb.buf, __ATOMIC_ACQUIRE);
    uint64_t prod = __atomic_load_n((const uint64_t *)data, __ATOMIC_ACQUIRE);
    uint64_t start = cons;
    while (cons < prod) {
        Py_ssize_t off = data_off + (Py_ssize_t)(cons & (uint64_t)mask);
        uint32_t len = __atomic_load_n((const uint32_t *)(data + off), __ATOMIC_ACQUIRE);
        if (len & RING_BUSY)
            break;
        uint32_t size = len & ~(RING_BUSY | RING_DISCARD);
        if (off + 8 + (Py_ssize_t)size > pb.len) {
            PyErr_Format(PyExc_ValueError, "ring record of %u bytes runs past the mapping", size);
            break;
        }
        if (!(len & RING_DISCARD)) {
            PyObject *rec = PyBytes_FromStringAndSize(data + off + 8, size);
            if (rec == NULL || PyList_Append(out, rec) < 0) {
                Py_XDECREF(rec);
                break;
            }
            Py_DECREF(rec);
        }
        cons += ((uint64_t)size + 8 + 7) & ~(uint64_t)7;
    }
    if (cons != start) /* the records are copied out: the kernel may reuse their space */
        __atomic_store_n((uint64_t *)cb.buf, cons, __ATOMIC_RELEASE);
    if (!PyErr_Occurred())
        result = PyLong_FromSsize_t(PyList_GET_SIZE(out) - before);
out:
    PyBuffer_Release(&pb);
    PyBuffer_Release(&cb);
    return result;
}

static PyMethodDef module_methods[] = {
    {"iso_timestamp", mod_iso_timestamp, METH_O, "iso_timestamp(epoch_ns): as backplane.schema"},
    {"consume", (PyCFunction)(void (*)(void))mod_consume, METH_FASTCALL,
     "consume(consumer, producer, data_offset, mask, out): RingReader.consume in C"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sensor._hotpath", "Fork, exec and exit records in C.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__hotpath(void)
{
    if (sha256_md == NULL && (sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL)) == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA-256");
        return NULL;
    }
    struct {
        PyObject **var;
        const char *text;
    } strings[] = {
        {&s_kind, "kind"}, {&s_event, "event"}, {&s_category, "category"}, {&s_type, "type"},
        {&s_action, "action"}, {&s_timestamp, "@timestamp"}, {&s_host, "host"}, {&s_edr, "edr"},
        {&s_tier, "tier"}, {&s_schema, "schema"}, {&s_process, "process"}, {&s_pid, "pid"},
        {&s_entity_id, "entity_id"}, {&s_name, "name"}, {&s_executable, "executable"},
        {&s_args, "args"}, {&s_args_count, "args_count"}, {&s_command_line, "command_line"},
        {&s_args_truncated, "args_truncated"}, {&s_working_directory, "working_directory"},
        {&s_start, "start"}, {&s_parent, "parent"}, {&s_user, "user"}, {&s_id, "id"},
        {&s_audit, "audit"}, {&s_group, "group"}, {&s_container, "container"},
        {&s_hash, "hash"}, {&s_sha256, "sha256"}, {&s_exit_code, "exit_code"},
        {&s_thread, "thread"}, {&s_exit_signal, "exit_signal"}, {&s_space, " "},
        {&s_exe, "exe"}, {&s_cwd, "cwd"}, {&s_acquire, "acquire"}, {&s_release, "release"},
        {&s_move_to_end, "move_to_end"}, {&s_popitem, "popitem"}, {&s_lookup, "lookup"},
        {&s_refresh_container, "refresh_container"}, {&s_container_for, "_container_for"},
        {&s_forget_writes, "_forget_writes"}, {&s_cloexec_only, "cloexec_only"},
        {&s_boot_epoch_ns, "boot_epoch_ns"}, {&s_empty, ""}, {&s__cache, "_cache"},
        {&s_hits, "hits"},
    };
    for (size_t i = 0; i < sizeof strings / sizeof strings[0]; i++) {
        *strings[i].var = PyUnicode_InternFromString(strings[i].text);
        if (*strings[i].var == NULL)
            return NULL;
    }
    if ((s_one = PyLong_FromLong(1)) == NULL || PyType_Ready(&HotType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Hot", (PyObject *)&HotType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
