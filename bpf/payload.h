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
 * dns_ports), and TCP payloads that start like a TLS handshake record
 * (0x16 0x03) or an HTTP/1.x request or response (the first four bytes of a
 * method, or "HTTP"). Other payloads (bulk data) are not copied, so most
 * records stay at the fixed size.
 *
 * The record is built in a per-CPU scratch buffer (struct pkt_scratch) and sent
 * with bpf_ringbuf_output at its real size (header + copied bytes): a ring-buffer
 * reservation must have a constant size, and reserving the maximum for every
 * packet would multiply ring-buffer traffic. The copy is a bounded loop of
 * HDRLOG_PAYLOAD_CHUNK-sized loads at constant offsets, each with a length the
 * verifier sees as 1..HDRLOG_PAYLOAD_CHUNK (one variable-length load of up to
 * the whole buffer was rejected as too complex).
 */
#ifndef HDRLOG_PAYLOAD_H
#define HDRLOG_PAYLOAD_H

#if HDRLOG_PAYLOAD_BYTES % HDRLOG_PAYLOAD_CHUNK
#error "HDRLOG_PAYLOAD_BYTES must be a multiple of HDRLOG_PAYLOAD_CHUNK"
#endif

/* A record with room for its payload bytes. */
struct pkt_scratch {
    struct pkt_record rec;
    u8 payload[HDRLOG_PAYLOAD_BYTES];
    u64 rng;             /* this CPU's sampling generator (modes.h sample_hit), never sent */
};

/* Is a payload starting with these 4 bytes worth copying? (See the top comment.) */
static __always_inline int app_candidate(u8 l4proto, u16 sport, u16 dport, const u8 *h)
{
    if (HDRLOG_IS_DNS_PORT(sport) || HDRLOG_IS_DNS_PORT(dport))
        return 1;
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
        return 1;
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

/* After parse(): copy the payload's first bytes behind the record when it is
 * an app-layer candidate. The facts it needs are read back from the record
 * (the memory clobber keeps the compiler from carrying them over in
 * registers), so every path through the parser reaches the copy loop in the
 * same verifier state: parse()'s many paths times the copy's would exceed the
 * verifier's budget. */
static __always_inline void copy_candidate(struct __sk_buff *skb, struct pkt_scratch *s)
{
    struct pkt_record *r = &s->rec;
    asm volatile("" ::: "memory");
    u32 off = r->l4_payload_off;
    u32 plen = r->l4_payload_len;
    if (HDRLOG_PAYLOAD_BYTES == 0 || off == 0 || plen == 0)
        return;
    u8 head[4] = {};
    load(skb, skb->len, off, head, sizeof(head));
    if (!app_candidate(r->ip_proto, r->src_port, r->dst_port, head))
        return;
    u16 flags = r->parse_flags;
    r->payload_len = copy_payload(skb, off, plen, s->payload, &flags);
    r->parse_flags = flags;
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
