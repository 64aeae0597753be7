/* hdrlog TC classifier: one header record per packet, through a ring buffer.
 *
 * Logic
 * -----
 * hdrlog_ingress and hdrlog_egress are attached (direct-action) to the clsact
 * ingress and egress hooks of every monitored interface. Both run parse(), which
 * reserves one fixed-size `struct pkt_record` (types.h) in the `records` ring
 * buffer, zeroes it, fills it, and submits it. The program never drops, edits or
 * redirects a packet: it always returns TC_ACT_UNSPEC, so the packet continues as
 * if the program were not there and any later filter on the hook still runs.
 *
 * Parsing walks the headers, each read by load(): straight from the skb's linear
 * data when the header is there (direct packet access, the usual case), else with
 * bpf_skb_load_bytes (safe on non-linear skbs):
 *   Ethernet -> up to HDRLOG_MAX_VLAN in-frame 802.1Q / 802.1ad tags (an outer tag
 *   the kernel moved into skb metadata counts as the outermost one and adds 4
 *   bytes to wire_len; vlan_id is the outermost tag, vlan_inner_id the innermost
 *   when there are two or more) -> IPv4 (options skipped by IHL; L4 only in the first
 *   fragment) or IPv6 (hop-by-hop, routing, fragment, destination-options and AH
 *   headers, at most HDRLOG_MAX_EXTHDR of them) -> TCP (flags incl. AE, seq, ack,
 *   window; MSS and window-scale options, at most HDRLOG_MAX_TCPOPT options walked),
 *   UDP, ICMP, ICMPv6.
 * Every read goes through load(), which reads what the packet still holds (into a
 * zeroed buffer) and reports how much it got. A header that is cut short or bogus
 * therefore yields a record with every field that could be read plus a PARSE_* bit
 * in parse_flags, and parsing stops there. All loops are bounded.
 *
 * The record keeps the offset and length of the L4 payload. When that payload
 * is an app-layer candidate, its first bytes (at most HDRLOG_PAYLOAD_BYTES,
 * clipped to the IP length so Ethernet padding is never copied) follow the
 * record, and user space decodes DNS, HTTP and TLS hellos from them
 * (collector/appdecode.py). Candidates are UDP or TCP payloads whose source or
 * destination port passes HDRLOG_IS_DNS_PORT (set from the collector's
 * dns_ports), and TCP payloads that start like a TLS handshake record
 * (0x16 0x03) or an HTTP/1.x request or response (the first four bytes of a
 * method -- any upper-case token -- or "HTTP"), and UDP/443 payloads that
 * start like a QUIC long header (Initials: SNI, collector/quic.py). A TLS hello longer than its
 * segment (post-quantum key shares make ClientHellos ~1,800 bytes) is
 * remembered in `tls_cont` (LRU), and the next segment of that direction of
 * the connection is copied too, once; user space joins the two
 * (collector/appdecode.py Reassembly). Other payloads (bulk data) are not
 * copied, so most records stay at the fixed size.
 *
 * The record is built in a per-CPU scratch buffer (`scratch`) and sent with
 * bpf_ringbuf_output at its real size (header + copied bytes): a ring-buffer
 * reservation must have a constant size, and reserving the maximum for every
 * packet would multiply ring-buffer traffic. The copy is a bounded loop of
 * HDRLOG_PAYLOAD_CHUNK-sized loads at constant offsets, each with a length the
 * verifier sees as 1..HDRLOG_PAYLOAD_CHUNK (one variable-length load of up to
 * the whole buffer was rejected as too complex).
 *
 * When the ring buffer is full the record is dropped and counted
 * (CNT_RINGBUF_FULL): nothing is lost silently. User space converts mono_ns
 * (CLOCK_MONOTONIC) to UTC and ifindex to a name.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>

#include "types.h"

/* In-frame VLAN tags walked (an outer tag in skb metadata comes on top). */
#ifndef HDRLOG_MAX_VLAN
#define HDRLOG_MAX_VLAN 4
#endif
/* 1 = copy the TCP segment that continues a cut-short TLS hello (map tls_cont). */
#ifndef HDRLOG_TLS_CONT
#define HDRLOG_TLS_CONT 1
#endif
#ifndef HDRLOG_TLS_CONT_ENTRIES
#define HDRLOG_TLS_CONT_ENTRIES 8192
#endif
#ifndef HDRLOG_MAX_EXTHDR
#define HDRLOG_MAX_EXTHDR 8
#endif
#ifndef HDRLOG_MAX_TCPOPT
#define HDRLOG_MAX_TCPOPT 16
#endif

/* Which ports carry DNS (UDP and TCP): a boolean expression of p, set by the
 * collector from its dns_ports. */
#ifndef HDRLOG_IS_DNS_PORT
#define HDRLOG_IS_DNS_PORT(p) ((p) == 53 || (p) == 5353)
#endif

