/* Flow aggregation, in-kernel filters and logging modes (included by hdrlog.c).
 *
 * Logic
 * -----
 * After parse() has filled a record (in the per-CPU scratch buffer), handle()
 * asks, in this order:
 *
 * 1. filter_pass(): does the packet pass the filters? The rules live in maps
 *    that user space rewrites while the program runs (collector/filters.py):
 *    `f_addr` (LPM trie over IPv6 / IPv4-mapped addresses), `f_ports` (one
 *    entry per port number), `f_ifaces` (per ifindex) and the protocol and
 *    direction tables inside `cfg`. Each entry holds F_INC_* / F_EXC_* bits for
 *    the source side, the destination side and either side. A dimension that
 *    has include rules (cfg.filter_flags) keeps only packets that match one of
 *    them; an exclude rule that matches drops the packet; dimensions are ANDed.
 *    User space ORs the bits of every covering prefix into each trie entry, so
 *    the one longest-prefix lookup per address answers for all rules.
 *    Rejected packets count as CNT_FILTERED and cost nothing further.
 * 2. In MODE_FLOWS and MODE_AUTO, flow_account() adds the packet to its flow:
 *    key (ifindex, direction, IP version, protocol, addresses, ports), value
 *    packets, bytes, first/last seen, OR of TCP flags. Two hash maps, `flows0`
 *    and `flows1`: cfg.flow_slot says which one is live. Every flow interval
 *    user space flips the slot, waits a grace period for programs still using
 *    the old map, and drains the old map whole with one batch
 *    lookup-and-delete (collector/flows.py). So every flow row covers at most
 *    one interval (active timeout = idle timeout = the interval) and nothing
 *    is read while it is being written. The maps are plain hashes on purpose:
 *    an LRU map would evict a live flow's counts silently when full; a full
 *    hash refuses the insert, and the packet goes to the ring buffer instead
 *    with LOG_FLOW_FALLBACK (CNT_FLOW_MAP_FULL), where user space adds it to
 *    the flows it builds from such records. A flow that already had an entry
 *    in the other map (it was alive in the last interval) is marked
 *    FLOW_CONTINUED, so its "first packets" are not logged again.
 * 3. Which packets become records: MODE_PACKETS logs every packet that passes
 *    (or a 1:N sample, LOG_SAMPLED, when cfg.sample_n > 1); MODE_FLOWS logs
 *    none (only map-full fallbacks); MODE_AUTO logs notable packets -- the
 *    first cfg.first_packets of a flow, TCP SYN/FIN/RST, DNS ports, ICMP,
 *    app-layer candidates (payload copied) -- and a 1:N sample of the rest
 *    (cfg.sample_n, 0 = none). Packets not logged count as CNT_SAMPLED_OUT
 *    in MODE_PACKETS and MODE_AUTO (in MODE_AUTO they are in a flow all the
 *    same). The record's log_reason says why it was logged, so user space
 *    can set sample_rate: N for LOG_SAMPLED only, else 1.
 *
 * Everything here is configuration in maps, so mode, sampling, first-N and
 * filters change while running without reloading the program.
 */
#ifndef HDRLOG_FLOWS_H
#define HDRLOG_FLOWS_H

#ifndef HDRLOG_FLOW_ENTRIES
#define HDRLOG_FLOW_ENTRIES 65536
#endif
#ifndef HDRLOG_FILTER_PREFIXES
#define HDRLOG_FILTER_PREFIXES 4096
#endif
#ifndef HDRLOG_FILTER_IFACES
#define HDRLOG_FILTER_IFACES 256
#endif

/* cfg.mode */
#define MODE_PACKETS 0
#define MODE_FLOWS 1
#define MODE_AUTO 2

/* pkt_record.log_reason bits: why the record was sent. */
#define LOG_ALL           (1 << 0) /* MODE_PACKETS without sampling */
#define LOG_SAMPLED       (1 << 1) /* the 1:N sample: stands for N packets */
#define LOG_FIRST         (1 << 2) /* among the first cfg.first_packets of its flow */
#define LOG_TCP_CTRL      (1 << 3) /* TCP SYN, FIN or RST */
#define LOG_DNS           (1 << 4) /* UDP/TCP to or from a DNS port */
#define LOG_ICMP          (1 << 5) /* ICMP or ICMPv6 */
#define LOG_APP           (1 << 6) /* app-layer candidate: payload bytes follow */
#define LOG_FLOW_FALLBACK (1 << 7) /* flow map full: count this packet in flows from the record */

/* Filter bits, in f_addr / f_ports / f_ifaces values and cfg.proto / cfg.dir. */
#define F_INC_SRC (1 << 0)
#define F_EXC_SRC (1 << 1)
#define F_INC_DST (1 << 2)
#define F_EXC_DST (1 << 3)
#define F_INC_ANY (1 << 4) /* either side */
#define F_EXC_ANY (1 << 5)

