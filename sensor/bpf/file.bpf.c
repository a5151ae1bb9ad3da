/* file.bpf.c: file creation, writes, sensitive reads, deletion, renames, mode and owner
 * changes (included by edr.bpf.c).
 *
 * Hooks: syscalls:sys_enter/exit_ of openat, openat2, open, creat, unlink, unlinkat, rmdir,
 * rename, renameat, renameat2, chmod, fchmod, fchmodat(2), chown, fchown, lchown, fchownat;
 * sys_enter_ of write, pwrite64, writev, pwritev, pwritev2, copy_file_range, sendfile64,
 * splice, ftruncate, fallocate (first write per open), close, dup2, dup3 (fd bookkeeping).
 * Arguments are stashed per thread at entry and the event is emitted at exit with the result.
 * Emits: EDR_EV_FILE (op = enum edr_file_op, emit = EDR_FILE_REPORT | EDR_FILE_WATCH) and
 * EDR_EV_FILE_WRITE.
 * Reported: opens only when they succeed; the other operations when they succeed, and also
 * when refused with EACCES or EPERM (a denied attempt on a protected file is worth seeing);
 * other failures (ENOENT, ...) are noise and are not reported.
 * Opens: O_CREAT is reported at open ("create" in user space). O_TRUNC without O_CREAT is
 * reported at open as a write: truncation modifies the file even if nothing is written after,
 * and that open is not watched (its one write event is already out). O_CREAT|O_TRUNC is only
 * "create" at open, then watched: whether the file existed before would need a kernel struct
 * read, so truncating an existing file that way without writing shows as "create" alone.
 * Writes: a successful open with O_WRONLY or O_RDWR (except the O_TRUNC case above) puts
 * (tgid, fd) in `write_watch` and sends its record with EDR_FILE_WATCH, even when the open
 * itself is not reported (deduplicated, or a plain write open), so user space can map the fd
 * to the path. The first write-like syscall on that fd deletes the entry and emits
 * EDR_EV_FILE_WRITE (tgid, fd, open_id): one "write" per open, sent at syscall entry (an
 * attempted write). close and dup2/dup3 over the fd drop the entry; dup2/dup3 of a watched fd
 * copy it (same open_id, so user space still reports one write per open). Not seen: writes
 * through mmap, io_uring, AIO, fds duplicated with dup or F_DUPFD, and fds inherited by a
 * fork child. Entries left by close_range, exec closing O_CLOEXEC fds or process exit stay
 * until the LRU evicts them; a write record for them carries an open_id user space has
 * dropped (at exec/exit) and is ignored.
 * Read-only opens are reported only for absolute paths under the prefixes in
 * `sensitive_prefixes`.
 * Filters in the kernel: absolute paths under `exclude_prefixes`, the sensor's own tgids, and
 * repeats of the same reported open (tgid, flags, path hash) within EDR_DEDUP_NS.
 * Caveats: paths are the user's strings (up to EDR_PATH_LEN bytes); relative and dirfd-based
 * paths are resolved in user space, so the kernel filters apply only to absolute paths.
 */

#ifndef EDR_DEDUP_NS
#define EDR_DEDUP_NS 2000000000ULL
#endif
#define EDR_PREFIX_LEN 64
#define EDR_AT_FDCWD -100
#define EDR_AT_EMPTY_PATH 0x1000
#define EDR_O_ACCMODE 03
#define EDR_O_CREAT 0100
#define EDR_O_TRUNC 01000
#define EDR_EACCES 13
#define EDR_EPERM 1
/* BCC's generated argument struct for sys_enter_pwritev2 names rwf_t, which the generic
 * headers lack; an identical typedef repeated is valid C11 where real headers define it. */
typedef int rwf_t;

#ifndef EDR_WRITE_WATCH_ENTRIES
#define EDR_WRITE_WATCH_ENTRIES 16384
#endif

struct edr_path_key {
    __u32 prefixlen; /* in bits */
    char data[EDR_PREFIX_LEN];
};

