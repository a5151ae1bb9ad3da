/* network.bpf.c: TCP connect, listen and accept, UDP connect (included by edr.bpf.c).
 *
 * Hooks: sock:inet_sock_set_state; syscalls:sys_enter/exit_accept(4), sys_enter/exit_socket,
 * sys_enter/exit_connect.
 * Emits: EDR_EV_CONNECT (TCP and UDP), EDR_EV_LISTEN, EDR_EV_ACCEPT.
 * TCP connect: CLOSE->SYN_SENT runs in the connecting process but before the source port is
 * chosen, so it only records who connects (keyed by the socket's address, a plain tracepoint
 * argument); the event is emitted at SYN_SENT->ESTABLISHED (ret 0) or ->CLOSE (ret -1), which
 * carry the full 4-tuple but may run in softirq under an unrelated pid.
 * TCP accept: SYN_RECV->ESTABLISHED (softirq) records local address and port keyed by the peer;
 * sys_exit_accept then reads the peer from the caller's sockaddr buffer, in process context,
 * and joins the two. accept() called with a NULL address buffer is not reported.
 * UDP connect: sockets made by socket(AF_INET/AF_INET6, SOCK_DGRAM) are remembered per
 * (tgid, fd); a successful connect(2) on one is reported with the destination only.
 * Caveats: addresses are raw; v4-mapped IPv6 addresses are normalised in user space.
 */

#define EDR_AF_INET 2
#define EDR_AF_INET6 10
#define EDR_IPPROTO_TCP 6
#define EDR_IPPROTO_UDP 17
#define EDR_SOCK_DGRAM 2
#define EDR_TCP_ESTABLISHED 1
#define EDR_TCP_SYN_SENT 2
#define EDR_TCP_SYN_RECV 3
#define EDR_TCP_CLOSE 7
#define EDR_TCP_LISTEN 10

struct edr_peer_key {
    __u16 family;
    __u16 port;
    __u8 addr[16];
};

struct edr_local {
    __u16 port;
    __u8 addr[16];
};

struct edr_fd_key {
    __u32 tgid;
    __s32 fd;
};

struct edr_accept_args {
    __u64 sockaddr;
    __s32 fd;
};

struct edr_socket_args {
    __s32 family;
    __s32 type;
};

BPF_HASH(connect_pending, __u64, struct edr_net_event, EDR_STASH_ENTRIES);
BPF_TABLE("lru_hash", struct edr_peer_key, struct edr_local, established, 16384);
BPF_HASH(accept_stash, __u32, struct edr_accept_args, EDR_STASH_ENTRIES);
BPF_HASH(socket_stash, __u32, struct edr_socket_args, EDR_STASH_ENTRIES);
BPF_TABLE("lru_hash", struct edr_fd_key, __u16, udp_fds, 65536);
BPF_HASH(udp_connect_stash, __u32, struct edr_net_event, EDR_STASH_ENTRIES);

/* Copy the tracepoint's local and remote addresses (v4 in the first 4 bytes). A macro because
 * the args struct BCC generates is only declared at the probe itself. */
#define EDR_TP_ADDRS(ev, args)                                                                  \
    do {                                                                                        \
        (ev)->family = (args)->family;                                                          \
        (ev)->protocol = (args)->protocol;                                                      \
        (ev)->sport = (args)->sport;                                                            \
        (ev)->dport = (args)->dport;                                                            \
        if ((args)->family == EDR_AF_INET) {                                                    \
            __builtin_memcpy((ev)->saddr, (args)->saddr, 4);                                    \
            __builtin_memcpy((ev)->daddr, (args)->daddr, 4);                                    \
        } else {                                                                                \
            __builtin_memcpy((ev)->saddr, (args)->saddr_v6, 16);                                \
            __builtin_memcpy((ev)->daddr, (args)->daddr_v6, 16);                                \
        }                                                                                       \
        (ev)->flags = EDR_NET_HAVE_LOCAL | EDR_NET_HAVE_PEER;                                   \
    } while (0)

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != EDR_IPPROTO_TCP)
        return 0;
    if (args->family != EDR_AF_INET && args->family != EDR_AF_INET6)
        return 0;
    int oldstate = args->oldstate;
    int newstate = args->newstate;
    __u64 sk = (__u64)args->skaddr;

    if (oldstate == EDR_TCP_CLOSE && newstate == EDR_TCP_SYN_SENT) {
        if (edr_ignored(bpf_get_current_pid_tgid() >> 32))
            return 0;
        struct edr_net_event ev = {};
        edr_header_fill(&ev.h, EDR_EV_CONNECT);
        if (connect_pending.update(&sk, &ev))
            edr_count_drop(EDR_EV_CONNECT);
        return 0;
    }
    if (oldstate == EDR_TCP_SYN_SENT) {
        struct edr_net_event *ev = connect_pending.lookup(&sk);
        if (!ev)
            return 0;
        EDR_TP_ADDRS(ev, args);
        ev->ret = newstate == EDR_TCP_ESTABLISHED ? 0 : -1;
        edr_submit(ev, sizeof(*ev), EDR_EV_CONNECT);
        connect_pending.delete(&sk);
        return 0;
    }
    if (newstate == EDR_TCP_LISTEN) {
        if (edr_ignored(bpf_get_current_pid_tgid() >> 32))
            return 0;
        struct edr_net_event ev = {};
        edr_header_fill(&ev.h, EDR_EV_LISTEN);
        EDR_TP_ADDRS(&ev, args);
        ev.flags = EDR_NET_HAVE_LOCAL;
        edr_submit(&ev, sizeof(ev), EDR_EV_LISTEN);
        return 0;
    }
    if (oldstate == EDR_TCP_SYN_RECV && newstate == EDR_TCP_ESTABLISHED) {
        struct edr_peer_key k = {};
        struct edr_local loc = {};
        k.family = args->family;
        k.port = args->dport;
        loc.port = args->sport;
        if (args->family == EDR_AF_INET) {
            __builtin_memcpy(k.addr, args->daddr, 4);
            __builtin_memcpy(loc.addr, args->saddr, 4);
        } else {
            __builtin_memcpy(k.addr, args->daddr_v6, 16);
            __builtin_memcpy(loc.addr, args->saddr_v6, 16);
        }
        established.update(&k, &loc);
    }
    return 0;
}

