/* Connection tracker: one entry per bidirectional connection (included by hdrlog.c).
 *
 * Logic
 * -----
 * In MODE_AUTO, handle() gives every IP packet whose transport header was read
 * to conn_track() (in hdrlog.c, which owns the map: BCC rewrites map calls in
 * the main source file only). conn_key_of() builds the canonical key: the
 * interface, IP version and protocol, and the two (address, port) ends in a
 * fixed order (the smaller end first, "side 0"), so both directions of a
 * connection find the same entry. For ICMP the ports are the type and the
 * type's counterpart (echo request 8 <-> reply 0, ...), as Zeek and the
 * Community ID spec pair them, else the type and the code.
 *
 * A new connection is inserted as an all-zero value (BPF_NOEXIST, from a
 * per-CPU blank: the value is too big for the stack). A packet that changes
 * nothing but counters -- TCP without SYN/FIN/RST from a side already past
 * INACTIVE that has given its 'D' (or 'A') letter, no zero window, no handshake
 * time to take; UDP and ICMP once their side is active -- is counted by
 * conn_fast() with atomic adds and no lock (a retransmission too, with the lock
 * only for its 'T' letter at the 1st, 10th, 100th...), and stamps last_ns from
 * hdrlog.c's tick_ns() (the precise clock read by the first such packet of each
 * jiffy on this CPU, then reused: at most one tick, 1/CONFIG_HZ, behind the
 * precise clock, and ~1 ns a packet where bpf_ktime_get_coarse_ns costs 15 ns
 * here; max() keeps last_ns from going back). So end_ts is exact to the tick when a connection's last packets are
 * counters only; every packet that changes state, history or handshake times
 * is stamped with the precise clock. Every other packet (SYN,
 * FIN, RST, the first payload each way, zero windows, a race on seq_end) takes
 * the value's bpf_spin_lock and runs conn_update(), which needs no helper call:
 *   - the first packet fixes who is the originator: its sender, except when it
 *     is a SYN+ACK (Zeek flips roles then: CONN_FLIPPED, '^' in the history);
 *   - per side: packets and IP bytes as frames on the wire (a GSO/GRO skb
 *     counts skb->gso_segs packets, each further one with its own IP and L4
 *     headers' bytes: wire_ip_bytes()), payload bytes (TCP: how far the sequence
 *     space advanced, SYN and FIN octets left out, so a retransmission is not
 *     counted twice and 4 GiB wraps are fine; UDP/ICMP: payload lengths),
 *     retransmissions (payload that starts before the highest sequence number
 *     seen), zero-window advertisements, and the handshake times (first SYN,
 *     first SYN+ACK, first ACK after the peer's SYN+ACK);
 *   - per side, Zeek's TCP endpoint state machine (INACTIVE, SYN_SENT,
 *     SYN_ACK_SENT, PARTIAL, ESTABLISHED, CLOSED, RESET; transitions as in
 *     Zeek's TCPSessionAdapter::Update*State), so user space computes
 *     conn_state with Zeek's own conn_state() rules;
 *   - the history letters in the order the packets came, each tagged with its
 *     side (bit 7 = side 1; user space writes the originator's in upper case):
 *     S H A D F R I Q once per side, S H F R again when their sequence number
 *     changes, T and W at the 1st, 10th, 100th... occurrence (Zeek's rules).
 *     At most HDRLOG_CONN_HISTORY letters; beyond, CONN_HIST_FULL.
 * The lock makes the two directions, which run on different CPUs, update the
 * state and history in turn, in arrival order. Counters are atomic adds on both
 * paths, and seq_end only moves forward by compare-and-swap, so the counts are
 * exact whichever path a packet takes.
 *
 * User space (collector/connections.py) reads the map in bulk every second
 * (BPF_MAP_LOOKUP_BATCH with BPF_F_LOCK), writes interim rows for open
 * connections, and finalizes closed (after a linger) or idle ones with one
 * BPF_MAP_LOOKUP_AND_DELETE_ELEM each, so the counts of the final row are the
 * entry's last. A full map refuses the insert: the packet counts as
 * CNT_CONN_MAP_FULL and goes to the ring buffer with LOG_CONN_FALLBACK (every
 * such packet, unsampled), so it is logged as a packet row instead.
 * Packets without a transport header to key on (non-IP, non-first fragments,
 * truncated headers) go to the flow maps as before (flows.h).
 */