/* cfg.filter_flags: which dimensions have rules at all (skip their lookups when
 * not) and which have include rules (then a packet must match one). */
#define FF_ADDR        (1 << 0)
#define FF_ADDR_INC_SRC (1 << 1)
#define FF_ADDR_INC_DST (1 << 2)
#define FF_ADDR_INC_ANY (1 << 3)
#define FF_PORT        (1 << 4)
#define FF_PORT_INC_SRC (1 << 5)
#define FF_PORT_INC_DST (1 << 6)
#define FF_PORT_INC_ANY (1 << 7)
#define FF_PROTO       (1 << 8)
#define FF_PROTO_INC   (1 << 9)
#define FF_IFACE       (1 << 10)
#define FF_IFACE_INC   (1 << 11)
#define FF_DIR         (1 << 12)
#define FF_DIR_INC     (1 << 13)

/* flow_value.flags */
#define FLOW_CONTINUED (1 << 0) /* the flow had an entry in the other map: not new */

/* Runtime configuration, one entry, written by user space. */
struct hdrlog_cfg {
    __u32 mode;          /* MODE_* */
    __u32 sample_n;      /* 1:N sample (MODE_PACKETS: 1 = all; MODE_AUTO: 0 = none) */
    __u32 first_packets; /* MODE_AUTO: log the first N packets of each flow */
    __u32 flow_slot;     /* live flow map: 0 = flows0, 1 = flows1 */
    __u32 filter_flags;  /* FF_* */
    __u8  dir[4];        /* F_INC_ANY / F_EXC_ANY per DIR_* */
    __u8  proto[256];    /* F_INC_ANY / F_EXC_ANY per IP protocol */
};

struct flow_key {
    __u32 ifindex;
    __u8  direction;
    __u8  ip_version;
    __u8  ip_proto;
    __u8  _pad;
    __u8  src_ip[16];    /* as in pkt_record */
    __u8  dst_ip[16];
    __u16 src_port;
    __u16 dst_port;
};                       /* 44 bytes */

struct flow_value {
    __u64 packets;
    __u64 bytes;         /* wire_len summed */
    __u64 first_ns;      /* CLOCK_MONOTONIC */
    __u64 last_ns;
    __u32 tcp_flags;     /* OR of pkt_record.tcp_flags */
    __u32 flags;         /* FLOW_* */
};                       /* 40 bytes */

struct addr_key {        /* LPM trie key */
    __u32 prefixlen;     /* 0..128 over the IPv6 / IPv4-mapped address */
    __u8  addr[16];
};

/* Key: 0 (u32). Value: struct hdrlog_cfg. */
BPF_ARRAY(cfg, struct hdrlog_cfg, 1);
/* Key: struct flow_key. Value: struct flow_value. Live while cfg.flow_slot == 0. */
BPF_HASH(flows0, struct flow_key, struct flow_value, HDRLOG_FLOW_ENTRIES);
/* Key: struct flow_key. Value: struct flow_value. Live while cfg.flow_slot == 1. */
BPF_HASH(flows1, struct flow_key, struct flow_value, HDRLOG_FLOW_ENTRIES);
/* Key: struct addr_key (longest prefix). Value: u8 F_* bits, ancestors' bits ORed in. */
BPF_F_TABLE("lpm_trie", struct addr_key, u8, f_addr, HDRLOG_FILTER_PREFIXES, BPF_F_NO_PREALLOC);
/* Key: port number (u32 index). Value: u8 F_* bits. */
BPF_ARRAY(f_ports, u8, 65536);
/* Key: ifindex (u32). Value: u8 F_INC_ANY / F_EXC_ANY. */
BPF_HASH(f_ifaces, u32, u8, HDRLOG_FILTER_IFACES);

/* One dimension: include rules present -> must match one; exclude match -> out. */
#define F_OK(bits, inc_present, inc_bit, exc_bit) \
    ((!(inc_present) || ((bits) & (inc_bit))) && !((bits) & (exc_bit)))