/* Read an AF_INET/AF_INET6 sockaddr from user memory into family, port and address. */
static __always_inline int edr_read_sockaddr(__u64 uaddr, __u16 *family, __u16 *port,
                                             __u8 *addr)
{
    __u16 fam = 0, nport = 0;

    if (!uaddr || bpf_probe_read_user(&fam, sizeof(fam), (void *)uaddr))
        return -1;
    if (bpf_probe_read_user(&nport, sizeof(nport), (void *)(uaddr + 2)))
        return -1;
    if (fam == EDR_AF_INET) {
        if (bpf_probe_read_user(addr, 4, (void *)(uaddr + 4)))
            return -1;
    } else if (fam == EDR_AF_INET6) {
        if (bpf_probe_read_user(addr, 16, (void *)(uaddr + 8)))
            return -1;
    } else {
        return -1;
    }
    *family = fam;
    *port = bpf_ntohs(nport);
    return 0;
}

#ifndef EDR_KPROBES /* the kprobe tier reads the accepted socket itself (kprobe.bpf.c) */
static __always_inline int edr_accept_enter(int fd, void *upeer)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)id;

    if (edr_ignored(id >> 32))
        return 0;
    struct edr_accept_args a = {};
    a.sockaddr = (__u64)upeer;
    a.fd = fd;
    accept_stash.update(&tid, &a);
    return 0;
}

static __always_inline int edr_accept_exit(long ret)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)id;
    struct edr_accept_args *a = accept_stash.lookup(&tid);

    if (!a)
        return 0;
    __u64 uaddr = a->sockaddr;
    accept_stash.delete(&tid);
    if (ret < 0)
        return 0;
    struct edr_fd_key fk = {.tgid = id >> 32, .fd = ret};
    udp_fds.delete(&fk); /* the new fd is a TCP socket */

    struct edr_net_event ev = {};
    if (edr_read_sockaddr(uaddr, &ev.family, &ev.dport, ev.daddr))
        return 0;
    edr_header_fill(&ev.h, EDR_EV_ACCEPT);
    ev.protocol = EDR_IPPROTO_TCP;
    ev.flags = EDR_NET_HAVE_PEER;
    struct edr_peer_key k = {};
    k.family = ev.family;
    k.port = ev.dport;
    __builtin_memcpy(k.addr, ev.daddr, 16);
    struct edr_local *loc = established.lookup(&k);
    if (loc) {
        ev.sport = loc->port;
        __builtin_memcpy(ev.saddr, loc->addr, 16);
        ev.flags |= EDR_NET_HAVE_LOCAL;
        established.delete(&k);
    }
    ev.ret = 0;
    edr_submit(&ev, sizeof(ev), EDR_EV_ACCEPT);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept)
{
    return edr_accept_enter(args->fd, args->upeer_sockaddr);
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept4)
{
    return edr_accept_enter(args->fd, args->upeer_sockaddr);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
    return edr_accept_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
    return edr_accept_exit(args->ret);
}
#endif

/* -- UDP ------------------------------------------------------------------------------ */

TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct edr_socket_args s = {.family = args->family, .type = args->type};

    socket_stash.update(&tid, &s);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)id;
    struct edr_socket_args *s = socket_stash.lookup(&tid);

    if (!s)
        return 0;
    int family = s->family, type = s->type;
    socket_stash.delete(&tid);
    if (args->ret < 0)
        return 0;
    struct edr_fd_key k = {.tgid = id >> 32, .fd = args->ret};
    /* the low bits are the type; SOCK_NONBLOCK/SOCK_CLOEXEC ride above them */
    if ((type & 0xf) == EDR_SOCK_DGRAM && (family == EDR_AF_INET || family == EDR_AF_INET6)) {
        __u16 fam = family;
        udp_fds.update(&k, &fam);
    } else {
        udp_fds.delete(&k); /* the fd number now names some other socket */
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)id;
    struct edr_fd_key k = {.tgid = id >> 32, .fd = args->fd};

    if (!udp_fds.lookup(&k) || edr_ignored(k.tgid))
        return 0;
    struct edr_net_event ev = {};
    if (edr_read_sockaddr((__u64)args->uservaddr, &ev.family, &ev.dport, ev.daddr))
        return 0; /* AF_UNSPEC dissolves the association: not a connection */
    edr_header_fill(&ev.h, EDR_EV_CONNECT);
    ev.protocol = EDR_IPPROTO_UDP;
    ev.flags = EDR_NET_HAVE_PEER;
    udp_connect_stash.update(&tid, &ev);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct edr_net_event *ev = udp_connect_stash.lookup(&tid);

    if (!ev)
        return 0;
    /* only successes: a stale (tgid, fd) entry can only make a connect fail */
    if (args->ret == 0) {
        ev->ret = 0;
        edr_submit(ev, sizeof(*ev), EDR_EV_CONNECT);
    }
    udp_connect_stash.delete(&tid);
    return 0;
}
