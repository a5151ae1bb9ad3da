/* process.bpf.c: fork, exec, exit and working-directory changes (included by edr.bpf.c).
 *
 * Hooks: task:task_newtask (fork: it carries the clone flags, which tell threads from
 * processes), sched:sched_process_exec/exit, sys_enter/exit_(f)chdir; without BTF also
 * sys_enter/exit_execve(at) (argv), sys_enter_exit(_group) and signal:signal_deliver (exit
 * status), see below. cgroup:cgroup_attach_task (container changes: a child inherits its
 * parent's cgroups, so user space needs to hear only about moves and
 * clone3(CLONE_INTO_CGROUP)).
 * Emits: EDR_EV_FORK, EDR_EV_EXEC, EDR_EV_EXIT, EDR_EV_CHDIR, EDR_EV_CGROUP.
 * Caveats: argv is bounded (EDR_ARGS_MAX_COUNT strings, EDR_ARGS_MAX_BYTES bytes; beyond that
 * the truncation flag is set). The child's start time is taken at task_newtask, a few
 * microseconds after the kernel's own stamp, so it can differ from /proc's by one tick.
 * Exits are reported once per process (group_dead), not per thread.
 * Task fields are read at offsets the loader takes from the running kernel's BTF
 * (sensor/btf.py), never from the compile-time headers, each with a way that needs none:
 * - the audit login uid (EDR_TASK_LOGINUID_OFF); without it user space reads /proc;
 * - argv (EDR_TASK_MM_OFF, EDR_MM_ARG_START/END_OFF): the block the kernel copied into the
 *   new image, read at sched_process_exec, so what is reported is what the program got (a
 *   caller's thread rewriting its argv during execve cannot change it) and execve needs no
 *   program of its own. User space splits and counts the strings (EDR_EXEC_ARGS_BLOCK).
 *   Without it argv is read string by string from the caller at execve entry;
 * - the exit status (EDR_TASK_EXIT_CODE_OFF): the wait status do_exit stored, read at
 *   sched_process_exit. Without it the status is gathered from exit(2), exit_group(2) and
 *   fatal signal delivery.
 */

#define EDR_CLONE_THREAD 0x00010000ULL
#define EDR_CLONE_INTO_CGROUP 0x200000000ULL
#define EDR_NS_PER_TICK (1000000000ULL / 100) /* USER_HZ (CLK_TCK) is 100 on Linux */
#define EDR_EXIT_GROUP 4                     /* internal: the code came from exit_group */

#ifndef EDR_EXEC_STASH_ENTRIES
#define EDR_EXEC_STASH_ENTRIES 1024 /* execs in flight at once; each entry is ~8.5 KiB */
#endif

struct edr_exit_state {
    __s32 code;
    __s32 signal;
    __u32 flags;
};

#if defined(EDR_TASK_MM_OFF) && defined(EDR_MM_ARG_START_OFF) && defined(EDR_MM_ARG_END_OFF)
#define EDR_ARGS_FROM_MM 1
#endif

BPF_PERCPU_ARRAY(exec_scratch, struct edr_exec_event, 1);
#ifndef EDR_ARGS_FROM_MM
BPF_HASH(exec_stash, __u32, struct edr_exec_event, EDR_EXEC_STASH_ENTRIES);
#endif
#ifndef EDR_TASK_EXIT_CODE_OFF
BPF_HASH(exit_state, __u32, struct edr_exit_state, EDR_STASH_ENTRIES);
#endif
BPF_HASH(chdir_stash, __u32, struct edr_chdir_event, EDR_STASH_ENTRIES);
BPF_PERCPU_ARRAY(chdir_scratch, struct edr_chdir_event, 1);
BPF_PERCPU_ARRAY(cgroup_scratch, struct edr_cgroup_event, 1);

#ifdef EDR_FILE
/* file.bpf.c, pasted after this file: a process whose last thread exits owns no write watch */
static __always_inline void edr_watch_owner_gone(__u32 tgid);
#endif

/* -- fork ------------------------------------------------------------------------------- */

/* task:task_newtask fires in copy_process for every new task, in the parent, with the clone
 * flags: threads are told from processes here, without a program on clone(2) and clone3(2)
 * and a map to carry their flags to sched_process_fork. */