#if HDRLOG_PAYLOAD_BYTES % HDRLOG_PAYLOAD_CHUNK
#error "HDRLOG_PAYLOAD_BYTES must be a multiple of HDRLOG_PAYLOAD_CHUNK"
#endif

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "hdrlog's record layout assumes a little-endian host"
#endif
#define be16(x) __builtin_bswap16(x)
#define be32(x) __builtin_bswap32(x)

/* Keep the compiler from folding a bound check the verifier needs. */
#define barrier_var(v) asm volatile("" : "+r"(v))

#define IPPROTO_ICMPV6_ 58
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60

/* Records to user space.
 * Key: none (ring buffer). Value: struct pkt_record, one per packet. */
BPF_RINGBUF_OUTPUT(records, HDRLOG_RINGBUF_PAGES);

/* What the program did, per CPU (summed in user space). One entry, so one
 * lookup per packet.
 * Key: 0 (u32). Value: struct counters, n[CNT_*] = packet counts. */
BPF_PERCPU_ARRAY(counters, struct counters, 1);

/* A record with room for its payload bytes. */
struct pkt_scratch {
    struct pkt_record rec;
    u8 payload[HDRLOG_PAYLOAD_BYTES];
};

/* One direction of a TCP connection on one interface (key of tls_cont). */
struct cont_key {
    u32 ifindex;
    u16 src_port;
    u16 dst_port;
    u8 direction;
    u8 _pad[3];
    u8 src_ip[16];
    u8 dst_ip[16];
};

/* TLS hellos cut short by the end of their segment, waiting for the next one.
 * Key: struct cont_key. Value: u32 TCP sequence number the continuation starts at.
 * LRU: a continuation that never comes ages out. */
BPF_TABLE("lru_hash", struct cont_key, u32, tls_cont, HDRLOG_TLS_CONT_ENTRIES);

/* A filter in front of tls_cont: entries put in minus taken out, per hash of
 * the key's ports, address tails and interface (cont_hint()). A TCP packet whose
 * slot is 0 skips the hash lookup (an array lookup instead: measured here, the
 * lookup of every bulk segment would cost ~45 ns while any hello waits). An LRU
 * eviction leaves its slot above 0: that slot then always looks, nothing worse.
 * Key: slot (u32, 0..HDRLOG_TLS_CONT_HINTS-1). Value: u32 count. */
#ifndef HDRLOG_TLS_CONT_HINTS
#define HDRLOG_TLS_CONT_HINTS 4096
#endif
BPF_ARRAY(tls_cont_hint, u32, HDRLOG_TLS_CONT_HINTS);

/* Where a record is built before it goes to the ring buffer, per CPU.
 * Key: 0 (u32). Value: struct pkt_scratch (only rec and the first
 * rec.payload_len payload bytes are meaningful). */
BPF_PERCPU_ARRAY(scratch, struct pkt_scratch, 1);

/* Ring buffer submit flags: 0 = adaptive wakeup of the reader. */
#ifndef HDRLOG_RB_FLAGS
#define HDRLOG_RB_FLAGS 0
#endif

/* Headers that start past this offset are read with bpf_skb_load_bytes only
 * (the verifier needs a bound on a packet pointer's variable offset). */
#ifndef HDRLOG_DIRECT_MAX_OFF
#define HDRLOG_DIRECT_MAX_OFF 1024
#endif

/* Read up to `want` bytes at `off` into a zeroed `buf`; return how many were
 * read (0 when `off` is at or past the end).
 *
 * Fast path: when all `want` bytes lie in the skb's linear part (almost every
 * header of almost every packet), they are copied straight from skb->data
 * (direct packet access, no helper call). Otherwise -- a header in paged data,
 * or fewer than `want` bytes left -- bpf_skb_load_bytes reads what the packet
 * holds. Both give the same bytes and the same count. HDRLOG_NO_DIRECT=1
 * keeps the helper only (for A/B measurements). */
static __always_inline u32 load(struct __sk_buff *skb, u32 len, u32 off, void *buf, u32 want)
{
    /* 64-bit arithmetic: a u32 kept in a 64-bit register with stale upper
     * bits would reach the helper unchecked. */
    u64 l = len, o = off;
    if (o >= l)
        return 0;
#if !HDRLOG_NO_DIRECT
    if (o <= HDRLOG_DIRECT_MAX_OFF) {
        void *data = (void *)(long)skb->data;
        void *data_end = (void *)(long)skb->data_end;
        if (data + o + want <= data_end) {
            /* x86 loads unaligned words at full speed and the verifier allows it
             * there (no strict alignment): word-sized loads, not byte by byte. */
            __builtin_memcpy(buf, __builtin_assume_aligned(data + o, 8), want);
            return want;
        }
    }
#endif
    u64 n = l - o;
    if (n > want)
        n = want;
    /* Two separate checks the compiler may not merge into one range test
     * (the verifier needs 1 <= n <= want on the very register passed). */
    barrier_var(n);
    if (n == 0)
        return 0;
    barrier_var(n);
    if (n > want)
        return 0;
    if (bpf_skb_load_bytes(skb, off, buf, n) < 0)
        return 0;
    return n;
}