#ifndef HDRLOG_CONNTRACK_H
#define HDRLOG_CONNTRACK_H

#ifndef HDRLOG_CONN_ENTRIES
#define HDRLOG_CONN_ENTRIES 65536
#endif
#define HDRLOG_CONN_HISTORY 32 /* history letters kept per connection (a power of two) */

/* conn_track() results */
#define CONN_UNTRACKED 0 /* no key (non-IP, fragment, truncated): the caller uses the flow map */
#define CONN_TRACKED 1
#define CONN_FULL (-1)   /* the map is full: the caller falls back to the ring buffer */

/* pkt_record.log_reason: the connection map was full, this record stands for
 * itself (MODE_PACKETS's LOG_ALL bit, which MODE_AUTO has no other use for). */
#define LOG_CONN_FALLBACK LOG_ALL

/* conn_value.flags */
#define CONN_ORIG_1    (1 << 0) /* the originator is side 1 */
#define CONN_FLIPPED   (1 << 1) /* the first packet was a SYN+ACK: roles flipped (Zeek's '^') */
#define CONN_HIST_FULL (1 << 2) /* letters beyond HDRLOG_CONN_HISTORY were left out */
#define CONN_STARTED   (1 << 3) /* the first packet was counted (a fresh entry is all zeros) */

/* conn_side.state: Zeek's TCP endpoint states (and UDP: 0 inactive, 4 active). */
#define ZS_INACTIVE 0
#define ZS_SYN_SENT 1
#define ZS_SYN_ACK_SENT 2
#define ZS_PARTIAL 3
#define ZS_ESTABLISHED 4
#define ZS_CLOSED 5
#define ZS_RESET 6

/* conn_side.hist: letters a side already gave once (Zeek's HIST_* masks). */
#define CH_SYN      (1 << 0) /* S or H */
#define CH_FIN      (1 << 1)
#define CH_RST      (1 << 2)
#define CH_FIN_RST  (1 << 3) /* I */
#define CH_DATA     (1 << 4)
#define CH_ACK      (1 << 5)
#define CH_MULTI    (1 << 6) /* Q */
#define CH_SEQ      (1 << 8) /* seq_end holds a sequence number */

#define be64(x) __builtin_bswap64(x)

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

/* Key: the connection, both directions. */
struct conn_key {
    __u32 ifindex;
    __u8  ip_version;
    __u8  ip_proto;
    __u8  tunnel_type;   /* TUNNEL_* of a decapsulated packet (the ends are the inner flow's), else 0 */
    __u8  _pad;
    __u8  ip0[16];       /* side 0: the smaller (address, port) end; as pkt_record's addresses */
    __u8  ip1[16];
    __u16 port0;         /* ICMP: type / counterpart type or code */
    __u16 port1;
    __u32 tunnel_id;     /* its VNI / GRE key: tenants of an overlay reuse addresses */
};                       /* 48 bytes */

/* One direction's share of a connection (what one side sent). */
struct conn_side {
    __u64 pkts;
    __u64 ip_bytes;      /* IP total lengths */
    __u64 bytes;         /* payload: TCP by sequence numbers, else L4 payload lengths */
    __u64 ts_syn;        /* first SYN without ACK (CLOCK_MONOTONIC ns, 0 = none) */
    __u64 ts_synack;     /* first SYN+ACK */
    __u64 ts_ack;        /* first ACK without SYN after the peer's SYN+ACK */
    __u32 seq_end;       /* highest seq + payload (+1 for a SYN or FIN) seen (8-byte aligned: SEQ_WORD) */
    __u32 retrans;       /* payload packets starting before seq_end (the word's high half) */
    __u32 zero_win;      /* zero-window advertisements (not on SYN or RST) */
    __u32 last_syn;      /* seq of the last SYN / FIN end / RST, for repeated letters */
    __u32 last_fin;
    __u32 last_rst;
    __u32 t_next;        /* unused: 'T' comes from hist_due() on the atomic retrans count */
    __u32 w_next;        /* zero_win count that gives the next 'W' (0 = 1) */
    __u16 hist;          /* CH_* */
    __u8  state;         /* ZS_* */
    __u8  prev_state;
    __u32 _pad;
};                       /* 88 bytes */

