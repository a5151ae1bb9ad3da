/* kprobe.bpf.c: the kprobe tier's enrichment (included by edr.bpf.c with -DEDR_KPROBES).
 *
 * UNTESTED HERE: the development and CI kernel has no kprobes (CONFIG_KPROBES unset), so this
 * file is compiled and exercised only under the QEMU harness with a distribution kernel.
 * Hooks: kprobe do_exit (the full wait status of the exiting task), kretprobe
 * inet_csk_accept (the accepted socket's 4-tuple, from struct sock).
 * Emits: EDR_EV_ACCEPT (with both ends, replacing the syscall-based accept of network.bpf.c);
 * the exit status feeds EDR_EV_EXIT through exit_state (only without the BTF offset of
 * task_struct.exit_code: with it sched_process_exit reads the same status from the task).
 * Caveats: reads kernel structs, so it is only correct with headers that match the running
 * kernel; the loader refuses the tier otherwise.
 */
/* net/sock.h pulls in the kernel's linux/bpf.h, whose inline helpers take sizeof() of BPF
 * object types (bpf_rb_root, bpf_rb_node, bpf_refcount, bpf_wq: kernels 6.3 to 6.10). BCC
 * compiles against its own copy of uapi/linux/bpf.h, and older BCC releases (Debian 12 ships
 * 0.26) lack them, so the 6.12 headers fail with "incomplete type". The kernel headers are
 * pointed at private complete copies (layouts as in uapi/linux/bpf.h) under other names: no
 * clash with a BCC that does define them, and nothing here uses them. */
#define bpf_rb_root edr_compat_bpf_rb_root
#define bpf_rb_node edr_compat_bpf_rb_node
#define bpf_refcount edr_compat_bpf_refcount
#define bpf_wq edr_compat_bpf_wq
struct edr_compat_bpf_rb_root {
    __u64 __opaque[2];
} __attribute__((aligned(8)));
struct edr_compat_bpf_rb_node {
    __u64 __opaque[4];
} __attribute__((aligned(8)));
struct edr_compat_bpf_refcount {
    __u32 __opaque[1];
} __attribute__((aligned(4)));
struct edr_compat_bpf_wq {
    __u64 __opaque[2];
} __attribute__((aligned(8)));
#include <net/sock.h>
#undef bpf_rb_root
#undef bpf_rb_node
#undef bpf_refcount
#undef bpf_wq

#define EDR_EXIT_STATUS 8 /* internal: code holds a raw wait status from do_exit */

#if defined(EDR_PROCESS) && !defined(EDR_TASK_EXIT_CODE_OFF)
int kprobe__do_exit(struct pt_regs *ctx, long code)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct edr_exit_state st = {};
    int status = (int)code;

    /* a wait status: low 7 bits the fatal signal, else bits 8-15 the exit code */
    if (status & 0x7f) {
        st.signal = status & 0x7f;
        st.flags = EDR_EXIT_HAVE_SIGNAL | EDR_EXIT_STATUS;
    } else {
        st.code = (status >> 8) & 0xff;
        st.flags = EDR_EXIT_HAVE_CODE | EDR_EXIT_GROUP | EDR_EXIT_STATUS;
    }
    exit_state.update(&tgid, &st);
    return 0;
}
#endif

#ifdef EDR_NETWORK
int kretprobe__inet_csk_accept(struct pt_regs *ctx)
{
    struct sock *sk = (struct sock *)PT_REGS_RC(ctx);

    if (!sk || edr_ignored(bpf_get_current_pid_tgid() >> 32))
        return 0;
    struct edr_net_event ev = {};
    edr_header_fill(&ev.h, EDR_EV_ACCEPT);
    ev.family = sk->__sk_common.skc_family;
    ev.protocol = EDR_IPPROTO_TCP;
    ev.sport = sk->__sk_common.skc_num;
    ev.dport = bpf_ntohs(sk->__sk_common.skc_dport);
    if (ev.family == EDR_AF_INET) {
        bpf_probe_read_kernel(ev.saddr, 4, &sk->__sk_common.skc_rcv_saddr);
        bpf_probe_read_kernel(ev.daddr, 4, &sk->__sk_common.skc_daddr);
    } else if (ev.family == EDR_AF_INET6) {
        bpf_probe_read_kernel(ev.saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
        bpf_probe_read_kernel(ev.daddr, 16, &sk->__sk_common.skc_v6_daddr);
    } else {
        return 0;
    }
    ev.flags = EDR_NET_HAVE_LOCAL | EDR_NET_HAVE_PEER;
    edr_submit(&ev, sizeof(ev), EDR_EV_ACCEPT);
    return 0;
}
#endif