struct vlan_tag {
    __be16 tci;
    __be16 proto;
};

struct ipv4_hdr { /* struct iphdr without bitfields */
    u8 ver_ihl;
    u8 tos;
    __be16 tot_len;
    __be16 id;
    __be16 frag_off;
    u8 ttl;
    u8 protocol;
    __be16 check;
    u8 saddr[4];
    u8 daddr[4];
};

struct ipv6_hdr {
    __be32 ver_tc_flow;
    __be16 payload_len;
    u8 nexthdr;
    u8 hop_limit;
    u8 saddr[16];
    u8 daddr[16];
};

struct ipv6_ext { /* first 8 bytes of any extension header */
    u8 nexthdr;
    u8 hdrlen;
    __be16 frag_off; /* fragment header: offset << 3 | M */
    __be32 ident;    /* fragment header: identification */
};

struct tcp_hdr {
    __be16 source;
    __be16 dest;
    __be32 seq;
    __be32 ack_seq;
    u8 doff_ae;   /* data offset << 4 | AE */
    u8 flags;     /* CWR ECE URG ACK PSH RST SYN FIN */
    __be16 window;
    __be16 check;
    __be16 urg_ptr;
};

struct udp_hdr {
    __be16 source;
    __be16 dest;
    __be16 len;
    __be16 check;
};

static __always_inline void parse_tcp_options(struct __sk_buff *skb, u32 len, u32 off, u32 optlen,
                                              struct pkt_record *r, u16 *flags)
{
    u8 opts[64] = {};
    u32 got = load(skb, len, off, opts, 40);
    u32 lim = optlen;
    if (got < optlen) {
        *flags |= PARSE_TRUNC_L4;
        lim = got;
    }
    u32 i = 0;
#pragma unroll
    for (int k = 0; k < HDRLOG_MAX_TCPOPT; k++) {
        if (i >= lim)
            return;
        u8 kind = opts[i & 63];
        if (kind == 0) /* end of option list */
            return;
        if (kind == 1) { /* NOP */
            i++;
            continue;
        }
        if (i + 1 >= lim) {
            if (lim == optlen)
                *flags |= PARSE_BAD_TCP_OPT;
            return;
        }
        u32 olen = opts[(i + 1) & 63];
        if (olen < 2 || i + olen > lim) {
            if (olen < 2 || lim == optlen)
                *flags |= PARSE_BAD_TCP_OPT;
            return;
        }
        if (kind == 2 && olen == 4) {
            r->tcp_mss = ((u16)opts[(i + 2) & 63] << 8) | opts[(i + 3) & 63];
        } else if (kind == 3 && olen == 3) {
            r->tcp_wscale = opts[(i + 2) & 63];
            *flags |= PARSE_TCP_WSCALE;
        }
        i += olen;
    }
    if (i < lim && opts[i & 63] != 0)
        *flags |= PARSE_BAD_TCP_OPT; /* more options than we walk */
}

static __always_inline int method_char(u8 c)
{
    return (c >= 'A' && c <= 'Z') || c == '-' || c == '_';
}

/* Is a payload starting with these 8 bytes worth copying? (See the top comment.) */
static __always_inline int app_candidate(u8 l4proto, u16 sport, u16 dport, const u8 *h)
{
    if (HDRLOG_IS_DNS_PORT(sport) || HDRLOG_IS_DNS_PORT(dport))
        return 1;
    /* Issue 14 (names): a QUIC long header on UDP/443 -- form and fixed bits set and a
     * non-zero version (Initial's SNI, collector/quic.py; collector/appdecode.py QUIC_PORTS). */
    if (l4proto == IPPROTO_UDP && (sport == 443 || dport == 443))
        return (h[0] & 0xc0) == 0xc0 && (h[1] | h[2] | h[3] | h[4]) != 0;
    if (l4proto != IPPROTO_TCP)
        return 0;
    if (h[0] == 0x16 && h[1] == 0x03)
        return 1;
    u32 w = ((u32)h[0] << 24) | ((u32)h[1] << 16) | ((u32)h[2] << 8) | h[3];
    switch (w) {
    case 0x47455420: /* "GET " */
    case 0x504f5354: /* "POST" */
    case 0x50555420: /* "PUT " */
    case 0x48454144: /* "HEAD" */
    case 0x44454c45: /* "DELE" */
    case 0x4f505449: /* "OPTI" */
    case 0x50415443: /* "PATC" */
    case 0x434f4e4e: /* "CONN" */
    case 0x54524143: /* "TRAC" */
    case 0x48545450: /* "HTTP" */
    case 0x50524f50: /* "PROP": WebDAV PROPFIND, PROPPATCH */
    case 0x4d4b434f: /* "MKCO" */
    case 0x434f5059: /* "COPY" */
    case 0x4d4f5645: /* "MOVE" */
    case 0x4c4f434b: /* "LOCK" */
    case 0x554e4c4f: /* "UNLO" */
    case 0x53454152: /* "SEAR" */
    case 0x5245504f: /* "REPO": REPORT */
        return 1;
    }
    /* Any other method token of up to 7 characters (collector/appheaders.py
     * http_head): upper-case letters, '-' or '_', a space, then a request target
     * that starts like one ('/', '*', or "h" of an absolute http:// URI). User
     * space then wants " HTTP/" after the target. */
    /* Bytes from a scalar, not by index into the stack: the verifier rejects
     * the pointer arithmetic a variable index compiles to. */
    u64 b8;
    __builtin_memcpy(&b8, h, 8); /* little-endian: byte j is (b8 >> 8j) & 0xff */
    if (!method_char(b8 & 0xff))
        return 0;
#pragma unroll
    for (int i = 1; i < 8; i++) {
        u8 c = (b8 >> (8 * i)) & 0xff;
        if (c == ' ') {
            if (i == 7)
                return 1;
            u8 t = (b8 >> (8 * (i + 1))) & 0xff;
            return t == '/' || t == '*' || t == 'h';
        }
        if (!method_char(c))
            return 0;
    }
    return 0;
}