struct edr_dedup_key {
    __u32 tgid;
    __u32 flags;
    __u64 hash;
};

BPF_LPM_TRIE(exclude_prefixes, struct edr_path_key, __u8, 256);
BPF_LPM_TRIE(sensitive_prefixes, struct edr_path_key, __u8, 256);
/* Bytes 1 and 2 of every sensitive prefix (all 256 second bytes for a two-byte prefix, every
 * bit for "/"), as bit (b1 << 8 | b2) of a 65,536-bit map: an array lookup, which the verifier
 * inlines, rules out most read-only opens before their path is read. A bitmap (8 KiB) and not
 * one array entry per index (8 bytes each, 512 KiB): in an exec storm the lookup then stays in
 * cache instead of missing on almost every open. */
#define EDR_HEAD_WORDS 1024
BPF_ARRAY(sensitive_heads, __u64, EDR_HEAD_WORDS);
BPF_TABLE("lru_hash", struct edr_dedup_key, __u64, open_dedup, 16384);
BPF_PERCPU_ARRAY(file_scratch, struct edr_file_event, 1);
BPF_PERCPU_ARRAY(path_key_scratch, struct edr_path_key, 1);
BPF_HASH(file_stash, __u32, struct edr_file_event, EDR_STASH_ENTRIES);
/* How many file_stash entries the threads whose tid & (EDR_STASH_HINTS - 1) is the index
 * hold. The exit programs run on every open and close of every process, and almost never
 * find a stash entry: a zero here, an array lookup the verifier inlines, spares them the
 * hash lookup. A count, not the tid, so that threads sharing an index cost a lookup more
 * and never miss one; a count left too high (an entry overwritten) costs the same. */
#define EDR_STASH_HINTS 65536
BPF_ARRAY(file_stash_hint, __u32, EDR_STASH_HINTS);

struct edr_watch_key {
    __u32 tgid;
    __s32 fd;
};

/* (tgid, fd) of write-capable opens not yet written through -> open_id */
BPF_TABLE("lru_hash", struct edr_watch_key, __u64, write_watch, EDR_WRITE_WATCH_ENTRIES);

/* One bit per tgid (PID_MAX_LIMIT is 2^22 on 64-bit: 512 KiB): set before any entry of the
 * process goes into write_watch, cleared when its last thread has exited (group_dead). A clear
 * bit proves the process has no entry, so close, dup and the write-like calls of the many
 * processes that never opened a file for writing skip the LRU hash lookup (about 45 ns, 19
 * closes per /bin/true). A set bit only costs that lookup. Without group_dead the bits are
 * never cleared. Entries a dead process left behind are not covered by a new process reusing
 * its tgid; they carry open_ids user space dropped at the exit, as before. */
#define EDR_OWNER_WORDS (1 << 16)
BPF_ARRAY(watch_owners, __u64, EDR_OWNER_WORDS);

static __always_inline int edr_may_own_watch(__u32 tgid)
{
    __u32 w = tgid >> 6;
    __u64 *word = watch_owners.lookup(&w);

    return !word || ((*word >> (tgid & 63)) & 1);
}

static __always_inline void edr_own_watch(__u32 tgid)
{
    __u32 w = tgid >> 6;
    __u64 *word = watch_owners.lookup(&w);

    if (word && !((*word >> (tgid & 63)) & 1))
        __sync_fetch_and_or(word, 1ULL << (tgid & 63));
}

static __always_inline void edr_watch_owner_gone(__u32 tgid)
{
    __u32 w = tgid >> 6;
    __u64 *word = watch_owners.lookup(&w);

    if (word && ((*word >> (tgid & 63)) & 1))
        __sync_fetch_and_and(word, ~(1ULL << (tgid & 63)));
}

/* Fill the per-CPU trie key from a path; NULL for relative paths, which never match. A stale
 * tail after the NUL does not matter: the NUL itself differs from any prefix character. */