_Static_assert(__builtin_offsetof(struct conn_side, seq_end) % 8 == 0 &&
               __builtin_offsetof(struct conn_side, retrans) == __builtin_offsetof(struct conn_side, seq_end) + 4,
               "seq_end and retrans must share one aligned u64");

/* Value: the connection's counts, history and state. */
struct conn_value {
    struct bpf_spin_lock lock;
    __u32 flags;         /* CONN_* */
    __u64 first_ns;      /* first and last packet, CLOCK_MONOTONIC */
    __u64 last_ns;
    struct conn_side side[2];
    __u8  hist_len;      /* letters in hist (may exceed HDRLOG_CONN_HISTORY: see flags) */
    __u8  _pad[7];
    __u8  hist[HDRLOG_CONN_HISTORY]; /* 'S' 'H' 'A' 'D' 'F' 'R' 'I' 'Q' 'T' 'W', | 0x80 = side 1 */
    __u8  outer_ip[2][16]; /* tunnelled connections: each side's outer (tunnel endpoint) address, from the first packet */
};                       /* 272 bytes */

/* The same size without the lock: per-CPU maps may not hold a bpf_spin_lock. */
struct conn_blank {
    __u8 b[sizeof(struct conn_value)];
};

/* ICMP "ports" as Zeek pairs them: (type, counterpart type) for request/reply
 * types, else (type, code). Returns 1 when the pair is two-way. */
static __always_inline int icmp_ports(u8 v, u8 type, u8 code, u16 *sport, u16 *dport)
{
    int c = -1;
    if (v == 4) {
        switch (type) {
        case 8: c = 0; break;   case 0: c = 8; break;    /* echo */
        case 13: c = 14; break; case 14: c = 13; break;  /* timestamp */
        case 15: c = 16; break; case 16: c = 15; break;  /* information */
        case 17: c = 18; break; case 18: c = 17; break;  /* address mask */
        case 10: c = 9; break;  case 9: c = 10; break;   /* router solicitation / advertisement */
        }
    } else {
        switch (type) {
        case 128: c = 129; break; case 129: c = 128; break; /* echo */
        case 133: c = 134; break; case 134: c = 133; break; /* router sol / adv */
        case 135: c = 136; break; case 136: c = 135; break; /* neighbor sol / adv */
        case 130: c = 131; break; case 131: c = 130; break; /* multicast listener query / report */
        case 144: c = 145; break; case 145: c = 144; break; /* home agent address discovery */
        }
    }
    *sport = type;
    *dport = c < 0 ? code : c;
    return c >= 0;
}

/* The canonical key of the record's connection and which side sent it.
 * Returns 0 when the packet has nothing to key on. */