TRACEPOINT_PROBE(task, task_newtask)
{
    __u64 flags = args->clone_flags;

    if (flags & EDR_CLONE_THREAD)
        return 0;
    struct edr_fork_event ev = {};
    if (flags & EDR_CLONE_INTO_CGROUP)
        ev.flags |= EDR_FORK_INTO_CGROUP;
    edr_header_fill(&ev.h, EDR_EV_FORK);
    /* the parent process is the caller's tgid, whichever of its threads forked */
    ev.ppid = ev.h.pid;
    ev.child_pid = args->pid;
    ev.child_start_ticks = ev.h.ktime_ns / EDR_NS_PER_TICK;
    edr_submit(&ev, sizeof(ev), EDR_EV_FORK);
    return 0;
}

/* -- exec ------------------------------------------------------------------------------- */

#ifdef EDR_ARGS_FROM_MM
/* argv from the new image: mm->arg_start..arg_end holds the strings, NUL-terminated, as the
 * kernel copied them from the caller. One read of at most EDR_ARGS_MAX_BYTES. */
static __always_inline void edr_exec_args(struct edr_exec_event *e)
{
    __u64 task = bpf_get_current_task(); /* an integer, not a pointer BCC would rewrite */
    __u64 mm = 0, start = 0, end = 0;

    e->args_count = 0;
    e->args_size = 0;
    if (bpf_probe_read_kernel(&mm, sizeof(mm), (void *)(task + EDR_TASK_MM_OFF)) || !mm ||
        bpf_probe_read_kernel(&start, sizeof(start), (void *)(mm + EDR_MM_ARG_START_OFF)) ||
        bpf_probe_read_kernel(&end, sizeof(end), (void *)(mm + EDR_MM_ARG_END_OFF)) ||
        end < start) {
        e->flags = EDR_EXEC_NO_ARGS;
        return;
    }
    __u64 len = end - start;
    e->flags = EDR_EXEC_ARGS_BLOCK;
    if (len > EDR_ARGS_MAX_BYTES) {
        len = EDR_ARGS_MAX_BYTES;
        e->flags |= EDR_EXEC_ARGS_TRUNCATED;
    }
    /* the mask is a no-op (len <= MAX) that shows the verifier the read fits the buffer */
    if (bpf_probe_read_user(e->args, len & (EDR_ARGS_BUF - 1), (void *)start)) {
        e->flags = EDR_EXEC_NO_ARGS;
        return;
    }
    e->args_size = len;
}
#else
static __always_inline int edr_exec_enter(const char *const *argv)
{
    __u32 zero = 0;
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct edr_exec_event *e = exec_scratch.lookup(&zero);

    if (!e)
        return 0;
    e->flags = 0;
    e->args_count = 0;
    __u32 off = 0;
    const char *p = NULL;
    for (int i = 0; i < EDR_ARGS_MAX_COUNT; i++) {
        if (bpf_probe_read_user(&p, sizeof(p), &argv[i]) || !p)
            goto done;
        if (off >= EDR_ARGS_MAX_BYTES) {
            e->flags |= EDR_EXEC_ARGS_TRUNCATED;
            goto done;
        }
        /* the mask is a no-op (off < MAX) that shows the verifier the read stays in the
         * 2*MAX buffer */
        long n = bpf_probe_read_user_str(&e->args[off & (EDR_ARGS_MAX_BYTES - 1)],
                                         EDR_ARGS_MAX_BYTES, p);
        if (n <= 0)
            goto done;
        if (n >= EDR_ARGS_MAX_BYTES)
            e->flags |= EDR_EXEC_ARGS_TRUNCATED;
        off += n;
        e->args_count += 1;
    }
    /* all EDR_ARGS_MAX_COUNT slots used: is there one more? */
    if (!bpf_probe_read_user(&p, sizeof(p), &argv[EDR_ARGS_MAX_COUNT]) && p)
        e->flags |= EDR_EXEC_ARGS_TRUNCATED;
done:
    if (off > EDR_ARGS_MAX_BYTES) {
        off = EDR_ARGS_MAX_BYTES;
        e->flags |= EDR_EXEC_ARGS_TRUNCATED;
    }
    e->args_size = off;
    if (exec_stash.update(&tid, e))
        edr_count_drop(EDR_EV_EXEC); /* stash full: the exec is still reported, without argv */
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    return edr_exec_enter(args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    return edr_exec_enter(args->argv);
}
#endif

/* Runs after the point of no return, in the new image; for an exec from a non-leader thread
 * the caller has already taken over the leader's pid and old_pid is its former tid. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    __u32 zero = 0;
    __u32 old_pid = args->old_pid;
#ifdef EDR_ARGS_FROM_MM
    struct edr_exec_event *e = exec_scratch.lookup(&zero);

    if (!e)
        return 0;
    edr_exec_args(e);
#else
    struct edr_exec_event *e = exec_stash.lookup(&old_pid);

    if (!e) {
        e = exec_scratch.lookup(&zero);
        if (!e)
            return 0;
        e->flags = EDR_EXEC_NO_ARGS;
        e->args_count = 0;
        e->args_size = 0;
    }
#endif
    edr_header_fill(&e->h, EDR_EV_EXEC);
    e->old_pid = old_pid;
    e->cgroup_id = bpf_get_current_cgroup_id();
    e->loginuid = 0xffffffff;
    e->_pad1 = 0;
#ifdef EDR_TASK_LOGINUID_OFF
    {
        /* an integer, not a struct pointer: BCC must not rewrite this into header offsets */
        __u64 task = bpf_get_current_task();
        if (!bpf_probe_read_kernel(&e->loginuid, sizeof(e->loginuid),
                                   (void *)(task + EDR_TASK_LOGINUID_OFF)))
            e->flags |= EDR_EXEC_HAVE_LOGINUID;
    }