static __always_inline struct edr_path_key *edr_path_key(const char *path)
{
    __u32 zero = 0;
    struct edr_path_key *k = path_key_scratch.lookup(&zero);

    if (!k || path[0] != '/')
        return NULL;
    k->prefixlen = EDR_PREFIX_LEN * 8;
    __builtin_memcpy(k->data, path, EDR_PREFIX_LEN);
    return k;
}

static __always_inline int edr_excluded(const char *path)
{
    struct edr_path_key *k = edr_path_key(path);
    return k && exclude_prefixes.lookup(k) != NULL;
}

static __always_inline int edr_sensitive(const char *path)
{
    struct edr_path_key *k = edr_path_key(path);
    return k && sensitive_prefixes.lookup(k) != NULL;
}

static __always_inline __u64 edr_path_hash(const char *path)
{
    __u64 h = 14695981039346656037ULL; /* FNV-1a */
    for (int i = 0; i < EDR_PATH_LEN; i++) {
        char c = path[i];
        if (!c)
            break;
        h = (h ^ (__u8)c) * 1099511628211ULL;
    }
    return h;
}

static __always_inline struct edr_file_event *edr_file_begin(__u32 op)
{
    __u32 zero = 0;

    if (edr_ignored(bpf_get_current_pid_tgid() >> 32))
        return NULL;
    struct edr_file_event *e = file_scratch.lookup(&zero);
    if (!e)
        return NULL;
    e->op = op;
    e->flags = 0;
    e->dfd = EDR_AT_FDCWD;
    e->dfd2 = EDR_AT_FDCWD;
    e->fd = -1;
    e->mode = 0;
    e->owner_uid = (__u32)-1;
    e->owner_gid = (__u32)-1;
    e->emit = EDR_FILE_REPORT;
    e->_pad0 = 0;
    e->ret = 0;
    e->path[0] = 0;
    e->path2[0] = 0;
    return e;
}

static __always_inline int edr_file_stash(struct edr_file_event *e)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();

    if (file_stash.update(&tid, e)) {
        edr_count_drop(EDR_EV_FILE);
        return 0;
    }
    __u32 slot = tid & (EDR_STASH_HINTS - 1);
    __u32 *hint = file_stash_hint.lookup(&slot);
    if (hint)
        lock_xadd(hint, 1);
    return 0;
}

/* The stash entry is consumed: delete it, then lower its hint. */
static __always_inline void edr_file_unstash(__u32 tid, __u32 *hint)
{
    file_stash.delete(&tid);
    if (hint)
        lock_xadd(hint, -1);
}

/* Read the path and drop the operation when it is under an excluded prefix. */
static __always_inline int edr_file_path(struct edr_file_event *e, const char *upath)
{
    if (bpf_probe_read_user_str(e->path, sizeof(e->path), upath) < 0)
        return -1;
    if (edr_excluded(e->path))
        return -1;
    return 0;
}

/* A read-only open that cannot be under a sensitive prefix, told from the path's first three
 * bytes: most opens (a dynamic loader's, a locale's) end here, before the full path is read
 * or the event scratch is touched. The rest go the whole way (full read, trie). A byte after
 * a one-character path's NUL is garbage, which only the prefix "/" accepts, and it accepts
 * every index; a read that faults (say at the end of a page) rules nothing out. */
static __always_inline int edr_read_only_not_sensitive(const char *upath)
{
    __u8 b[3];

    if (bpf_probe_read_user(b, sizeof(b), upath))
        return 0;
    if (b[0] != '/')
        return 1; /* relative: the tries hold absolute prefixes only */
    __u32 head = ((__u32)b[1] << 8) | b[2];
    __u32 w = head >> 6;
    __u64 *word = sensitive_heads.lookup(&w);
    return !word || !((*word >> (head & 63)) & 1);
}