static __always_inline int conn_key_of(const struct pkt_record *r, const struct tunnel_ext *t, struct conn_key *k,
                                       int *side)
{
    if (!r->ip_version)
        return 0;
    if (r->parse_flags & (PARSE_TRUNC_L3 | PARSE_TRUNC_L4 | PARSE_BAD_IHL | PARSE_EXTHDR_LIMIT |
                          PARSE_NONFIRST_FRAG | PARSE_BAD_IP_VERSION))
        return 0;
    u16 sp = r->src_port, dp = r->dst_port;
    u8 p = r->ip_proto;
    if (p == IPPROTO_ICMP || p == IPPROTO_ICMPV6_)
        icmp_ports(r->ip_version, r->icmp_type, r->icmp_code, &sp, &dp);
    else if (p != IPPROTO_TCP && p != IPPROTO_UDP)
        sp = dp = 0;
    /* Order the ends: addresses as two big-endian halves, then ports. */
    const u64 *s = (const u64 *)r->src_ip, *d = (const u64 *)r->dst_ip;
    u64 s0 = be64(s[0]), s1 = be64(s[1]), d0 = be64(d[0]), d1 = be64(d[1]);
    int swap = s0 > d0 || (s0 == d0 && (s1 > d1 || (s1 == d1 && sp > dp)));
    k->ifindex = r->ifindex;
    k->ip_version = r->ip_version;
    k->ip_proto = p;
    if ((r->parse_flags & PARSE_TUNNEL) && (t->tunnel_flags & TUN_DECAP)) {
        k->tunnel_type = t->tunnel_type;
        k->tunnel_id = t->tunnel_id;
    }
    if (swap) {
        __builtin_memcpy(k->ip0, r->dst_ip, 16);
        __builtin_memcpy(k->ip1, r->src_ip, 16);
        k->port0 = dp;
        k->port1 = sp;
    } else {
        __builtin_memcpy(k->ip0, r->src_ip, 16);
        __builtin_memcpy(k->ip1, r->dst_ip, 16);
        k->port0 = sp;
        k->port1 = dp;
    }
    *side = swap;
    return 1;
}

static __always_inline void hist_add(struct conn_value *v, u8 letter, int side)
{
    u32 n = v->hist_len;
    if (n >= HDRLOG_CONN_HISTORY) {
        v->flags |= CONN_HIST_FULL;
        return;
    }
    v->hist[n & (HDRLOG_CONN_HISTORY - 1)] = letter | (side ? 0x80 : 0);
    v->hist_len = n + 1;
}

/* Zeek's ScaledHistoryEntry: the letter at the 1st, 10th, 100th... time. */
static __always_inline void hist_scaled(struct conn_value *v, u8 letter, int side, u32 count, u32 *next)
{
    u32 t = *next ? *next : 1;
    if (count == t) {
        hist_add(v, letter, side);
        *next = t < 100000000 ? t * 10 : 0xffffffff;
    } else if (!*next) {
        *next = 1;
    }
}

/* Zeek's ScaledHistoryEntry for a counter that atomic adds move: `count` is the
 * value this packet made, so every value is seen exactly once. */
static __always_inline int hist_due(u32 count)
{
    return count == 1 || count == 10 || count == 100 || count == 1000 || count == 10000 ||
           count == 100000 || count == 1000000 || count == 10000000 || count == 100000000;
}

/* seq_end and retrans share one naturally aligned u64 (seq_end the low half):
 * 64-bit atomics are what the BPF target has here, and a compare-and-swap on the
 * word moves seq_end while an atomic add of 1 << 32 counts a retransmission. */
#define SEQ_WORD(e) ((u64 *)&(e)->seq_end)

/* Move seq_end forward to `end`; returns how far it moved (0: not forward, or
 * other CPUs kept moving the word for every attempt). */
static __always_inline s32 seq_advance(struct conn_side *me, u32 end)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u64 old = *(volatile u64 *)SEQ_WORD(me);
        s32 adv = (s32)(end - (u32)old);
        if (adv <= 0)
            return 0;
        if (__sync_val_compare_and_swap(SEQ_WORD(me), old, (old & 0xffffffff00000000ULL) | end) == old)
            return adv;
    }
    return 0;
}

/* Count a retransmission; returns the count it made. */
static __always_inline u32 retrans_add(struct conn_side *me)
{
    return (u32)(__sync_fetch_and_add(SEQ_WORD(me), 1ULL << 32) >> 32) + 1;
}

static __always_inline void zs_set(struct conn_side *e, u8 st)
{
    e->prev_state = e->state;
    e->state = st;
}

/* Zeek's TCP endpoint state machine (TCPSessionAdapter::UpdateStateMachine)
 * for a packet `ep` sent. The SYN/SYN-ACK reversal is not flipped here. */