#endif
    TP_DATA_LOC_READ_STR(e->filename, filename, EDR_PATH_LEN);
    __u32 size = e->args_size;
    if (size > EDR_ARGS_MAX_BYTES)
        size = EDR_ARGS_MAX_BYTES;
    edr_submit(e, offsetof(struct edr_exec_event, args) + size, EDR_EV_EXEC);
#ifndef EDR_ARGS_FROM_MM
    exec_stash.delete(&old_pid);
#endif
#ifndef EDR_TASK_EXIT_CODE_OFF
    /* signals seen while other threads were torn down by this exec are not an exit status */
    __u32 tgid = e->h.pid;
    exit_state.delete(&tgid);
#endif
    return 0;
}

#ifndef EDR_ARGS_FROM_MM
static __always_inline int edr_exec_exit(long ret)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();

    if (ret < 0)
        exec_stash.delete(&tid); /* failed exec: nothing will consume the stash */
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
    return edr_exec_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
    return edr_exec_exit(args->ret);
}
#endif

/* -- exit ------------------------------------------------------------------------------- */

#ifndef EDR_TASK_EXIT_CODE_OFF

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct edr_exit_state st = {};

    st.code = args->error_code & 0xff;
    st.flags = EDR_EXIT_HAVE_CODE | EDR_EXIT_GROUP;
    exit_state.update(&tgid, &st);
    return 0;
}

/* A thread's own exit(2): the process status only if it turns out to be the last thread. */
TRACEPOINT_PROBE(syscalls, sys_enter_exit)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct edr_exit_state *cur = exit_state.lookup(&tgid);

    if (cur) {
        if (!(cur->flags & EDR_EXIT_GROUP)) {
            cur->code = args->error_code & 0xff;
            cur->flags |= EDR_EXIT_HAVE_CODE;
        }
        return 0;
    }
    struct edr_exit_state st = {};
    st.code = args->error_code & 0xff;
    st.flags = EDR_EXIT_HAVE_CODE;
    exit_state.update(&tgid, &st);
    return 0;
}

static __always_inline int edr_default_is_fatal(int sig)
{
    /* default action ignore (CHLD, URG, WINCH), continue (CONT) or stop (STOP, TSTP, TTIN,
     * TTOU) */
    return !(sig == 17 || sig == 18 || sig == 19 || sig == 20 || sig == 21 || sig == 22 ||
             sig == 23 || sig == 28);
}

/* Fires in the receiving task as it acts on a signal. With the default handler and a fatal
 * default action the process is dying of it. */
TRACEPOINT_PROBE(signal, signal_deliver)
{
    int sig = args->sig;

    if (args->sa_handler != 0 || sig <= 0 || sig >= 65 || !edr_default_is_fatal(sig))
        return 0;
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct edr_exit_state *cur = exit_state.lookup(&tgid);
    if (cur) {
        /* after exit_group the other threads get SIGKILL: that is not the status */
        if (!(cur->flags & EDR_EXIT_GROUP)) {
            cur->signal = sig;
            cur->flags |= EDR_EXIT_HAVE_SIGNAL;
        }
        return 0;
    }
    struct edr_exit_state st = {};
    st.signal = sig;
    st.flags = EDR_EXIT_HAVE_SIGNAL;
    exit_state.update(&tgid, &st);
    return 0;
}