static __always_inline int edr_open_enter(int dfd, const char *upath, __u64 flags, __u32 mode)
{
    if (!(flags & (EDR_O_CREAT | EDR_O_TRUNC | EDR_O_ACCMODE)) &&
        edr_read_only_not_sensitive(upath))
        return 0;
    struct edr_file_event *e = edr_file_begin(EDR_FILE_OPEN);

    if (!e)
        return 0;
    int trunc_only = (flags & (EDR_O_CREAT | EDR_O_TRUNC)) == EDR_O_TRUNC;
    __u32 emit = 0;
    if (!(flags & (EDR_O_CREAT | EDR_O_TRUNC | EDR_O_ACCMODE))) {
        /* Read-only and past the pre-filter: reported only under a sensitive prefix, so
         * that trie lookup decides first and the exclusion lookup is made only for the few
         * that match. */
        if (bpf_probe_read_user_str(e->path, sizeof(e->path), upath) < 0)
            return 0;
        if (!edr_sensitive(e->path) || edr_excluded(e->path))
            return 0;
        emit = EDR_FILE_REPORT;
    } else {
        if (edr_file_path(e, upath))
            return 0;
        if ((flags & (EDR_O_CREAT | EDR_O_TRUNC)) || edr_sensitive(e->path))
            emit |= EDR_FILE_REPORT;
        if ((flags & EDR_O_ACCMODE) && !trunc_only)
            emit |= EDR_FILE_WATCH;
        if (!emit)
            return 0;
    }
    e->emit = emit;
    e->dfd = dfd;
    e->flags = (__u32)flags;
    e->mode = mode;
    return edr_file_stash(e);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    return edr_open_enter(args->dfd, args->filename, args->flags, args->mode);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
    __u64 how[2] = {}; /* struct open_how: flags, mode first (stable uapi) */

    if (bpf_probe_read_user(how, sizeof(how), args->how))
        return 0;
    return edr_open_enter(args->dfd, args->filename, how[0], (__u32)how[1]);
}

#ifdef EDR_HAVE_LEGACY_SYSCALLS
TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
    return edr_open_enter(EDR_AT_FDCWD, args->filename, args->flags, args->mode);
}

TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
    /* creat(2) is open(O_CREAT|O_WRONLY|O_TRUNC) */
    return edr_open_enter(EDR_AT_FDCWD, args->pathname, EDR_O_CREAT | 01 | EDR_O_TRUNC, args->mode);
}
#endif

static __always_inline int edr_path_op_enter(__u32 op, int dfd, const char *upath)
{
    struct edr_file_event *e = edr_file_begin(op);

    if (!e || edr_file_path(e, upath))
        return 0;
    e->dfd = dfd;
    return edr_file_stash(e);
}

TRACEPOINT_PROBE(syscalls, sys_enter_unlinkat)
{
    /* AT_REMOVEDIR (0x200) turns unlinkat into rmdir */
    __u32 op = (args->flag & 0x200) ? EDR_FILE_RMDIR : EDR_FILE_UNLINK;
    return edr_path_op_enter(op, args->dfd, args->pathname);
}

static __always_inline int edr_rename_enter(int olddfd, const char *oldname, int newdfd,
                                            const char *newname)
{
    struct edr_file_event *e = edr_file_begin(EDR_FILE_RENAME);

    if (!e)
        return 0;
    if (bpf_probe_read_user_str(e->path, sizeof(e->path), oldname) < 0)
        return 0;
    if (bpf_probe_read_user_str(e->path2, sizeof(e->path2), newname) < 0)
        return 0;
    /* reported unless both ends are excluded: moving a file out of /dev matters */
    if (edr_excluded(e->path) && edr_excluded(e->path2))
        return 0;
    e->dfd = olddfd;
    e->dfd2 = newdfd;
    return edr_file_stash(e);
}

TRACEPOINT_PROBE(syscalls, sys_enter_renameat)
{
    return edr_rename_enter(args->olddfd, args->oldname, args->newdfd, args->newname);
}

TRACEPOINT_PROBE(syscalls, sys_enter_renameat2)
{
    return edr_rename_enter(args->olddfd, args->oldname, args->newdfd, args->newname);
}

