/* Tunnels: one level of VXLAN, Geneve, GRE or IP-in-IP decapsulated (included by parse.h).
 *
 * Logic
 * -----
 * parse() runs parse_ip() (L3 + L4) on the outer packet as always. Then, for
 * the few packets that may carry a tunnel -- UDP to a VXLAN or Geneve port
 * (HDRLOG_IS_VXLAN_PORT / HDRLOG_IS_GENEVE_PORT), IP protocol 47 (GRE), 4 or 41
 * (IPv4 / IPv6 in IP) -- tunnel_step() reads the tunnel header:
 *   VXLAN   (RFC 7348): 8 bytes, I flag set, 24-bit VNI, then an Ethernet frame;
 *   Geneve  (RFC 8926): 8 bytes + options (length in 4-byte words), version 0,
 *           24-bit VNI, protocol 0x6558 (Ethernet), 0x0800 or 0x86DD;
 *   GRE     (RFC 2784, 2890): flags C, K, S (checksum, key, sequence: 4 bytes
 *           each when present), version 0, no routing; protocol 0x6558 (TEB),
 *           0x0800, 0x86DD or 0x883E (Cisco WCCP redirection: IPv4, after a
 *           4-byte redirect header in WCCPv2, as tshark reads it); the key is the
 *           tunnel id;
 *   IP-in-IP (protocol 4 / 41, IPv4 or IPv6 outer): the inner IP header next.
 * An inner Ethernet frame is walked through up to HDRLOG_MAX_INNER_VLAN VLAN
 * tags (the first one's id is kept as tunnel_vlan_id). When the tunnel header
 * is whole and the inner IP header is all there (its minimum length, version
 * nibble right), the step commits: the outer addresses go into the tunnel
 * extension (struct tunnel_ext, types.h), the record's L3/L4 fields are
 * cleared, and parse() runs parse_ip() again at the inner offset, so the
 * record's addresses, ports, TCP fields, ip_len/l4_len and l4_payload_off (from
 * the frame start, as always) are the inner packet's; TUN_DECAP says so. The L2
 * columns stay the outer frame's (the link the packet crossed).
 * Otherwise -- a header cut short (TUN_CUT), malformed (TUN_BAD), carrying
 * something else (TUN_OTHER: ARP in VXLAN, PPTP's GRE version 1, ERSPAN ...) or an
 * inner header cut (TUN_CUT) -- the record keeps the outer packet's fields, and
 * the extension still says which tunnel it looked like, with the id as far as
 * it was read. One level only: an inner packet that is itself a tunnel
 * candidate is flagged TUN_NESTED and not opened. BPF has no recursion; the
 * parse functions are inlined a second time for the inner packet (parse.h).
 *
 * Every packet with PARSE_TUNNEL carries the 40-byte extension in the ring
 * buffer after its payload bytes; the others pay two compares on the outer
 * protocol and port.
 */
#ifndef HDRLOG_TUNNEL_H
#define HDRLOG_TUNNEL_H

/* What is opened, set by the collector's tunnels, vxlan_ports and geneve_ports
 * (bpf/build.py tunnel_cflags; these are its defaults): compile-time constants,
 * so a port list costs the same compares as a fixed one.
 * 0 = never look for tunnels (the record is always the outer packet's). */
#ifndef HDRLOG_TUNNELS
#define HDRLOG_TUNNELS 1
#endif
/* UDP destination ports of VXLAN: IANA's 4789 and Linux's default 8472 (flannel, Cilium). */
#ifndef HDRLOG_IS_VXLAN_PORT
#define HDRLOG_IS_VXLAN_PORT(p) ((p) == 4789 || (p) == 8472)
#endif
#ifndef HDRLOG_IS_GENEVE_PORT
#define HDRLOG_IS_GENEVE_PORT(p) ((p) == 6081)
#endif
/* 0 = GRE (protocol 47) / IP-in-IP (protocols 4, 41) are not opened. */
#ifndef HDRLOG_TUNNEL_GRE
#define HDRLOG_TUNNEL_GRE 1
#endif
#ifndef HDRLOG_TUNNEL_IPIP
#define HDRLOG_TUNNEL_IPIP 1
#endif
/* VLAN tags walked in an encapsulated Ethernet frame. */
#ifndef HDRLOG_MAX_INNER_VLAN
#define HDRLOG_MAX_INNER_VLAN 2
#endif

#define IPPROTO_IPIP_ 4
#define IPPROTO_IPV6_ 41
#define IPPROTO_GRE_ 47
#define ETH_P_TEB_ 0x6558
#define ETH_P_WCCP_ 0x883E

