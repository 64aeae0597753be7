/* Payload copy: the first bytes of app-layer candidates behind the record (included by hdrlog.c).
 *
 * Logic
 * -----
 * The record keeps the offset and length of the L4 payload. When that payload
 * is an app-layer candidate, its first bytes (at most HDRLOG_PAYLOAD_BYTES,
 * clipped to the IP length so Ethernet padding is never copied) follow the
 * record, and user space decodes DNS, HTTP and TLS hellos from them
 * (collector/appdecode.py). Candidates are UDP or TCP payloads whose source or
 * destination port passes HDRLOG_IS_DNS_PORT (set from the collector's
 * dns_ports), TCP payloads that start like a TLS handshake record
 * (0x16 0x03) or an HTTP/1.x request or response (the first four bytes of a
 * method -- any upper-case token -- or "HTTP"), and UDP/443 payloads that
 * start like a QUIC long header (Initials: SNI, collector/quic.py). A TLS hello
 * longer than its segment (post-quantum key shares make ClientHellos ~1,800
 * bytes) is remembered in `tls_cont` (LRU, in hdrlog.c with copy_candidate(),
 * which uses it), and the next segment of that direction of the connection is
 * copied too, once; user space joins the two (collector/appdecode.py
 * Reassembly). Other payloads (bulk data) are not copied, so most records stay
 * at the fixed size.
 *
 * The record is built in a per-CPU scratch buffer (struct pkt_scratch). One
 * with copied bytes is sent with bpf_ringbuf_output at its real size (header +
 * copied bytes): a ring-buffer reservation must have a constant size, and
 * reserving the maximum for every packet would multiply ring-buffer traffic;
 * one without (nearly all) goes into a reserved slot of the fixed size (hdrlog.c
 * emit()). The copy is a bounded loop of
 * HDRLOG_PAYLOAD_CHUNK-sized loads at constant offsets, each with a length the
 * verifier sees as 1..HDRLOG_PAYLOAD_CHUNK (one variable-length load of up to
 * the whole buffer was rejected as too complex).
 */
#ifndef HDRLOG_PAYLOAD_H
#define HDRLOG_PAYLOAD_H

#if HDRLOG_PAYLOAD_BYTES % HDRLOG_PAYLOAD_CHUNK
#error "HDRLOG_PAYLOAD_BYTES must be a multiple of HDRLOG_PAYLOAD_CHUNK"
#endif

/* 1 = copy the TCP segment that continues a cut-short TLS hello (map tls_cont). */
#ifndef HDRLOG_TLS_CONT
#define HDRLOG_TLS_CONT 1
#endif
#ifndef HDRLOG_TLS_CONT_ENTRIES
#define HDRLOG_TLS_CONT_ENTRIES 8192
#endif
/* Slots of the tls_cont_hint array in front of tls_cont (hdrlog.c). */
#ifndef HDRLOG_TLS_CONT_HINTS
#define HDRLOG_TLS_CONT_HINTS 4096
#endif

/* A record with room for its payload bytes. */
struct pkt_scratch {
    struct pkt_record rec;
    u8 payload[HDRLOG_PAYLOAD_BYTES];
    u8 tail[sizeof(struct tunnel_ext)]; /* room for the tunnel extension after a full payload */
    struct tunnel_work tun; /* tun.ext built by parse() (tunnel.h) when PARSE_TUNNEL, moved behind the payload at output */
    u64 rng;             /* this CPU's sampling generator (modes.h sample_hit), never sent */
    u64 tick_jiffies;    /* tick_ns() in hdrlog.c: the jiffy of tick_mono_ns, never sent */
    u64 tick_mono_ns;    /* the precise clock read first in that jiffy on this CPU */
};

/* Move the tunnel extension behind the copied payload bytes (records with
 * PARSE_TUNNEL); returns the record's size to output. */
static __always_inline u64 tunnel_append(struct pkt_scratch *s)
{
    u32 pl = s->rec.payload_len;
    if (pl > HDRLOG_PAYLOAD_BYTES)
        pl = HDRLOG_PAYLOAD_BYTES;
    __builtin_memcpy(&s->payload[pl], &s->tun.ext, sizeof(struct tunnel_ext));
    return sizeof(struct pkt_record) + pl + sizeof(struct tunnel_ext);
}

/* One direction of a TCP connection on one interface (key of tls_cont); a
 * decapsulated packet's inner flow with its tunnel type and id (tunnel.h), as
 * in conn_key_of(): tenants of an overlay reuse inner 5-tuples. */
struct cont_key {
    u32 ifindex;
    u16 src_port;
    u16 dst_port;
    u8 direction;
    u8 tunnel_type; /* TUNNEL_* of a decapsulated packet, else 0 */
    u8 _pad[2];
    u32 tunnel_id;  /* its VNI / GRE key */
    u8 src_ip[16];
    u8 dst_ip[16];
};

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
    /* Every HTTP start below begins with a method character: most other payloads
     * (bulk data) stop here, before the switch. */
    if (!method_char(h[0]))
        return 0;
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

/* The tls_cont key of the record's direction of its connection (`t`: the
 * tunnel extension, read only with PARSE_TUNNEL). */
static __always_inline void cont_key_of(const struct pkt_record *r, const struct tunnel_ext *t, struct cont_key *k)
{
    if ((r->parse_flags & PARSE_TUNNEL) && (t->tunnel_flags & TUN_DECAP)) {
        k->tunnel_type = t->tunnel_type;
        k->tunnel_id = t->tunnel_id;
    }
    k->ifindex = r->ifindex;
    k->src_port = r->src_port;
    k->dst_port = r->dst_port;
    k->direction = r->direction;
    __builtin_memcpy(k->src_ip, r->src_ip, 16);
    __builtin_memcpy(k->dst_ip, r->dst_ip, 16);
}

/* The record's slot in tls_cont_hint: a hash of its ports, address tails and interface. */
static __always_inline u32 cont_hint(const struct pkt_record *r)
{
    u32 h = ((u32)r->src_port << 16 | r->dst_port) ^ ((u32)r->src_ip[15] << 24 | (u32)r->dst_ip[15] << 16 |
                                                     (u32)r->src_ip[14] << 8 | r->dst_ip[14]) ^ r->ifindex;
    h ^= h >> 16;
    h *= 0x45d9f3b;
    h ^= h >> 16;
    return h % HDRLOG_TLS_CONT_HINTS;
}

/* The 1:N draw (modes.h): one packet in n, from this CPU's xorshift64* generator
 * (seeded from bpf_get_prandom_u32 once) and a multiply instead of a division
 * (probability ceil(2^32 / n) / 2^32): no helper call per packet. */
static __always_inline int sample_hit(struct pkt_scratch *s, u32 n)
{
    u64 x = s->rng;
    if (!x)
        x = ((u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32() | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    s->rng = x;
    return ((((x * 0x2545F4914F6CDD1DULL) >> 32) * n) >> 32) == 0;
}

#endif /* HDRLOG_PAYLOAD_H */