static __always_inline void tcp_state(struct conn_side *ep, struct conn_side *peer, int is_orig, u16 fl, u32 len)
{
    int syn = fl & TH_SYN, ack = fl & TH_ACK, fin = fl & TH_FIN, rst = fl & TH_RST;
    switch (ep->state) {
    case ZS_INACTIVE:
        if (syn) {
            if (is_orig) {
                zs_set(ep, ack ? ZS_SYN_ACK_SENT : ZS_SYN_SENT);
            } else {
                if (peer->state == ZS_SYN_SENT || (!ack && peer->state == ZS_SYN_ACK_SENT))
                    zs_set(peer, ZS_ESTABLISHED);
                zs_set(ep, ZS_ESTABLISHED);
            }
        }
        if (fin)
            zs_set(ep, ZS_CLOSED);
        if (rst)
            zs_set(ep, ZS_RESET);
        if (ep->state == ZS_INACTIVE) {
            if (!is_orig && len == 0 && peer->state == ZS_SYN_SENT)
                ; /* an ACK of the SYN before the SYN+ACK: not a partial connection */
            else if (ack && peer->state == ZS_ESTABLISHED)
                zs_set(ep, ZS_ESTABLISHED);
            else
                zs_set(ep, ZS_PARTIAL);
        }
        break;
    case ZS_SYN_SENT:
    case ZS_SYN_ACK_SENT:
        if (fin)
            zs_set(ep, ZS_CLOSED);
        if (rst)
            zs_set(ep, ZS_RESET);
        break;
    case ZS_ESTABLISHED:
    case ZS_PARTIAL:
        if (syn && ep->state == ZS_PARTIAL && peer->state == ZS_INACTIVE && !ack)
            zs_set(ep, ZS_SYN_SENT);
        if (fin && !rst) {
            zs_set(ep, ZS_CLOSED);
            if (peer->state == ZS_RESET && peer->prev_state == ZS_CLOSED)
                zs_set(peer, ZS_CLOSED); /* FIN then RST from the peer: a normal close */
        }
        if (rst)
            zs_set(ep, ZS_RESET);
        break;
    case ZS_CLOSED:
        if (rst && peer->state != ZS_CLOSED)
            zs_set(ep, ZS_RESET);
        break;
    }
}

/* Zeek's update_history() for one TCP packet. */
static __always_inline void tcp_history(struct conn_value *v, struct conn_side *me, int side, u16 fl,
                                        u32 seq, u32 len)
{
    int bits = !!(fl & TH_SYN) + !!(fl & TH_FIN) + !!(fl & TH_RST);
    if (bits > 1) {
        if ((fl & TH_FIN) && (fl & TH_RST)) {
            if (!(me->hist & CH_FIN_RST)) {
                me->hist |= CH_FIN_RST;
                hist_add(v, 'I', side);
            }
        } else if (!(me->hist & CH_MULTI)) {
            me->hist |= CH_MULTI;
            hist_add(v, 'Q', side);
        }
    } else if (bits == 1) {
        if (fl & TH_SYN) {
            u8 code = (fl & TH_ACK) ? 'H' : 'S';
            if (!(me->hist & CH_SYN)) {
                me->hist |= CH_SYN;
                hist_add(v, code, side);
            } else if (seq != me->last_syn) {
                hist_add(v, code, side);
            }
            me->last_syn = seq;
        }
        if (fl & TH_FIN) {
            u32 end = seq + len; /* a FIN's number comes after its data */
            if (!(me->hist & CH_FIN)) {
                me->hist |= CH_FIN;
                hist_add(v, 'F', side);
            } else if (end != me->last_fin) {
                hist_add(v, 'F', side);
            }
            me->last_fin = end;
        }
        if (fl & TH_RST) {
            if (!(me->hist & CH_RST)) {
                me->hist |= CH_RST;
                hist_add(v, 'R', side);
            } else if (seq != me->last_rst) {
                hist_add(v, 'R', side);
            }
            me->last_rst = seq;
        }
    } else if (len) {
        if (!(me->hist & CH_DATA)) {
            me->hist |= CH_DATA;
            hist_add(v, 'D', side);
        }
    } else if (fl & TH_ACK) {
        if (!(me->hist & CH_ACK)) {
            me->hist |= CH_ACK;
            hist_add(v, 'A', side);
        }
    }
}

