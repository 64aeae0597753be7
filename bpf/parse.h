/* Parsing: the packet's headers into a struct pkt_record (included by hdrlog.c).
 *
 * Logic
 * -----
 * parse() fills the record in four inline steps, each read by load(): straight
 * from the skb's linear data when the header is there (direct packet access, the
 * usual case), else with bpf_skb_load_bytes (safe on non-linear skbs):
 *   parse_l2():   Ethernet -> up to HDRLOG_MAX_VLAN in-frame 802.1Q / 802.1ad tags
 *                 (an outer tag the kernel moved into skb metadata counts as the
 *                 outermost one and adds 4 bytes to wire_len; vlan_id is the
 *                 outermost tag, vlan_inner_id the innermost when there are two
 *                 or more);
 *   parse_ipv4(): IPv4 (options skipped by IHL; L4 only in the first fragment), or
 *   parse_ipv6(): IPv6 (hop-by-hop, routing, fragment, destination-options and AH
 *                 headers, at most HDRLOG_MAX_EXTHDR of them);
 *   parse_l4():   TCP (flags incl. AE, seq, ack, window; MSS and window-scale
 *                 options, at most HDRLOG_MAX_TCPOPT options walked), UDP, ICMP,
 *                 ICMPv6, and where the L4 payload starts and how long it is.
 * Every read goes through load(), which reads what the packet still holds (into a
 * zeroed buffer) and reports how much it got. A header that is cut short or bogus
 * therefore yields a record with every field that could be read plus a PARSE_* bit
 * in parse_flags, and parsing stops there. All loops are bounded.
 */
#ifndef HDRLOG_PARSE_H
#define HDRLOG_PARSE_H

/* In-frame VLAN tags walked (an outer tag in skb metadata comes on top). */
#ifndef HDRLOG_MAX_VLAN
#define HDRLOG_MAX_VLAN 4
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

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "hdrlog's record layout assumes a little-endian host"
#endif
#define be16(x) __builtin_bswap16(x)
#define be32(x) __builtin_bswap32(x)

/* Keep the compiler from folding a bound check the verifier needs. */
#define barrier_var(v) asm volatile("" : "+r"(v))

/* For the stack buffers load() fills: the compiler copies a header with the
 * smaller of the two alignments, so an Ethernet header (packed) went byte by
 * byte and an IPv4 header in 16-bit words; 8-aligned buffers get word moves. */
#define WORD_ALIGNED __attribute__((aligned(8)))

#define IPPROTO_ICMPV6_ 58
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60

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

/* What the parse steps hand each other. */
struct parse_state {
    u32 len;      /* skb->len */
    u32 off;      /* where the next header starts */
    u32 l3_start; /* where the IP header starts */
    u32 l3_end;   /* where the IP packet ends, as its header says */
    u16 flags;    /* PARSE_* so far */
    u16 vlan_id;  /* outermost VLAN id */
    u16 proto;    /* EtherType after the VLAN tags */
    u8  l4proto;  /* transport protocol (IPv6: after the extension headers) */
    u8  have_vlan;
};

/* Step 1, L2: Ethernet and up to HDRLOG_MAX_VLAN VLAN tags. Returns 0 when parsing stops here. */
static __always_inline int parse_l2(struct __sk_buff *skb, struct pkt_record *r, struct parse_state *st)
{
    u32 len = st->len;
    u16 flags = st->flags;
    u16 vlan_id = st->vlan_id;
    int have_vlan = st->have_vlan;
    int ok = 0;

    struct ethhdr eth WORD_ALIGNED = {};
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
        struct vlan_tag tag WORD_ALIGNED = {};
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
    st->proto = proto;
    st->off = off;
    ok = 1;
out:
    st->flags = flags;
    st->vlan_id = vlan_id;
    st->have_vlan = have_vlan;
    return ok;
}

/* Step 2a, L3: IPv4 (options skipped by IHL; L4 only in the first fragment). */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt_record *r, struct parse_state *st)
{
    u32 len = st->len;
    u32 off = st->off;
    u16 flags = st->flags;
    u32 l3_end = 0;
    int ok = 0;

    struct ipv4_hdr ip WORD_ALIGNED = {};
    u32 n = load(skb, len, off, &ip, sizeof(ip));
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
    st->l4proto = ip.protocol;
    st->l3_end = l3_end;
    st->off = off;
    ok = 1;
out:
    st->flags = flags;
    return ok;
}