/* Copy the first bytes of `plen` payload bytes at `off` into `dst` (room for
 * HDRLOG_PAYLOAD_BYTES); returns how many were copied. */
static __always_inline u32 copy_payload(struct __sk_buff *skb, u32 off, u32 plen, u8 *dst, u16 *flags)
{
    /* 64-bit arithmetic below for the same reason as in load(). */
    u32 want = plen;
    if (want > HDRLOG_PAYLOAD_BYTES) {
        want = HDRLOG_PAYLOAD_BYTES;
        *flags |= PARSE_PAYLOAD_CUT;
    }
    u32 got = 0;
#pragma unroll
    for (int k = 0; k < HDRLOG_PAYLOAD_BYTES / HDRLOG_PAYLOAD_CHUNK; k++) {
        u32 o = k * HDRLOG_PAYLOAD_CHUNK;
        if (o >= want)
            break;
        u64 n = want - o;
        if (n > HDRLOG_PAYLOAD_CHUNK)
            n = HDRLOG_PAYLOAD_CHUNK;
        barrier_var(n);
        if (n == 0)
            break;
        barrier_var(n);
        if (n > HDRLOG_PAYLOAD_CHUNK)
            break;
        if (bpf_skb_load_bytes(skb, off + o, dst + o, n) < 0) {
            *flags |= PARSE_PAYLOAD_CUT;
            break;
        }
        got = o + n;
    }
    return got;
}