static __always_inline int filter_pass(const struct pkt_record *r, const struct hdrlog_cfg *c)
{
    u32 ff = c->filter_flags;
    if (!ff)
        return 1;
    if (ff & FF_DIR) {
        u8 b = c->dir[r->direction & 3];
        if (!F_OK(b, ff & FF_DIR_INC, F_INC_ANY, F_EXC_ANY))
            return 0;
    }
    if (ff & FF_PROTO) {
        u8 b = r->ip_version ? c->proto[r->ip_proto] : 0;
        if (!F_OK(b, ff & FF_PROTO_INC, F_INC_ANY, F_EXC_ANY))
            return 0;
    }
    if (ff & FF_IFACE) {
        u32 idx = r->ifindex;
        u8 *p = f_ifaces.lookup(&idx);
        u8 b = p ? *p : 0;
        if (!F_OK(b, ff & FF_IFACE_INC, F_INC_ANY, F_EXC_ANY))
            return 0;
    }
    if (ff & FF_PORT) {
        u32 sp = r->src_port, dp = r->dst_port;
        u8 *ps = f_ports.lookup(&sp);
        u8 *pd = f_ports.lookup(&dp);
        u8 bs = ps ? *ps : 0, bd = pd ? *pd : 0;
        u8 any = bs | bd;
        if (!F_OK(bs, ff & FF_PORT_INC_SRC, F_INC_SRC, F_EXC_SRC) ||
            !F_OK(bd, ff & FF_PORT_INC_DST, F_INC_DST, F_EXC_DST) ||
            !F_OK(any, ff & FF_PORT_INC_ANY, F_INC_ANY, F_EXC_ANY))
            return 0;
    }
    if (ff & FF_ADDR) {
        struct addr_key k = {.prefixlen = 128};
        __builtin_memcpy(k.addr, r->src_ip, 16);
        u8 *ps = f_addr.lookup(&k);
        __builtin_memcpy(k.addr, r->dst_ip, 16);
        u8 *pd = f_addr.lookup(&k);
        u8 bs = ps ? *ps : 0, bd = pd ? *pd : 0;
        if (!r->ip_version) /* non-IP: no address to match */
            bs = bd = 0;
        u8 any = bs | bd;
        if (!F_OK(bs, ff & FF_ADDR_INC_SRC, F_INC_SRC, F_EXC_SRC) ||
            !F_OK(bd, ff & FF_ADDR_INC_DST, F_INC_DST, F_EXC_DST) ||
            !F_OK(any, ff & FF_ADDR_INC_ANY, F_INC_ANY, F_EXC_ANY))
            return 0;
    }
    return 1;
}

/* Add the packet to its flow in the live map. Returns 0 and sets *first when
 * it is among the first `first_n` packets of a flow that is new, or -1 when
 * the map is full (the caller falls back to the ring buffer). */
static __always_inline int flow_account(const struct pkt_record *r, u32 slot, u32 first_n, int *first)
{
    struct flow_key k = {};
    k.ifindex = r->ifindex;
    k.direction = r->direction;
    k.ip_version = r->ip_version;
    k.ip_proto = r->ip_proto;
    __builtin_memcpy(k.src_ip, r->src_ip, 16);
    __builtin_memcpy(k.dst_ip, r->dst_ip, 16);
    k.src_port = r->src_port;
    k.dst_port = r->dst_port;

    struct flow_value *v = slot ? flows1.lookup(&k) : flows0.lookup(&k);
    if (!v) {
        struct flow_value nv = {};
        nv.packets = 1;
        nv.bytes = r->wire_len;
        nv.first_ns = r->mono_ns;
        nv.last_ns = r->mono_ns;
        nv.tcp_flags = r->tcp_flags;
        if (first_n) {
            struct flow_value *prev = slot ? flows0.lookup(&k) : flows1.lookup(&k);
            if (prev)
                nv.flags = FLOW_CONTINUED;
        }
        int err = slot ? flows1.insert(&k, &nv) : flows0.insert(&k, &nv);
        if (err == 0) {
            *first = first_n > 0 && !(nv.flags & FLOW_CONTINUED);
            return 0;
        }
        /* -EEXIST: another CPU created it meanwhile; add to theirs. Else full. */
        v = slot ? flows1.lookup(&k) : flows0.lookup(&k);
        if (!v)
            return -1;
    }
    u64 before = __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->bytes, r->wire_len);
    if (r->mono_ns > v->last_ns)
        v->last_ns = r->mono_ns;
    u32 tf = r->tcp_flags;
    if (tf & ~v->tcp_flags)
        __sync_fetch_and_or(&v->tcp_flags, tf);
    *first = before < first_n && !(v->flags & FLOW_CONTINUED);
    return 0;
}

/* LOG_* bits for a notable packet in MODE_AUTO (0 = not notable). */
static __always_inline u8 notable(const struct pkt_record *r, int first)
{
    u8 why = first ? LOG_FIRST : 0;
    u8 p = r->ip_proto;
    if (!r->ip_version)
        return why;
    if (p == IPPROTO_TCP && (r->tcp_flags & 0x07)) /* FIN, SYN, RST */
        why |= LOG_TCP_CTRL;
    if ((p == IPPROTO_UDP || p == IPPROTO_TCP) &&
        (HDRLOG_IS_DNS_PORT(r->src_port) || HDRLOG_IS_DNS_PORT(r->dst_port)))
        why |= LOG_DNS;
    if (p == IPPROTO_ICMP || p == IPPROTO_ICMPV6_)
        why |= LOG_ICMP;
    if (r->payload_len)
        why |= LOG_APP;
    return why;
}

#endif /* HDRLOG_FLOWS_H */
