/* Event structs shared by every family, mirrored field for field in sensor/ebpf.py.
 *
 * Every event opens with struct edr_header, whose first field is the type tag. Layouts use
 * explicit padding so that the natural C layout equals the packed little-endian layout the
 * Python side decodes with `struct`; tests/bpf/test_layout.py compares both with what BCC
 * compiles, so drift fails a test instead of corrupting events.
 */
#ifndef EDR_EVENTS_H
#define EDR_EVENTS_H

#define EDR_COMM_LEN 16
#define EDR_PATH_LEN 256
/* argv bound: bytes and count. The buffer is twice the bound so that one more string read
 * at any in-bounds offset stays inside it, which is what lets the verifier accept the loop. */
#define EDR_ARGS_MAX_BYTES 4096
#define EDR_ARGS_BUF (2 * EDR_ARGS_MAX_BYTES)
#define EDR_ARGS_MAX_COUNT 128

enum edr_event_type {
    EDR_EV_FORK = 1,
    EDR_EV_EXEC = 2,
    EDR_EV_EXIT = 3,
    EDR_EV_CHDIR = 4,
    EDR_EV_FILE = 5,
    EDR_EV_CONNECT = 6,
    EDR_EV_LISTEN = 7,
    EDR_EV_ACCEPT = 8,
    EDR_EV_FILE_WRITE = 9, /* first write through a watched fd (struct edr_write_event) */
    EDR_EV_CGROUP = 10,    /* a task moved to another cgroup (struct edr_cgroup_event) */
    EDR_EV_MAX = 11,
};

enum edr_file_op {
    EDR_FILE_OPEN = 1,
    EDR_FILE_UNLINK = 2,
    EDR_FILE_RMDIR = 3,
    EDR_FILE_RENAME = 4,
    EDR_FILE_CHMOD = 5,
    EDR_FILE_CHOWN = 6,
};

/* exec flags */
#define EDR_EXEC_ARGS_TRUNCATED 1
#define EDR_EXEC_NO_ARGS 2 /* argv could not be read: user space reads /proc */
#define EDR_EXEC_HAVE_LOGINUID 4 /* loginuid was read from the task (BTF offset) */
/* args is the new image's argv block as the kernel laid it out (NUL-terminated strings,
 * args_size bytes, args_count 0): user space splits it, keeping at most EDR_ARGS_MAX_COUNT
 * strings (more set the truncation flag) */
#define EDR_EXEC_ARGS_BLOCK 8
/* fork flags */
#define EDR_FORK_INTO_CGROUP 1 /* clone3(CLONE_INTO_CGROUP): the child starts in another cgroup */
/* exit flags */
#define EDR_EXIT_HAVE_CODE 1
#define EDR_EXIT_HAVE_SIGNAL 2
/* file event `emit` bits: what user space does with an EDR_EV_FILE record */
#define EDR_FILE_REPORT 1 /* an ECS event */
#define EDR_FILE_WATCH 2  /* open: (tgid, ret) is watched for its first write, open_id ktime_ns */
/* network flags */
#define EDR_NET_HAVE_LOCAL 1
#define EDR_NET_HAVE_PEER 2

struct edr_header {
    __u32 type; /* enum edr_event_type: always first */
    __u32 pid;  /* tgid */
    __u32 tid;
    __u32 uid;
    __u32 gid;
    __u32 _pad0;
    __u64 ktime_ns; /* CLOCK_BOOTTIME */
    char comm[EDR_COMM_LEN];
};

struct edr_fork_event {
    struct edr_header h;
    __u32 ppid;
    __u32 child_pid;
    __u64 child_start_ticks;
    __u32 flags; /* EDR_FORK_* */
    __u32 _pad0;
};

struct edr_exec_event {
    struct edr_header h;
    __u32 old_pid;
    __u32 flags;
    __u32 args_count;
    __u32 args_size;
    __u64 cgroup_id; /* cgroup v2 id (bpf_get_current_cgroup_id): user space maps it to a
                      * container id with a cache instead of reading /proc per exec */
    __u32 loginuid; /* with EDR_EXEC_HAVE_LOGINUID: the audit login uid (-1: unset) */
    __u32 _pad1;
    char filename[EDR_PATH_LEN];
    char args[EDR_ARGS_BUF]; /* only args_size bytes are submitted */
};

struct edr_exit_event {
    struct edr_header h;
    __s32 exit_code;
    __s32 signal;
    __u32 flags;
    __u32 _pad0;
};

struct edr_chdir_event {
    struct edr_header h;
    __s32 fd; /* fchdir: the fd; chdir: -1 and path is set */
    __u32 _pad0;
    char path[EDR_PATH_LEN];
};

struct edr_file_event {
    struct edr_header h;
    __u32 op; /* enum edr_file_op */
    __u32 flags; /* open flags */
    __s32 dfd;   /* dirfd for path (AT_FDCWD = -100) */
    __s32 dfd2;  /* dirfd for path2 (rename) */
    __s32 fd;    /* fchmod/fchown: the fd, path empty; else -1 */
    __u32 mode;
    __u32 owner_uid;
    __u32 owner_gid;
    __u32 emit;  /* EDR_FILE_REPORT | EDR_FILE_WATCH */
    __u32 _pad0;
    __s64 ret;
    char path[EDR_PATH_LEN];
    char path2[EDR_PATH_LEN];
};

/* The first write (write, pwrite64, writev, pwritev(2), copy_file_range, sendfile, splice,
 * ftruncate, fallocate) through an fd that a write-capable open registered. */
struct edr_write_event {
    struct edr_header h;
    __s32 fd;
    __u32 _pad0;
    __u64 open_id; /* h.ktime_ns of the EDR_EV_FILE open record that registered the fd */
};

struct edr_net_event {
    struct edr_header h;
    __u16 family;
    __u16 protocol;
    __u16 sport; /* host byte order; local port */
    __u16 dport; /* host byte order; remote port */
    __u8 saddr[16]; /* local address (v4 in the first 4 bytes) */
    __u8 daddr[16]; /* remote address */
    __s32 ret;
    __u32 flags;
};

/* cgroup:cgroup_attach_task: the task is moved (by a write to cgroup.procs or tasks, which
 * the caller in h did) into another cgroup; user space re-reads its container */
struct edr_cgroup_event {
    struct edr_header h;
    __u32 target_pid; /* the moved task's id */
    __s32 root;       /* hierarchy id */
    char path[EDR_PATH_LEN];
};

/* submitted and dropped (ring buffer reserve failed), per event type, per CPU */
struct edr_counter {
    __u64 submitted;
    __u64 dropped;
};

#endif