/* The IP bytes of a record's `segs` frames on the wire. A GSO skb (TCP builds
 * them on egress before TC; GRO merges them on ingress) is `segs` frames: its IP
 * header's length covers all the payload and one set of headers, and every
 * further frame carries its own IP and L4 headers (ip_len - l4_payload_len). */
static __always_inline u64 wire_ip_bytes(const struct pkt_record *r, u32 segs)
{
    u32 ip = r->ip_len, plen = r->l4_payload_len;
    u64 b = ip;
    if (segs > 1 && ip > plen)
        b += (u64)(segs - 1) * (ip - plen);
    return b;
}

/* Count one skb, `segs` frames (skb->gso_segs, 1 when 0), into its connection
 * (called with v->lock held: no helper calls in here; r->mono_ns is the precise
 * clock). Returns the connection's packet count before this one. */
static __always_inline u64 conn_update(struct conn_value *v, const struct pkt_record *r, const struct tunnel_ext *t,
                                       int side, u32 segs)
{
    side &= 1;
    struct conn_side *me = &v->side[side];
    struct conn_side *peer = &v->side[side ^ 1];
    u64 before = v->side[0].pkts + v->side[1].pkts;
    u16 fl = r->tcp_flags;
    u8 p = r->ip_proto;
    int tcp = p == IPPROTO_TCP;
    if (!(v->flags & CONN_STARTED)) {
        int flip = tcp && (fl & (TH_SYN | TH_ACK | TH_FIN | TH_RST)) == (TH_SYN | TH_ACK);
        v->flags = CONN_STARTED | ((side ^ flip) ? CONN_ORIG_1 : 0) | (flip ? CONN_FLIPPED : 0);
        v->first_ns = r->mono_ns;
        if ((r->parse_flags & PARSE_TUNNEL) && (t->tunnel_flags & TUN_DECAP)) {
            /* The tunnel endpoints, by side: the sender's outer source is its side's. */
            __builtin_memcpy(v->outer_ip[side], t->outer_src_ip, 16);
            __builtin_memcpy(v->outer_ip[side ^ 1], t->outer_dst_ip, 16);
        }
    }
    if (r->mono_ns > v->last_ns)
        v->last_ns = r->mono_ns;
    __sync_fetch_and_add(&me->pkts, segs);
    __sync_fetch_and_add(&me->ip_bytes, wire_ip_bytes(r, segs));
    if (!tcp) {
        u32 hdr = (p == IPPROTO_UDP || p == IPPROTO_ICMP || p == IPPROTO_ICMPV6_) ? 8 : 0;
        u32 l4 = r->l4_len;
        __sync_fetch_and_add(&me->bytes, l4 > hdr ? l4 - hdr : 0);
        if (p == IPPROTO_UDP) {
            me->state = ZS_ESTABLISHED; /* UDP_ACTIVE */
            if (!(me->hist & CH_DATA)) {
                me->hist |= CH_DATA;
                hist_add(v, 'D', side);
            }
        } else {
            me->state = ZS_ESTABLISHED;
        }
        return before;
    }
    int is_orig = side == ((v->flags & CONN_ORIG_1) ? 1 : 0);
    u32 seq = r->tcp_seq;
    u32 len = r->l4_payload_len;
    int syn = fl & TH_SYN;
    /* Sequence space: bytes = how far it advanced, less the SYN and FIN octets. */
    int fin = (fl & TH_FIN) != 0;
    u32 end = seq + len + (syn ? 1 : 0) + fin;
    if (!(me->hist & CH_SEQ)) {
        me->hist |= CH_SEQ;
        me->seq_end = syn ? seq + 1 : seq;
    }
    /* A SYN's payload starts one past its seq (the SYN octet): data on a SYN is new data. */
    if (len && (s32)(seq + (syn ? 1 : 0) - *(volatile u32 *)&me->seq_end) < 0) {
        if (hist_due(retrans_add(me)))
            hist_add(v, 'T', side);
    }
    s32 adv = seq_advance(me, end);
    if (adv > 0)
        __sync_fetch_and_add(&me->bytes, (u32)adv - fin); /* syn: seq_end started past the SYN octet */
    if (r->tcp_window == 0 && !(fl & (TH_SYN | TH_RST))) {
        me->zero_win++;
        hist_scaled(v, 'W', side, me->zero_win, &me->w_next);
    }
    /* Handshake times. */
    if (syn && !(fl & TH_ACK)) {
        if (!me->ts_syn)
            me->ts_syn = r->mono_ns;
    } else if (syn) {
        if (!me->ts_synack)
            me->ts_synack = r->mono_ns;
    } else if ((fl & TH_ACK) && peer->ts_synack && !me->ts_ack) {
        me->ts_ack = r->mono_ns;
    }
    tcp_history(v, me, side, fl, seq, len);
    tcp_state(me, peer, is_orig, fl, len);
    return before;
}