static __always_inline void parse(struct __sk_buff *skb, struct pkt_record *r, u8 dir)
{
    u32 len = skb->len;
    u16 flags = 0;
    u32 wire = len;
    u16 vlan_id = 0;
    int have_vlan = 0;

    r->mono_ns = bpf_ktime_get_ns();
    r->ifindex = skb->ifindex;
    r->direction = dir;
    if (skb->vlan_present) {
        wire += 4;
        vlan_id = skb->vlan_tci & 0x0fff;
        have_vlan = 1;
        flags |= PARSE_VLAN_ACCEL;
    }
    if (skb->gso_segs > 1)
        flags |= PARSE_GSO;
    r->wire_len = wire;

    /* --- L2 --- */
    struct ethhdr eth = {};
    u32 n = load(skb, len, 0, &eth, sizeof(eth));
    __builtin_memcpy(r->eth_dst, eth.h_dest, 6);
    __builtin_memcpy(r->eth_src, eth.h_source, 6);
    if (n < sizeof(eth)) {
        flags |= PARSE_TRUNC_L2;
        goto out;
    }
    u16 proto = be16(eth.h_proto);
    u32 off = sizeof(eth);
#pragma unroll
    for (int i = 0; i < HDRLOG_MAX_VLAN; i++) {
        if (proto != ETH_P_8021Q && proto != ETH_P_8021AD)
            break;
        struct vlan_tag tag = {};
        if (load(skb, len, off, &tag, sizeof(tag)) < sizeof(tag)) {
            flags |= PARSE_TRUNC_L2;
            r->eth_type = proto;
            goto out;
        }
        if (!have_vlan) {
            vlan_id = be16(tag.tci) & 0x0fff;
            have_vlan = 1;
        } else {
            r->vlan_inner_id = be16(tag.tci) & 0x0fff; /* the last one walked is the innermost */
        }
        proto = be16(tag.proto);
        off += sizeof(tag);
    }
    r->eth_type = proto;
    if (proto == ETH_P_8021Q || proto == ETH_P_8021AD) {
        flags |= PARSE_VLAN_LIMIT;
        goto out;
    }

    /* --- L3 --- */
    u8 l4proto;
    u32 l3_end;
    u32 l3_start = off;
    if (proto == ETH_P_IP) {
        struct ipv4_hdr ip = {};
        n = load(skb, len, off, &ip, sizeof(ip));
        if (n == 0) {
            flags |= PARSE_TRUNC_L3;
            goto out;
        }
        r->ip_version = 4;
        if ((ip.ver_ihl >> 4) != 4)
            flags |= PARSE_BAD_IP_VERSION;
        r->dscp = ip.tos >> 2;
        r->ecn = ip.tos & 3;
        r->ip_id = be16(ip.id);
        u16 frag = be16(ip.frag_off);
        r->dont_fragment = !!(frag & 0x4000);
        r->more_fragments = !!(frag & 0x2000);
        r->frag_offset = frag & 0x1fff;
        r->ttl = ip.ttl;
        r->ip_proto = ip.protocol;
        if (n >= 16) {
            r->src_ip[10] = 0xff;
            r->src_ip[11] = 0xff;
            __builtin_memcpy(&r->src_ip[12], ip.saddr, 4);
        }
        if (n < sizeof(ip)) {
            flags |= PARSE_TRUNC_L3;
            goto out;
        }
        r->dst_ip[10] = 0xff;
        r->dst_ip[11] = 0xff;
        __builtin_memcpy(&r->dst_ip[12], ip.daddr, 4);
        u32 ihl = ip.ver_ihl & 0x0f;
        if (ihl < 5) {
            flags |= PARSE_BAD_IHL;
            goto out;
        }
        if (frag & 0x1fff) {
            flags |= PARSE_NONFIRST_FRAG;
            goto out;
        }
        /* tot_len 0: a TSO/GSO frame seen before segmentation (tshark reads it
         * the same way); its payload runs to the end of the frame. */
        l3_end = ip.tot_len ? off + be16(ip.tot_len) : len;
        off += ihl * 4;
        if (off > len) {
            flags |= PARSE_TRUNC_L3;
            goto out;
        }
        l4proto = ip.protocol;
    } else if (proto == ETH_P_IPV6) {
        struct ipv6_hdr ip6 = {};
        n = load(skb, len, off, &ip6, sizeof(ip6));
        if (n == 0) {
            flags |= PARSE_TRUNC_L3;
            goto out;
        }
        r->ip_version = 6;
        u32 vtf = be32(ip6.ver_tc_flow);
        if ((vtf >> 28) != 6)
            flags |= PARSE_BAD_IP_VERSION;
        u8 tc = (vtf >> 20) & 0xff;
        r->dscp = tc >> 2;
        r->ecn = tc & 3;
        r->flow_label = vtf & 0xfffff;
        r->ttl = ip6.hop_limit;
        r->ip_proto = ip6.nexthdr;
        if (n >= 24)
            __builtin_memcpy(r->src_ip, ip6.saddr, 16);
        if (n < sizeof(ip6)) {
            flags |= PARSE_TRUNC_L3;
            goto out;
        }
        __builtin_memcpy(r->dst_ip, ip6.daddr, 16);
        /* payload_len 0: a jumbogram / BIG TCP frame (RFC 2675 jumbo option):
         * the payload runs to the end of the frame. */
        l3_end = ip6.payload_len ? off + sizeof(ip6) + be16(ip6.payload_len) : len;
        off += sizeof(ip6);
        u8 nh = ip6.nexthdr;
        u16 frag_offset = 0;
#pragma unroll
        for (int i = 0; i < HDRLOG_MAX_EXTHDR; i++) {
            if (nh != NEXTHDR_HOP && nh != NEXTHDR_ROUTING && nh != NEXTHDR_FRAGMENT &&
                nh != NEXTHDR_DEST && nh != NEXTHDR_AUTH)
                break;
            struct ipv6_ext ext = {};
            if (load(skb, len, off, &ext, sizeof(ext)) < sizeof(ext)) {
                flags |= PARSE_TRUNC_L3;
                r->ip_proto = nh;
                goto out;
            }
            if (nh == NEXTHDR_FRAGMENT) {
                u16 fo = be16(ext.frag_off);
                frag_offset = fo >> 3;
                r->frag_offset = frag_offset;
                r->more_fragments = fo & 1;
                r->ip_id = be32(ext.ident);
                off += 8;
                if (frag_offset) {
                    /* A non-first fragment: what follows is fragment data, not
                     * headers. Its next header names the fragmented protocol. */
                    nh = ext.nexthdr;
                    r->ip_proto = nh;
                    flags |= PARSE_NONFIRST_FRAG;
                    goto out;
                }
            } else if (nh == NEXTHDR_AUTH) {
                off += ((u32)ext.hdrlen + 2) * 4;
            } else {
                off += ((u32)ext.hdrlen + 1) * 8;
            }
            nh = ext.nexthdr;
        }
        r->ip_proto = nh;
        if (nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_FRAGMENT ||
            nh == NEXTHDR_DEST || nh == NEXTHDR_AUTH) {
            flags |= PARSE_EXTHDR_LIMIT;
            goto out;
        }
        if (frag_offset) {
            flags |= PARSE_NONFIRST_FRAG;
            goto out;
        }
        l4proto = nh;
    } else {
        goto out; /* ARP and other non-IP: L2 fields only */
    }

    /* IP and L4 lengths as the headers say (conntrack.h counts them). */
    r->ip_len = l3_end - l3_start > 0xffff ? 0xffff : l3_end - l3_start;
    r->l4_len = l3_end <= off ? 0 : l3_end - off > 0xffff ? 0xffff : l3_end - off;

    /* --- L4 --- */
    u32 payload_off = 0;
    if (l4proto == IPPROTO_TCP) {
        struct tcp_hdr th = {};
        n = load(skb, len, off, &th, sizeof(th));
        if (n < sizeof(th))
            flags |= PARSE_TRUNC_L4;
        r->src_port = be16(th.source);
        r->dst_port = be16(th.dest);
        r->tcp_seq = be32(th.seq);
        r->tcp_ack = be32(th.ack_seq);
        r->tcp_flags = th.flags | ((u16)(th.doff_ae & 1) << 8);
        r->tcp_window = be16(th.window);
        if (n < sizeof(th))
            goto out;
        u32 doff = (th.doff_ae >> 4) * 4;
        if (doff < sizeof(th)) {
            flags |= PARSE_BAD_TCP_DOFF;
            goto out;
        }
        if (doff > sizeof(th))
            parse_tcp_options(skb, len, off + sizeof(th), doff - sizeof(th), r, &flags);
        payload_off = off + doff;
    } else if (l4proto == IPPROTO_UDP) {
        struct udp_hdr uh = {};
        n = load(skb, len, off, &uh, sizeof(uh));
        r->src_port = be16(uh.source);
        r->dst_port = be16(uh.dest);
        r->udp_len = be16(uh.len);
        if (n < sizeof(uh)) {
            flags |= PARSE_TRUNC_L4;
            goto out;
        }
        payload_off = off + sizeof(uh);
    } else if (l4proto == IPPROTO_ICMP || l4proto == IPPROTO_ICMPV6_) {
        u8 tc[2] = {};
        n = load(skb, len, off, tc, sizeof(tc));
        r->icmp_type = tc[0];
        r->icmp_code = tc[1];
        if (n < sizeof(tc))
            flags |= PARSE_TRUNC_L4;
        goto out;
    } else {
        goto out;
    }

    /* --- L4 payload: where it starts and how long it is (its first bytes
     * are copied by copy_candidate() once parse() is done). --- */
    if (l3_end > len)
        l3_end = len; /* truncated capture or bogus length: what the skb holds */
    if (payload_off < l3_end) {
        u32 plen = l3_end - payload_off;
        r->l4_payload_off = payload_off;
        r->l4_payload_len = plen;
    }

out:
    r->vlan_id = vlan_id;
    r->parse_flags = flags;
}