static __always_inline int edr_chmod_enter(int dfd, const char *upath, int fd, __u32 mode)
{
    struct edr_file_event *e = edr_file_begin(EDR_FILE_CHMOD);

    if (!e)
        return 0;
    if (upath && edr_file_path(e, upath))
        return 0;
    e->dfd = dfd;
    e->fd = fd;
    e->mode = mode;
    return edr_file_stash(e);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchmodat)
{
    return edr_chmod_enter(args->dfd, args->filename, -1, args->mode);
}

#ifdef EDR_HAVE_FCHMODAT2
TRACEPOINT_PROBE(syscalls, sys_enter_fchmodat2)
{
    return edr_chmod_enter(args->dfd, args->filename, -1, args->mode);
}
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_fchmod)
{
    return edr_chmod_enter(EDR_AT_FDCWD, NULL, args->fd, args->mode);
}

static __always_inline int edr_chown_enter(int dfd, const char *upath, int fd, __u32 uid,
                                           __u32 gid)
{
    struct edr_file_event *e = edr_file_begin(EDR_FILE_CHOWN);

    if (!e)
        return 0;
    if (upath && edr_file_path(e, upath))
        return 0;
    e->dfd = dfd;
    e->fd = fd;
    e->owner_uid = uid;
    e->owner_gid = gid;
    return edr_file_stash(e);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchownat)
{
    return edr_chown_enter(args->dfd, args->filename, -1, args->user, args->group);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchown)
{
    return edr_chown_enter(EDR_AT_FDCWD, NULL, args->fd, args->user, args->group);
}

#ifdef EDR_HAVE_LEGACY_SYSCALLS
TRACEPOINT_PROBE(syscalls, sys_enter_unlink)
{
    return edr_path_op_enter(EDR_FILE_UNLINK, EDR_AT_FDCWD, args->pathname);
}

TRACEPOINT_PROBE(syscalls, sys_enter_rmdir)
{
    return edr_path_op_enter(EDR_FILE_RMDIR, EDR_AT_FDCWD, args->pathname);
}

TRACEPOINT_PROBE(syscalls, sys_enter_rename)
{
    return edr_rename_enter(EDR_AT_FDCWD, args->oldname, EDR_AT_FDCWD, args->newname);
}

TRACEPOINT_PROBE(syscalls, sys_enter_chmod)
{
    return edr_chmod_enter(EDR_AT_FDCWD, args->filename, -1, args->mode);
}

TRACEPOINT_PROBE(syscalls, sys_enter_chown)
{
    return edr_chown_enter(EDR_AT_FDCWD, args->filename, -1, args->user, args->group);
}

TRACEPOINT_PROBE(syscalls, sys_enter_lchown)
{
    return edr_chown_enter(EDR_AT_FDCWD, args->filename, -1, args->user, args->group);
}
#endif

/* Emit the stashed operation with its result. */
static __always_inline int edr_file_exit(long ret)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    __u32 slot = tid & (EDR_STASH_HINTS - 1);
    __u32 *hint = file_stash_hint.lookup(&slot);

    if (hint && !*hint)
        return 0;
    struct edr_file_event *e = file_stash.lookup(&tid);
    if (!e)
        return 0;
    int report;
    if (e->op == EDR_FILE_OPEN)
        report = ret >= 0;
    else
        report = ret == 0 || ret == -EDR_EACCES || ret == -EDR_EPERM;
    if (!report) {
        edr_file_unstash(tid, hint);
        return 0;
    }
    edr_header_fill(&e->h, EDR_EV_FILE);
    e->ret = ret;
    if (e->op == EDR_FILE_OPEN && (e->emit & EDR_FILE_REPORT)) {
        struct edr_dedup_key k = {};
        k.tgid = e->h.pid;
        k.flags = e->flags;
        k.hash = edr_path_hash(e->path);
        __u64 now = e->h.ktime_ns;
        __u64 *last = open_dedup.lookup(&k);
        if (last && now - *last < EDR_DEDUP_NS)
            e->emit &= ~EDR_FILE_REPORT;
        else
            open_dedup.update(&k, &now);
    }
    if (e->op == EDR_FILE_OPEN && (e->emit & EDR_FILE_WATCH)) {
        struct edr_watch_key w = {.tgid = e->h.pid, .fd = (__s32)ret};
        __u64 open_id = e->h.ktime_ns;
        edr_own_watch(e->h.pid); /* before the entry exists, so no close can skip it */
        if (write_watch.update(&w, &open_id))
            e->emit &= ~EDR_FILE_WATCH;
    }
    if (e->emit)
        edr_submit(e, sizeof(*e), EDR_EV_FILE);
    edr_file_unstash(tid, hint);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_unlinkat) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_renameat) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_renameat2) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchmodat) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchmod) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchownat) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchown) { return edr_file_exit(args->ret); }