/* The lock-free path (see the top): count a packet that changes nothing but
 * counters. Returns 0, having changed nothing, when the packet needs
 * conn_update() under the lock; else 1 (and *letter = 1 when a 'T' letter is
 * due, for the caller to add under the lock). *before: the connection's packets
 * before this one. */
static __always_inline int conn_fast(struct conn_value *v, const struct pkt_record *r, int side, u32 segs,
                                     u64 now, u64 *before, int *letter)
{
    side &= 1;
    struct conn_side *me = &v->side[side];
    struct conn_side *peer = &v->side[side ^ 1];
    if (!(v->flags & CONN_STARTED))
        return 0;
    u8 p = r->ip_proto;
    u16 hist = me->hist;
    if (p == IPPROTO_TCP) {
        u16 fl = r->tcp_flags;
        u32 len = r->l4_payload_len;
        if ((fl & (TH_SYN | TH_FIN | TH_RST)) || me->state == ZS_INACTIVE || !(hist & CH_SEQ) ||
            r->tcp_window == 0)
            return 0;
        if (len ? !(hist & CH_DATA) : ((fl & TH_ACK) && !(hist & CH_ACK)))
            return 0; /* its first 'D' or 'A' */
        if ((fl & TH_ACK) && peer->ts_synack && !me->ts_ack)
            return 0; /* the handshake's last ACK */
        u32 seq = r->tcp_seq;
        u32 end = seq + len;
        u64 old = *(volatile u64 *)SEQ_WORD(me);
        u32 cur = (u32)old;
        s32 adv = (s32)(end - cur);
        if (adv > 0 &&
            __sync_val_compare_and_swap(SEQ_WORD(me), old, (old & 0xffffffff00000000ULL) | end) != old)
            return 0; /* another CPU moved the word: the locked path sorts it out */
        if (adv > 0)
            __sync_fetch_and_add(&me->bytes, (u32)adv);
        if (len && (s32)(seq - cur) < 0)
            *letter = hist_due(retrans_add(me));
    } else if (p == IPPROTO_UDP ? !(hist & CH_DATA) : me->state != ZS_ESTABLISHED) {
        return 0;
    } else {
        u32 hdr = (p == IPPROTO_UDP || p == IPPROTO_ICMP || p == IPPROTO_ICMPV6_) ? 8 : 0;
        u32 l4 = r->l4_len;
        __sync_fetch_and_add(&me->bytes, l4 > hdr ? l4 - hdr : 0);
    }
    if (now > v->last_ns)
        v->last_ns = now;
    *before = __sync_fetch_and_add(&me->pkts, segs) + *(volatile u64 *)&peer->pkts;
    __sync_fetch_and_add(&me->ip_bytes, wire_ip_bytes(r, segs));
    return 1;
}

#endif /* HDRLOG_CONNTRACK_H */