/* After parse(): copy the payload's first bytes behind the record when it is
 * an app-layer candidate. The facts it needs are read back from the record
 * (the memory clobber keeps the compiler from carrying them over in
 * registers), so every path through the parser reaches the copy loop in the
 * same verifier state: parse()'s many paths times the copy's would exceed the
 * verifier's budget. */
static __always_inline void cont_key_of(const struct pkt_record *r, struct cont_key *k)
{
    k->ifindex = r->ifindex;
    k->src_port = r->src_port;
    k->dst_port = r->dst_port;
    k->direction = r->direction;
    __builtin_memcpy(k->src_ip, r->src_ip, 16);
    __builtin_memcpy(k->dst_ip, r->dst_ip, 16);
}

static __always_inline u32 cont_hint(const struct pkt_record *r)
{
    u32 h = ((u32)r->src_port << 16 | r->dst_port) ^ ((u32)r->src_ip[15] << 24 | (u32)r->dst_ip[15] << 16 |
                                                     (u32)r->src_ip[14] << 8 | r->dst_ip[14]) ^ r->ifindex;
    h ^= h >> 16;
    h *= 0x45d9f3b;
    h ^= h >> 16;
    return h % HDRLOG_TLS_CONT_HINTS;
}

static __always_inline void copy_candidate(struct __sk_buff *skb, struct pkt_scratch *s)
{
    struct pkt_record *r = &s->rec;
    asm volatile("" ::: "memory");
    u32 off = r->l4_payload_off;
    u32 plen = r->l4_payload_len;
    if (HDRLOG_PAYLOAD_BYTES == 0 || off == 0 || plen == 0)
        return;
    u8 head[16] = {}; /* app_candidate() reads 8; a TLS hello's length is in bytes 6..8 */
    load(skb, skb->len, off, head, sizeof(head));
    int cand = app_candidate(r->ip_proto, r->src_port, r->dst_port, head);
#if HDRLOG_TLS_CONT
    if (r->ip_proto != IPPROTO_TCP && !cand)
        return;
    u32 slot = cont_hint(r);
    u32 *live = tls_cont_hint.lookup(&slot);
    struct cont_key k = {};
    if (!cand) {
        /* The segment after a cut-short TLS hello: copied too, once, when it
         * starts where the hello's segment ended. */
        if (!live || !*live)
            return;
        cont_key_of(r, &k);
        u32 *next = tls_cont.lookup(&k);
        if (!next)
            return;
        u32 want = *next;
        if (tls_cont.delete(&k) == 0)
            __sync_fetch_and_add(live, -1);
        if (want != r->tcp_seq)
            return;
    }
#else
    if (!cand)
        return;
#endif
    u16 flags = r->parse_flags;
    r->payload_len = copy_payload(skb, off, plen, s->payload, &flags);
    r->parse_flags = flags;
#if HDRLOG_TLS_CONT
    /* A TLS ClientHello / ServerHello that goes on past this whole (copied)
     * segment, by its handshake length: remember where the next segment starts
     * (a ServerHello that ends here, with a Certificate after it, does not). */
    u32 hslen = ((u32)head[6] << 16) | ((u32)head[7] << 8) | head[8];
    if (cand && live && r->ip_proto == IPPROTO_TCP && head[0] == 0x16 && head[1] == 0x03 &&
        (head[5] == 1 || head[5] == 2) && 9 + hslen > plen && r->payload_len == plen) {
        cont_key_of(r, &k);
        u32 next = r->tcp_seq + plen;
        /* Count only a new entry: a retransmitted first segment updates its own. */
        if (tls_cont.insert(&k, &next) == 0)
            __sync_fetch_and_add(live, 1);
        else
            tls_cont.update(&k, &next);
    }
#endif
}