/* Step 2b, L3: IPv6 and its extension headers (hop-by-hop, routing, fragment,
 * destination options, AH; at most HDRLOG_MAX_EXTHDR). */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct pkt_record *r, struct parse_state *st)
{
    u32 len = st->len;
    u32 off = st->off;
    u16 flags = st->flags;
    u32 l3_end = 0;
    int ok = 0;

    struct ipv6_hdr ip6 WORD_ALIGNED = {};
    u32 n = load(skb, len, off, &ip6, sizeof(ip6));
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
    st->l4proto = nh;
    st->l3_end = l3_end;
    st->off = off;
    ok = 1;
out:
    st->flags = flags;
    return ok;
}

/* Step 3, L4: TCP (flags incl. AE, seq, ack, window; MSS and window-scale
 * options), UDP, ICMP, ICMPv6; then where the L4 payload starts and how long it is. */
static __always_inline void parse_l4(struct __sk_buff *skb, struct pkt_record *r, struct parse_state *st)
{
    u32 len = st->len;
    u32 off = st->off;
    u16 flags = st->flags;
    u32 l3_end = st->l3_end;
    u8 l4proto = st->l4proto;
    u32 n;

    u32 payload_off = 0;
    if (l4proto == IPPROTO_TCP) {
        struct tcp_hdr th WORD_ALIGNED = {};
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
        struct udp_hdr uh WORD_ALIGNED = {};
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
    st->flags = flags;
}

/* L3 -> L4 at st->off (st->proto the EtherType): the outer packet, and again the
 * inner one of a tunnel (tunnel.h). Returns 0 when the IP header stopped the walk. */
static __always_inline int parse_ip(struct __sk_buff *skb, struct pkt_record *r, struct parse_state *st)
{
    if (st->proto == ETH_P_IP) {
        if (!parse_ipv4(skb, r, st))
            return 0;
    } else if (st->proto == ETH_P_IPV6) {
        if (!parse_ipv6(skb, r, st))
            return 0;
    } else {
        return 0; /* ARP and other non-IP: L2 fields only */
    }
    /* IP and L4 lengths as the headers say (conntrack.h counts them). */
    r->ip_len = st->l3_end - st->l3_start > 0xffff ? 0xffff : st->l3_end - st->l3_start;
    r->l4_len = st->l3_end <= st->off ? 0 : st->l3_end - st->off > 0xffff ? 0xffff : st->l3_end - st->off;
    parse_l4(skb, r, st);
    return 1;
}

#include "tunnel.h"

/* Parse the packet into the record: metadata, then L2 -> L3 -> L4, each step
 * stopping the walk where a header is cut short or bogus (a PARSE_* bit says why);
 * then one level of tunnel (tunnel.h): a tunnel candidate's header into `t`, and
 * the inner packet's L3 -> L4 into the record. */
static __always_inline void parse(struct __sk_buff *skb, struct pkt_record *r, struct tunnel_work *t, u8 dir)
{
    struct parse_state st = {};
    u32 len = skb->len;
    u32 wire = len;

    st.len = len;
    /* r->mono_ns is taken by handle(), when and if the packet needs it. */
    r->ifindex = skb->ifindex;
    r->direction = dir;
    if (skb->vlan_present) {
        wire += 4;
        st.vlan_id = skb->vlan_tci & 0x0fff;
        st.have_vlan = 1;
        st.flags |= PARSE_VLAN_ACCEL;
    }
    if (skb->gso_segs > 1)
        st.flags |= PARSE_GSO;
    r->wire_len = wire;

    if (!parse_l2(skb, r, &st))
        goto out;
    st.l3_start = st.off;
    if (!parse_ip(skb, r, &st))
        goto out;
#if HDRLOG_TUNNELS
    /* Not a test of st.flags: it holds constants the verifier knows on each
     * path, and a branch on it would keep every path's state apart. A cut
     * outer header shows in the tunnel step (no payload offset: TUN_CUT). */
    if (tunnel_candidate(r, st.l4proto)) {
        t->off = st.off;
        t->l4proto = st.l4proto;
        t->flags = st.flags;
        r->vlan_id = st.vlan_id;
        parse_tunnel(skb, r, t);
        return;
    }
#endif
out:
    r->vlan_id = st.vlan_id;
    r->parse_flags = st.flags;
}

#endif /* HDRLOG_PARSE_H */
