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
 * The maps and the functions that use them (filter_pass, flow_account) are in
 * hdrlog.c: BCC rewrites map calls in the main source file only.
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