#include "flows.h"

/* Maps and helpers of flows.h that touch maps (BCC rewrites map calls in this file only). */
/* Key: 0 (u32). Value: struct hdrlog_cfg. */
BPF_ARRAY(cfg, struct hdrlog_cfg, 1);
/* Key: struct flow_key. Value: struct flow_value. Live while cfg.flow_slot == 0. */
BPF_HASH(flows0, struct flow_key, struct flow_value, HDRLOG_FLOW_ENTRIES);
/* Key: struct flow_key. Value: struct flow_value. Live while cfg.flow_slot == 1. */
BPF_HASH(flows1, struct flow_key, struct flow_value, HDRLOG_FLOW_ENTRIES);
/* Key: slot (u32, 0 or 1). Value: fd of flows0 / flows1, set by user space at start. */
BPF_ARRAY_OF_MAPS(flow_maps, "flows0", 2);
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

    void *live = flow_maps.lookup(&slot);
    if (!live)
        return -1;
    struct flow_value *v = bpf_map_lookup_elem(live, &k);
    if (!v) {
        struct flow_value nv = {};
        nv.packets = 1;
        nv.bytes = r->wire_len;
        nv.first_ns = r->mono_ns;
        nv.last_ns = r->mono_ns;
        nv.tcp_flags = r->tcp_flags;
        if (first_n) {
            u32 other = slot ^ 1;
            void *om = flow_maps.lookup(&other);
            if (om && bpf_map_lookup_elem(om, &k))
                nv.flags = FLOW_CONTINUED;
        }
        int err = bpf_map_update_elem(live, &k, &nv, BPF_NOEXIST);
        if (err == 0) {
            *first = first_n > 0 && !(nv.flags & FLOW_CONTINUED);
            return 0;
        }
        /* -EEXIST: another CPU created it meanwhile; add to theirs. Else full. */
        v = bpf_map_lookup_elem(live, &k);
        if (!v)
            return -1;
    }
    u64 before = __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->bytes, r->wire_len);
    if (r->mono_ns > v->last_ns)
        v->last_ns = r->mono_ns;
    u32 tf = r->tcp_flags;
    if (tf & ~v->tcp_flags) /* a 64-bit OR over tcp_flags and flags (little-endian: tcp_flags low) */
        __sync_fetch_and_or((u64 *)&v->tcp_flags, (u64)tf);
    *first = before < first_n && !(v->flags & FLOW_CONTINUED);
    return 0;
}

#include "conntrack.h"

/* Connections (conntrack.h), both directions in one entry; drained by collector/connections.py.
 * Key: struct conn_key (canonical ends + ifindex). Value: struct conn_value (with its spin lock). */
BPF_HASH(conns, struct conn_key, struct conn_value, HDRLOG_CONN_ENTRIES);
/* An all-zero value to insert new connections from (too big for the stack).
 * Key: 0 (u32). Value: struct conn_blank (never written). */
