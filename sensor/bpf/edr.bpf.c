/* edr.bpf.c: the one BPF object of the sensor's BCC tiers.
 *
 * Hooks: nothing itself; it holds what every family shares (the ring buffer, the per-type
 * counters, the ignored-tgid map, the submit helper) and includes the family files chosen by
 * -D cflags: EDR_PROCESS, EDR_FILE, EDR_NETWORK (and EDR_KPROBES for the kprobe tier).
 * Emits: whatever the included families emit, all through one ring buffer so that events of
 * every family arrive in the order they were submitted.
 * Caveats: tracepoint programs read only tracepoint arguments and BPF helpers, never kernel
 * struct fields by name, because the headers BCC compiles against may not match the running
 * kernel; the one exception reads task_struct fields at offsets taken from the running
 * kernel's BTF (sensor/btf.py), passed in as -D constants.
 * BCC rewrites only the main file (tracepoint argument structs, map method calls, program
 * sections), so the loader (sensor/ebpf.py, bpf_source_text) pastes the "*.bpf.c" includes
 * below in place, with #line markers; events.h is a plain include. Compiler line numbers
 * after the first probe are shifted by the structs BCC inserts.
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#include "events.h"

#ifndef EDR_RINGBUF_PAGES
#define EDR_RINGBUF_PAGES 4096 /* 16 MiB with 4 KiB pages: room for stalls of the reader */
#endif
#ifndef EDR_WAKE_EVERY
#define EDR_WAKE_EVERY 64 /* force a reader wake-up every N events per CPU */
#endif
#ifndef EDR_STASH_ENTRIES
#define EDR_STASH_ENTRIES 4096
#endif

BPF_RINGBUF_OUTPUT(events, EDR_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(counters, struct edr_counter, EDR_EV_MAX);
/* per-CPU count of submissions since the last forced wake-up */
BPF_PERCPU_ARRAY(wake_count, __u64, 1);
/* the sensor's own processes: their file and network activity is not reported */
BPF_HASH(ignored_tgids, __u32, __u8, 1024);

static __always_inline int edr_ignored(__u32 tgid)
{
    return ignored_tgids.lookup(&tgid) != NULL;
}

static __always_inline void edr_header_fill(struct edr_header *h, __u32 type)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u64 ug = bpf_get_current_uid_gid();

    h->type = type;
    h->pid = id >> 32;
    h->tid = (__u32)id;
    h->uid = (__u32)ug;
    h->gid = ug >> 32;
    h->_pad0 = 0;
    h->ktime_ns = bpf_ktime_get_boot_ns();
    bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

/* Submit without waking the reader (it polls on a timer), except every EDR_WAKE_EVERY events
 * so a burst is drained before the ring fills. Every outcome is counted per type. */
static __always_inline int edr_submit(void *data, __u64 size, __u32 type)
{
    __u32 zero = 0;
    __u64 flags = BPF_RB_NO_WAKEUP;
    __u64 *n = wake_count.lookup(&zero);

    if (n) {
        *n += 1;
        if (*n >= EDR_WAKE_EVERY) {
            *n = 0;
            flags = BPF_RB_FORCE_WAKEUP;
        }
    }
    int err = events.ringbuf_output(data, size, flags);
    struct edr_counter *c = counters.lookup(&type);
    if (c) {
        if (err)
            c->dropped += 1;
        else
            c->submitted += 1;
    }
    return err;
}

/* Count an event that could not even be built (e.g. a full stash map) as dropped. */
static __always_inline void edr_count_drop(__u32 type)
{
    struct edr_counter *c = counters.lookup(&type);
    if (c)
        c->dropped += 1;
}

#if defined(EDR_PROCESS) || defined(EDR_FILE)
#include "process.bpf.c"
#endif
#ifdef EDR_FILE
#include "file.bpf.c"
#endif
#ifdef EDR_NETWORK
#include "network.bpf.c"
#endif
#ifdef EDR_KPROBES
#include "kprobe.bpf.c"
#endif

#ifdef EDR_LAYOUT_CHECK
/* Never attached: these maps exist so that tests can compare BCC's view of each struct
 * (the ctypes class it generates for the value type) with the Python mirrors. */
BPF_ARRAY(layout_header, struct edr_header, 1);
BPF_ARRAY(layout_fork, struct edr_fork_event, 1);
BPF_ARRAY(layout_exec, struct edr_exec_event, 1);
BPF_ARRAY(layout_exit, struct edr_exit_event, 1);
BPF_ARRAY(layout_chdir, struct edr_chdir_event, 1);
BPF_ARRAY(layout_file, struct edr_file_event, 1);
BPF_ARRAY(layout_write, struct edr_write_event, 1);
BPF_ARRAY(layout_net, struct edr_net_event, 1);
BPF_ARRAY(layout_cgroup, struct edr_cgroup_event, 1);
#endif