/* The tunnel step's work area in the per-CPU scratch (payload.h): the extension
 * sent, and what the step hands over through map memory -- read back after a
 * memory clobber, so the verifier sees one unknown value for every path of the
 * outer parse, not one state per path (it would walk the inner parse once for
 * each: past its budget). */
struct tunnel_work {
    struct tunnel_ext ext;
    u32 off;     /* in: the outer transport header; out: the inner IP header */
    u16 flags;   /* PARSE_* of the outer parse */
    u16 proto;   /* out: ETH_P_IP / ETH_P_IPV6 */
    u8 l4proto;  /* in: the outer transport protocol */
    u8 _pad[7];
};

/* May this (outer or inner) packet carry a tunnel header? */
static __always_inline int tunnel_candidate(const struct pkt_record *r, u8 l4proto)
{
    if (l4proto == IPPROTO_UDP)
        return HDRLOG_IS_VXLAN_PORT(r->dst_port) || HDRLOG_IS_GENEVE_PORT(r->dst_port);
    return (HDRLOG_TUNNEL_GRE && l4proto == IPPROTO_GRE_) ||
           (HDRLOG_TUNNEL_IPIP && (l4proto == IPPROTO_IPIP_ || l4proto == IPPROTO_IPV6_));
}

/* Clear the record's L3/L4 fields before the inner packet is parsed into it
 * (L2, metadata, direction and the reason stay). */
static __always_inline void clear_l3l4(struct pkt_record *r)
{
    __builtin_memset(r->src_ip, 0, 32);
    __builtin_memset(&r->ip_id, 0, __builtin_offsetof(struct pkt_record, parse_flags) -
                                       __builtin_offsetof(struct pkt_record, ip_id));
    __builtin_memset(&r->ip_version, 0, __builtin_offsetof(struct pkt_record, log_reason) -
                                            __builtin_offsetof(struct pkt_record, ip_version));
    r->ip_len = 0;
    r->l4_len = 0;
}

/* Read the tunnel header of a candidate (w->off, w->l4proto: from the outer
 * parse) into w->ext, and when the inner IP packet is there, clear the
 * record's L3/L4 and set w->off / w->proto to the inner IP header: returns 1
 * (parse the inner packet), else 0 (the record stays the outer packet's).
 * Sets PARSE_TUNNEL in w->flags either way. */