BPF_PERCPU_ARRAY(conn_blank, struct conn_blank, 1);

/* Count the record into its connection: CONN_TRACKED (sets *first when it is
 * among the first `first_n` packets of the connection), CONN_UNTRACKED or CONN_FULL. */
static __always_inline int conn_track(const struct pkt_record *r, u32 first_n, int *first)
{
    asm volatile("" ::: "memory"); /* read the record afresh: one verifier state for every parse path */
    struct conn_key k = {};
    int side = 0;
    if (!conn_key_of(r, &k, &side))
        return CONN_UNTRACKED;
    struct conn_value *v = conns.lookup(&k);
    if (!v) {
        u32 zero = 0;
        struct conn_blank *b = conn_blank.lookup(&zero);
        if (!b)
            return CONN_FULL;
        conns.insert(&k, (struct conn_value *)b); /* -EEXIST: another CPU was first, fine */
        v = conns.lookup(&k);
        if (!v)
            return CONN_FULL;
    }
    bpf_spin_lock(&v->lock);
    u64 before = conn_update(v, r, side);
    bpf_spin_unlock(&v->lock);
    *first = before < first_n;
    return CONN_TRACKED;
}

static __always_inline int handle(struct __sk_buff *skb, u8 dir)
{
    u32 zero = 0;
    struct counters *c = counters.lookup(&zero);
    if (!c) /* cannot happen: the array has its one entry */
        return TC_ACT_UNSPEC;
    c->n[CNT_SEEN]++;
    struct pkt_scratch *s = scratch.lookup(&zero);
    struct hdrlog_cfg *cf = cfg.lookup(&zero);
    if (!s || !cf) /* cannot happen either */
        return TC_ACT_UNSPEC;
    struct pkt_record *r = &s->rec;
    __builtin_memset(r, 0, sizeof(*r));
    parse(skb, r, dir);
    if (!filter_pass(r, cf)) {
        c->n[CNT_FILTERED]++;
        return TC_ACT_UNSPEC;
    }
    u32 mode = cf->mode;
    u32 n = cf->sample_n;
    u8 why = 0;
    int first = 0;
    if (mode != MODE_PACKETS) {
        int ct = mode == MODE_AUTO ? conn_track(r, cf->first_packets, &first) : CONN_UNTRACKED;
        if (ct == CONN_TRACKED) {
            c->n[CNT_CONN_TRACKED]++;
        } else if (ct == CONN_FULL) {
            c->n[CNT_CONN_MAP_FULL]++;
            why = LOG_CONN_FALLBACK;
        } else if (flow_account(r, cf->flow_slot, mode == MODE_AUTO ? cf->first_packets : 0, &first) < 0) {
            c->n[CNT_FLOW_MAP_FULL]++;
            why = LOG_FLOW_FALLBACK;
        } else {
            c->n[CNT_FLOWED]++;
        }
        if (mode == MODE_FLOWS && !why)
            return TC_ACT_UNSPEC;
    }
    if (mode != MODE_FLOWS)
        copy_candidate(skb, s); /* one call site: the verifier walks it once */
    if (mode == MODE_PACKETS) {
        if (n > 1) {
            if (bpf_get_prandom_u32() % n) {
                c->n[CNT_SAMPLED_OUT]++;
                return TC_ACT_UNSPEC;
            }
            why = LOG_SAMPLED;
        } else {
            why = LOG_ALL;
        }
    } else if (mode == MODE_AUTO) {
        u8 nb = notable(r, first);
        if (nb)
            why |= nb;
        else if (n && bpf_get_prandom_u32() % n == 0)
            why |= LOG_SAMPLED;
        else
            c->n[CNT_SAMPLED_OUT]++;
        if (!why)
            return TC_ACT_UNSPEC;
    }
    r->log_reason = why;
    u64 size = sizeof(struct pkt_record) + r->payload_len;
    barrier_var(size);
    if (size > sizeof(struct pkt_scratch))
        size = sizeof(struct pkt_scratch);
    if (records.ringbuf_output(s, size, HDRLOG_RB_FLAGS) < 0) {
        c->n[CNT_RINGBUF_FULL]++;
        return TC_ACT_UNSPEC;
    }
    if (r->parse_flags & (PARSE_TRUNC_L2 | PARSE_TRUNC_L3 | PARSE_TRUNC_L4))
        c->n[CNT_TRUNCATED]++;
    if (r->payload_len)
        c->n[CNT_PAYLOAD]++;
    c->n[CNT_LOGGED]++;
    return TC_ACT_UNSPEC;
}

int hdrlog_ingress(struct __sk_buff *skb)
{
    return handle(skb, DIR_INGRESS);
}

int hdrlog_egress(struct __sk_buff *skb)
{
    return handle(skb, DIR_EGRESS);
}