#ifdef EDR_HAVE_FCHMODAT2
TRACEPOINT_PROBE(syscalls, sys_exit_fchmodat2) { return edr_file_exit(args->ret); }
#endif
#ifdef EDR_HAVE_LEGACY_SYSCALLS
TRACEPOINT_PROBE(syscalls, sys_exit_open) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_creat) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_unlink) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_rmdir) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_rename) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_chmod) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_chown) { return edr_file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_lchown) { return edr_file_exit(args->ret); }
#endif

/* The first write-like call on a watched fd: one record, and the entry goes. Most writes
 * are on fds that are not watched, so a lockless lookup comes before the delete; the delete's
 * result decides between threads racing on the same fd. */
static __always_inline int edr_write_enter(long fd)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;

    if (!edr_may_own_watch(tgid))
        return 0;
    struct edr_watch_key k = {.tgid = tgid, .fd = (__s32)fd};
    __u64 *id = write_watch.lookup(&k);

    if (!id)
        return 0;
    __u64 open_id = *id;
    if (write_watch.delete(&k))
        return 0;
    struct edr_write_event ev = {};
    edr_header_fill(&ev.h, EDR_EV_FILE_WRITE);
    ev.fd = (__s32)fd;
    ev.open_id = open_id;
    edr_submit(&ev, sizeof(ev), EDR_EV_FILE_WRITE);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_write) { return edr_write_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_pwrite64) { return edr_write_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return edr_write_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_pwritev) { return edr_write_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_pwritev2) { return edr_write_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_copy_file_range) { return edr_write_enter(args->fd_out); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) { return edr_write_enter(args->out_fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_splice) { return edr_write_enter(args->fd_out); }
TRACEPOINT_PROBE(syscalls, sys_enter_ftruncate) { return edr_write_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_fallocate) { return edr_write_enter(args->fd); }

static __always_inline void edr_watch_drop(__u32 tgid, long fd)
{
    struct edr_watch_key k = {.tgid = tgid, .fd = (__s32)fd};

    if (write_watch.lookup(&k))
        write_watch.delete(&k);
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;

    if (edr_may_own_watch(tgid))
        edr_watch_drop(tgid, args->fd);
    return 0;
}

/* dup2/dup3 close newfd first; a watched oldfd passes its watch on (same open_id). Done at
 * entry: a failing dup2 of a watched fd at worst loses or misplaces one write event. */
static __always_inline int edr_dup_enter(long oldfd, long newfd)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct edr_watch_key old = {.tgid = tgid, .fd = (__s32)oldfd};

    if (oldfd == newfd || !edr_may_own_watch(tgid))
        return 0; /* a clear bit: neither fd can be watched */
    __u64 *id = write_watch.lookup(&old);
    if (id) {
        __u64 open_id = *id;
        struct edr_watch_key k = {.tgid = tgid, .fd = (__s32)newfd};
        write_watch.update(&k, &open_id);
    } else {
        edr_watch_drop(tgid, newfd);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_dup3) { return edr_dup_enter(args->oldfd, args->newfd); }
#ifdef EDR_HAVE_LEGACY_SYSCALLS
TRACEPOINT_PROBE(syscalls, sys_enter_dup2) { return edr_dup_enter(args->oldfd, args->newfd); }
#endif