static __always_inline int tunnel_step(struct __sk_buff *skb, struct pkt_record *r, struct tunnel_work *w)
{
    struct tunnel_ext *t = &w->ext;
    u32 len = skb->len;
    u8 p = w->l4proto;
    u8 type = 0, tflags = 0;
    u32 id = 0, off = 0;
    u16 inner = 0; /* ETH_P_TEB_ (an Ethernet frame), ETH_P_IP or ETH_P_IPV6 at `off` */
    u16 vlan = 0;

    if (p == IPPROTO_UDP) {
        u8 h[8] = {};
        off = r->l4_payload_off;
        type = HDRLOG_IS_VXLAN_PORT(r->dst_port) ? TUNNEL_VXLAN : TUNNEL_GENEVE;
        if (!off || load(skb, len, off, h, sizeof(h)) < sizeof(h) || r->l4_payload_len < sizeof(h)) {
            tflags |= TUN_CUT;
            goto keep;
        }
        id = ((u32)h[4] << 16) | ((u32)h[5] << 8) | h[6];
        if (type == TUNNEL_VXLAN) {
            if (!(h[0] & 0x08)) { /* the I flag: the VNI is valid */
                tflags |= TUN_BAD;
                id = 0;
                goto keep;
            }
            inner = ETH_P_TEB_;
            off += 8;
        } else {
            if (h[0] >> 6) { /* version 0 only */
                tflags |= TUN_BAD;
                goto keep;
            }
            inner = ((u16)h[2] << 8) | h[3];
            off += 8 + (u32)(h[0] & 0x3f) * 4;
        }
    } else if (p == IPPROTO_GRE_) {
        u8 h[16] = {}; /* flags+version, protocol, then checksum / key / sequence words */
        off = w->off;
        type = TUNNEL_GRE;
        u32 n = load(skb, len, off, h, sizeof(h));
        if (n < 4) {
            tflags |= TUN_CUT;
            goto keep;
        }
        u8 f = h[0];
        if ((f & 0x40) || (h[1] & 0x07)) { /* routing (RFC 1701) or version 1 (PPTP): not ours */
            tflags |= TUN_OTHER;
            goto keep;
        }
        u32 hl = 4 + ((f & 0x80) ? 4 : 0) + ((f & 0x20) ? 4 : 0) + ((f & 0x10) ? 4 : 0);
        if (f & 0x20) {
            u32 k = (f & 0x80) ? 8 : 4;
            if (n < k + 4) {
                tflags |= TUN_CUT;
                goto keep;
            }
            id = ((u32)h[k & 15] << 24) | ((u32)h[(k + 1) & 15] << 16) | ((u32)h[(k + 2) & 15] << 8) |
                 h[(k + 3) & 15];
        }
        if (n < hl) {
            tflags |= TUN_CUT;
            goto keep;
        }
        inner = ((u16)h[2] << 8) | h[3];
        off += hl;
        if (inner == ETH_P_WCCP_) {
            /* Cisco WCCP redirection: IPv4 at once (v1), or after a 4-byte redirect header (v2). */
            u8 b = 0;
            if (load(skb, len, off, &b, 1) < 1) {
                tflags |= TUN_CUT;
                goto keep;
            }
            if ((b >> 4) != 4)
                off += 4;
            inner = ETH_P_IP;
        }
    } else {
        type = TUNNEL_IPIP;
        off = w->off;
        inner = p == IPPROTO_IPIP_ ? ETH_P_IP : ETH_P_IPV6;
    }

    if (inner == ETH_P_TEB_) {
        struct ethhdr eth = {};
        if (load(skb, len, off, &eth, sizeof(eth)) < sizeof(eth)) {
            tflags |= TUN_CUT;
            goto keep;
        }
        inner = be16(eth.h_proto);
        off += sizeof(eth);
#pragma unroll
        for (int i = 0; i < HDRLOG_MAX_INNER_VLAN; i++) {
            if (inner != ETH_P_8021Q && inner != ETH_P_8021AD)
                break;
            struct vlan_tag tag = {};
            if (load(skb, len, off, &tag, sizeof(tag)) < sizeof(tag)) {
                tflags |= TUN_CUT;
                goto keep;
            }
            if (!vlan)
                vlan = be16(tag.tci) & 0x0fff;
            inner = be16(tag.proto);
            off += sizeof(tag);
        }
    }
    if (inner != ETH_P_IP && inner != ETH_P_IPV6) {
        tflags |= TUN_OTHER; /* ARP, more VLAN tags than walked, MPLS, ... */
        goto keep;
    }
    /* The inner IP header's minimum length and version nibble, before anything is given up. */
    u8 v = 0;
    u32 need = inner == ETH_P_IP ? 20 : 40;
    if (off > len || len - off < need || load(skb, len, off, &v, 1) < 1) {
        tflags |= TUN_CUT;
        goto keep;
    }
    if ((v >> 4) != (inner == ETH_P_IP ? 4 : 6)) {
        tflags |= TUN_BAD;
        goto keep;
    }
    t->tunnel_type = type;
    t->tunnel_flags = tflags | TUN_DECAP;
    t->tunnel_vlan_id = vlan;
    t->tunnel_id = id;
    __builtin_memcpy(t->outer_src_ip, r->src_ip, 16);
    __builtin_memcpy(t->outer_dst_ip, r->dst_ip, 16);
    w->flags |= PARSE_TUNNEL;
    clear_l3l4(r);
    w->proto = inner;
    w->off = off;
    return 1;
keep:
    t->tunnel_type = type;
    t->tunnel_flags = tflags;
    t->tunnel_vlan_id = vlan;
    t->tunnel_id = id;
    __builtin_memcpy(t->outer_src_ip, r->src_ip, 16);
    __builtin_memcpy(t->outer_dst_ip, r->dst_ip, 16);
    w->flags |= PARSE_TUNNEL;
    return 0;
}

/* The tunnel step and the inner packet's L3 -> L4 (parse() calls it for a
 * candidate, having stored what it needs in w): everything is read back from
 * map memory (see struct tunnel_work). Sets the record's parse_flags. */
static __always_inline void parse_tunnel(struct __sk_buff *skb, struct pkt_record *r, struct tunnel_work *w)
{
    /* A context pointer the compiler knows nothing about: else it shares
     * &skb->data_end between the outer and the inner parse, spilled, and the
     * verifier refuses a load through a modified context pointer. */
    barrier_var(skb);
    asm volatile("" ::: "memory");
    if (!tunnel_step(skb, r, w)) {
        r->parse_flags = w->flags;
        return;
    }
    asm volatile("" ::: "memory");
    struct parse_state st = {};
    st.len = skb->len;
    st.off = w->off;
    st.l3_start = st.off;
    st.proto = w->proto;
    st.flags = w->flags;
    parse_ip(skb, r, &st); /* the inner packet: a second inline copy, no recursion in BPF */
    if (tunnel_candidate(r, st.l4proto))
        w->ext.tunnel_flags |= TUN_NESTED;
    r->parse_flags = st.flags;
}

#endif /* HDRLOG_TUNNEL_H */