#endif /* !EDR_TASK_EXIT_CODE_OFF */

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)id;
    __u32 tgid = id >> 32;

    /* A lockless lookup first: the entry is almost never there at exit (the syscall's exit
     * removed it), and a delete takes the bucket lock either way. */
    if (chdir_stash.lookup(&tid))
        chdir_stash.delete(&tid);
#ifdef EDR_HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#ifdef EDR_FILE
    edr_watch_owner_gone(tgid);
#endif
#else
    /* older kernels lack group_dead: the leader's exit is the best available signal */
    if (tid != tgid)
        return 0;
#endif
    struct edr_exit_event ev = {};
    edr_header_fill(&ev.h, EDR_EV_EXIT);
#ifdef EDR_TASK_EXIT_CODE_OFF
    /* a wait status: the signal in the low 7 bits (0x80: core dumped), else the code in
     * bits 8-15. The thread that ends the group carries the group's status. */
    __s32 status = 0;
    __u64 task = bpf_get_current_task();
    if (!bpf_probe_read_kernel(&status, sizeof(status), (void *)(task + EDR_TASK_EXIT_CODE_OFF))) {
        if (status & 0x7f) {
            ev.signal = status & 0x7f;
            ev.flags = EDR_EXIT_HAVE_SIGNAL;
        } else {
            ev.exit_code = (status >> 8) & 0xff;
            ev.flags = EDR_EXIT_HAVE_CODE;
        }
    }
#else
    struct edr_exit_state *st = exit_state.lookup(&tgid);
    if (st) {
        if (st->flags & EDR_EXIT_GROUP) {
            ev.exit_code = st->code;
            ev.flags = EDR_EXIT_HAVE_CODE;
        } else if (st->flags & EDR_EXIT_HAVE_SIGNAL) {
            ev.signal = st->signal;
            ev.flags = EDR_EXIT_HAVE_SIGNAL;
        } else if (st->flags & EDR_EXIT_HAVE_CODE) {
            ev.exit_code = st->code;
            ev.flags = EDR_EXIT_HAVE_CODE;
        }
        exit_state.delete(&tgid);
    }
#endif
    edr_submit(&ev, sizeof(ev), EDR_EV_EXIT);
    return 0;
}

/* -- cgroup moves ---------------------------------------------------------------------- */

TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
    __u32 zero = 0;
    struct edr_cgroup_event *e = cgroup_scratch.lookup(&zero);

    if (!e)
        return 0;
    edr_header_fill(&e->h, EDR_EV_CGROUP);
    e->target_pid = args->pid;
    e->root = args->dst_root;
    TP_DATA_LOC_READ_STR(e->path, dst_path, EDR_PATH_LEN);
    edr_submit(e, sizeof(*e), EDR_EV_CGROUP);
    return 0;
}

/* -- working directory (keeps the table's cwd right for relative paths) ------------------ */

TRACEPOINT_PROBE(syscalls, sys_enter_chdir)
{
    __u32 zero = 0;
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct edr_chdir_event *e = chdir_scratch.lookup(&zero);

    if (!e)
        return 0;
    e->fd = -1;
    if (bpf_probe_read_user_str(e->path, sizeof(e->path), args->filename) <= 0)
        return 0;
    chdir_stash.update(&tid, e);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchdir)
{
    __u32 zero = 0;
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct edr_chdir_event *e = chdir_scratch.lookup(&zero);

    if (!e)
        return 0;
    e->fd = args->fd;
    e->path[0] = 0;
    chdir_stash.update(&tid, e);
    return 0;
}

static __always_inline int edr_chdir_exit(long ret)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct edr_chdir_event *e = chdir_stash.lookup(&tid);

    if (!e)
        return 0;
    if (ret == 0) {
        edr_header_fill(&e->h, EDR_EV_CHDIR);
        edr_submit(e, sizeof(*e), EDR_EV_CHDIR);
    }
    chdir_stash.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_chdir)
{
    return edr_chdir_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_fchdir)
{
    return edr_chdir_exit(args->ret);
}
