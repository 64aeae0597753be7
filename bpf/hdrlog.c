/* hdrlog TC classifier: headers of every packet, in-kernel aggregates, and records through a ring buffer.
 *
 * Logic
 * -----
 * hdrlog_ingress and hdrlog_egress are attached (direct-action) to the ingress
 * and egress hooks of every monitored interface (tcx links or clsact filters,
 * collector/attach.py). The program never drops, edits or redirects a packet:
 * it always returns TC_ACT_UNSPEC, so the packet continues as if the program
 * were not there and any later filter on the hook still runs. Both run
 * handle(), which for each packet, in this order:
 *
 *  1. counts it (CNT_SEEN in the per-CPU `counters`) and parses its headers
 *     (parse.h: L2 -> IPv4/IPv6 -> L4, and one level of tunnel, tunnel.h: the
 *     inner L3 -> L4) into a struct pkt_record (types.h) built in the per-CPU
 *     `scratch` buffer (a tunnel's outer endpoints, type and id beside it);
 *     the precise clock (bpf_ktime_get_ns, ~31 ns here, a fifth to a third of
 *     a packet's cost) is read for every packet that passes the filters in
 *     MODE_PACKETS, and in the other modes only for those that need it (a
 *     record, a new flow, a connection whose state or history changes);
 *     packets that only move a flow's or a connection's counters stamp its
 *     last-seen time from tick_ns() (the precise clock read once per jiffy per CPU);
 *  2. applies the in-kernel filters (filter.h, filter_pass() below): a rejected
 *     packet counts as CNT_FILTERED and costs nothing further;
 *  3. in MODE_AUTO counts it into its bidirectional connection (conntrack.h,
 *     conn_track() below, Zeek's semantics); packets without a connection key,
 *     and every packet in MODE_FLOWS, go into the live flow map instead
 *     (flows.h, flow_account() below). A full map sends the packet on as a
 *     record (LOG_CONN_FALLBACK / LOG_FLOW_FALLBACK), never silently lost;
 *  4. (MODE_PACKETS, MODE_AUTO) copies the first payload bytes of app-layer
 *     candidates behind the record (payload.h, copy_candidate() below), and
 *     the segment that continues a TLS hello cut short by its segment's end
 *     (`tls_cont`);
 *  5. decides whether the packet becomes a record (modes.h): every packet or a
 *     1:N sample in MODE_PACKETS, none in MODE_FLOWS, notable packets plus a
 *     1:N sample of the rest in MODE_AUTO -- the cheapest tests first, the draw
 *     (a per-CPU generator, no helper call) only for packets not notable;
 *  6. sends the record into `records` (emit()): a fixed-size one into a
 *     reserved slot (copy + bpf_ringbuf_submit), one with payload bytes or a
 *     tunnel extension with bpf_ringbuf_output at its real size (header +
 *     copied payload + the extension when PARSE_TUNNEL); a full ring buffer
 *     drops it and counts CNT_RINGBUF_FULL. User space (collector/) reads the ring buffer in bulk,
 *     converts mono_ns (CLOCK_MONOTONIC) to UTC and ifindex to a name, and
 *     drains the flow and connection maps.
 *
 * The maps and the functions that use them live in this file, each under its
 * feature's heading: BCC rewrites map calls in the main source file only. The
 * headers hold the types, constants and the logic that touches no map.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>

#include "types.h"
#include "parse.h"
#include "payload.h"
#include "modes.h"
#include "filter.h"
#include "flows.h"
#include "conntrack.h"

/* ---- output (types.h) ---- */

/* Records to user space.
 * Key: none (ring buffer). Value: struct pkt_record, one per packet (+ payload bytes). */
BPF_RINGBUF_OUTPUT(records, HDRLOG_RINGBUF_PAGES);

/* What the program did, per CPU (summed in user space). One entry, so one
 * lookup per packet.
 * Key: 0 (u32). Value: struct counters, n[CNT_*] = packet counts. */
BPF_PERCPU_ARRAY(counters, struct counters, 1);

/* Where a record is built before it goes to the ring buffer, per CPU (payload.h).
 * Key: 0 (u32). Value: struct pkt_scratch (only rec and the first
 * rec.payload_len payload bytes are meaningful). */
BPF_PERCPU_ARRAY(scratch, struct pkt_scratch, 1);

/* Ring buffer submit flags: 0 = adaptive wakeup of the reader. */
#ifndef HDRLOG_RB_FLAGS
#define HDRLOG_RB_FLAGS 0
#endif

/* Send the finished record in s to user space; < 0 when the ring buffer is full.
 * A record without payload bytes (almost all) goes into a slot reserved at its
 * constant size, copied in with word moves by the program, then submitted: that
 * costs ~20 ns less per record than bpf_ringbuf_output of the same 120 bytes
 * (its in-kernel memcpy; bench/bpf_ab.py, this VM). A record with payload bytes
 * behind it has a variable size, which a reservation cannot have: it goes out
 * with bpf_ringbuf_output at its real size, as does one with a tunnel
 * extension (tunnel.h). */
static __always_inline int emit(struct pkt_scratch *s)
{
    struct pkt_record *r = &s->rec;
    if (!r->payload_len && !(r->parse_flags & PARSE_TUNNEL)) {
        struct pkt_record *slot = records.ringbuf_reserve(sizeof(struct pkt_record));
        if (!slot)
            return -1;
        __builtin_memcpy(slot, r, sizeof(*r));
        records.ringbuf_submit(slot, HDRLOG_RB_FLAGS);
        return 0;
    }
    u64 size = sizeof(struct pkt_record) + r->payload_len;
#if HDRLOG_TUNNELS
    if (r->parse_flags & PARSE_TUNNEL)
        size = tunnel_append(s); /* the extension behind the payload bytes (tunnel.h) */
#endif
    barrier_var(size);
    if (size > sizeof(struct pkt_scratch))
        size = sizeof(struct pkt_scratch);
    return records.ringbuf_output(s, size, HDRLOG_RB_FLAGS);
}

/* ---- the clock ---- */

/* CLOCK_MONOTONIC to the tick, for what only needs a last-seen stamp (a flow's
 * or a connection's last_ns when the packet changes nothing but counters): the
 * precise clock read by the first such packet of each jiffy on this CPU, then
 * reused until jiffies moves on. So it is never ahead of the real time and at
 * most one tick (1/CONFIG_HZ) behind, like CLOCK_MONOTONIC_COARSE, but cheaper:
 * measured here per call, bpf_ktime_get_ns 31 ns, bpf_ktime_get_coarse_ns 15 ns,
 * bpf_jiffies64 0.2 ns (the verifier inlines it into one load). Never for a
 * record's mono_ns: packet rows always get the precise clock. */
static __always_inline u64 tick_ns(struct pkt_scratch *s)
{
    u64 j = bpf_jiffies64();
    if (j != s->tick_jiffies) {
        s->tick_mono_ns = bpf_ktime_get_ns();
        s->tick_jiffies = j;
    }
    return s->tick_mono_ns;
}

/* ---- payload copy (payload.h) ---- */

/* TLS hellos cut short by the end of their segment, waiting for the next one.
 * Key: struct cont_key. Value: u32 TCP sequence number the continuation starts at.
 * LRU: a continuation that never comes ages out. */
BPF_TABLE("lru_hash", struct cont_key, u32, tls_cont, HDRLOG_TLS_CONT_ENTRIES);

/* A filter in front of tls_cont: entries put in minus taken out, per hash of
 * the key's ports, address tails and interface (cont_hint()), and in the last
 * slot all of them. A TCP packet that is no candidate looks no further when the
 * total is 0 (no hello waits anywhere: one array load, not the hash), nor when
 * its own slot is 0 (an array lookup instead of the hash lookup: measured here,
 * the lookup of every bulk segment would cost ~45 ns while any hello waits). An
 * LRU eviction leaves its slot and the total above 0: they then always look,
 * nothing worse.
 * Key: slot (u32, 0..HDRLOG_TLS_CONT_HINTS-1; HDRLOG_TLS_CONT_HINTS = the total).
 * Value: u32 count. */
BPF_ARRAY(tls_cont_hint, u32, HDRLOG_TLS_CONT_HINTS + 1);

/* After parse(): copy the payload's first bytes behind the record when it is
 * an app-layer candidate, or when it continues a cut-short TLS hello. The facts
 * it needs are read back from the record (the memory clobber keeps the compiler
 * from carrying them over in registers), so every path through the parser
 * reaches the copy loop in the same verifier state: parse()'s many paths times
 * the copy's would exceed the verifier's budget. */
static __always_inline void copy_candidate(struct __sk_buff *skb, struct pkt_scratch *s)
{
    struct pkt_record *r = &s->rec;
    asm volatile("" ::: "memory");
    u32 off = r->l4_payload_off;
    u32 plen = r->l4_payload_len;
    if (HDRLOG_PAYLOAD_BYTES == 0 || off == 0 || plen == 0)
        return;
    u8 head[16] WORD_ALIGNED = {}; /* app_candidate() reads 8; a TLS hello's length is in bytes 6..8 */
    load(skb, skb->len, off, head, sizeof(head));
    int cand = app_candidate(r->ip_proto, r->src_port, r->dst_port, head);
#if HDRLOG_TLS_CONT
    if (r->ip_proto != IPPROTO_TCP && !cand)
        return;
    u32 all = HDRLOG_TLS_CONT_HINTS;
    u32 *total = tls_cont_hint.lookup(&all);
    if (!total || (!cand && !*total))
        return; /* no candidate, and no hello waits anywhere */
    u32 slot = cont_hint(r);
    u32 *live = tls_cont_hint.lookup(&slot);
    struct cont_key k;
    if (!cand) {
        /* The segment after a cut-short TLS hello: copied too, once, when it
         * starts where the hello's segment ended. */
        if (!live || !*live)
            return;
        __builtin_memset(&k, 0, sizeof(k));
        cont_key_of(r, &s->tun.ext, &k);
        u32 *next = tls_cont.lookup(&k);
        if (!next)
            return;
        u32 want = *next;
        if (tls_cont.delete(&k) == 0) {
            __sync_fetch_and_add(live, -1);
            __sync_fetch_and_add(total, -1);
        }
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
        __builtin_memset(&k, 0, sizeof(k));
        cont_key_of(r, &s->tun.ext, &k);
        u32 next = r->tcp_seq + plen;
        /* Count only a new entry: a retransmitted first segment updates its own. */
        if (tls_cont.insert(&k, &next) == 0) {
            __sync_fetch_and_add(live, 1);
            __sync_fetch_and_add(total, 1);
        } else
            tls_cont.update(&k, &next);
    }
#endif
}

/* ---- modes and filters (modes.h, filter.h) ---- */

/* Key: 0 (u32). Value: struct hdrlog_cfg. */
BPF_ARRAY(cfg, struct hdrlog_cfg, 1);
/* Key: struct addr_key (longest prefix). Value: u8 F_* bits, ancestors' bits ORed in. */
BPF_F_TABLE("lpm_trie", struct addr_key, u8, f_addr, HDRLOG_FILTER_PREFIXES, BPF_F_NO_PREALLOC);
/* Key: port number (u32 index). Value: u8 F_* bits. */
BPF_ARRAY(f_ports, u8, 65536);
/* Key: ifindex (u32). Value: u8 F_INC_ANY / F_EXC_ANY. */
BPF_HASH(f_ifaces, u32, u8, HDRLOG_FILTER_IFACES);

/* Does the packet pass the filters? (filter.h) */
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

/* ---- flows (flows.h) ---- */

/* Key: struct flow_key. Value: struct flow_value. Live while cfg.flow_slot == 0. */
BPF_HASH(flows0, struct flow_key, struct flow_value, HDRLOG_FLOW_ENTRIES);
/* Key: struct flow_key. Value: struct flow_value. Live while cfg.flow_slot == 1. */
BPF_HASH(flows1, struct flow_key, struct flow_value, HDRLOG_FLOW_ENTRIES);
/* Key: slot (u32, 0 or 1). Value: fd of flows0 / flows1, set by user space at start. */
BPF_ARRAY_OF_MAPS(flow_maps, "flows0", 2);

/* Add the packet to its flow in the live map. Returns 0 and sets *first when
 * it is among the first `first_n` packets of a flow that is new, or -1 when
 * the map is full (the caller falls back to the ring buffer). */
static __always_inline int flow_account(struct pkt_scratch *s, u32 segs, u32 slot, u32 first_n, int *first)
{
    struct pkt_record *r = &s->rec;
    const struct tunnel_ext *t = &s->tun.ext; /* valid when PARSE_TUNNEL (tunnel.h) */
    struct flow_key k = {};
    k.ifindex = r->ifindex;
    k.direction = r->direction;
    k.ip_version = r->ip_version;
    k.ip_proto = r->ip_proto;
    if ((r->parse_flags & PARSE_TUNNEL) && (t->tunnel_flags & TUN_DECAP)) { /* the inner flow (tunnel.h) */
        k.tunnel_type = t->tunnel_type;
        k.tunnel_id = t->tunnel_id;
    }
    __builtin_memcpy(k.src_ip, r->src_ip, 16);
    __builtin_memcpy(k.dst_ip, r->dst_ip, 16);
    k.src_port = r->src_port;
    k.dst_port = r->dst_port;
    if (r->ip_proto == IPPROTO_ICMP || r->ip_proto == IPPROTO_ICMPV6_) {
        k.src_port = r->icmp_type; /* as Zeek's conn.log: type and code in the ports, so */
        k.dst_port = r->icmp_code; /* echo, reply and each error are flows of their own */
    }
    u64 bytes = wire_frame_bytes(r, segs);

    void *live = flow_maps.lookup(&slot);
    if (!live)
        return -1;
    struct flow_value *v = bpf_map_lookup_elem(live, &k);
    u64 now;
    if (!v) {
        if (!r->mono_ns)
            r->mono_ns = bpf_ktime_get_ns(); /* a new flow starts at the precise clock */
        struct flow_value nv = {};
        nv.packets = segs;
        nv.bytes = bytes;
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
        now = r->mono_ns;
    } else {
        now = r->mono_ns ? r->mono_ns : tick_ns(s); /* counters and last-seen only */
    }
    u64 before = __sync_fetch_and_add(&v->packets, segs);
    __sync_fetch_and_add(&v->bytes, bytes);
    if (now > v->last_ns)
        v->last_ns = now;
    u32 tf = r->tcp_flags;
    if (tf & ~v->tcp_flags) /* a 64-bit OR over tcp_flags and flags (little-endian: tcp_flags low) */
        __sync_fetch_and_or((u64 *)&v->tcp_flags, (u64)tf);
    *first = before < first_n && !(v->flags & FLOW_CONTINUED);
    return 0;
}

/* ---- connections (conntrack.h) ---- */

/* Connections (conntrack.h), both directions in one entry; drained by collector/connections.py.
 * Key: struct conn_key (canonical ends + ifindex). Value: struct conn_value (with its spin lock). */
BPF_HASH(conns, struct conn_key, struct conn_value, HDRLOG_CONN_ENTRIES);
/* The connection map the program counts into: this program's `conns`, or the one a
 * predecessor counted into, handed over across a collector restart (collector/handover.py),
 * so open connections keep their entries (and their uid).
 * Key: 0 (u32). Value: fd of a map like `conns`, set by user space before the program runs. */
BPF_ARRAY_OF_MAPS(conn_maps, "conns", 1);
/* An all-zero value to insert new connections from (too big for the stack).
 * Key: 0 (u32). Value: struct conn_blank (never written). */
BPF_PERCPU_ARRAY(conn_blank, struct conn_blank, 1);

/* Count the record, `segs` frames (a GSO skb is many), into its connection: CONN_TRACKED
 * (sets *first when it is among the first `first_n` packets of the connection),
 * CONN_UNTRACKED or CONN_FULL. */
static __always_inline int conn_track(struct pkt_scratch *s, u32 segs, u32 first_n, int *first)
{
    struct pkt_record *r = &s->rec;
    const struct tunnel_ext *t = &s->tun.ext; /* valid when PARSE_TUNNEL (tunnel.h) */
    asm volatile("" ::: "memory"); /* read the record afresh: one verifier state for every parse path */
    struct conn_key k = {};
    int side = 0;
    if (!conn_key_of(r, t, &k, &side))
        return CONN_UNTRACKED;
    u32 zero = 0;
    void *cm = conn_maps.lookup(&zero);
    if (!cm)
        return CONN_FULL;
    struct conn_value *v = bpf_map_lookup_elem(cm, &k);
    if (!v) {
        struct conn_blank *b = conn_blank.lookup(&zero);
        if (!b)
            return CONN_FULL;
        bpf_map_update_elem(cm, &k, b, BPF_NOEXIST); /* -EEXIST: another CPU was first, fine */
        v = bpf_map_lookup_elem(cm, &k);
        if (!v)
            return CONN_FULL;
    }
    u64 before = 0;
    int letter = 0;
    if (conn_fast(v, r, side, segs, tick_ns(s), &before, &letter)) { /* counters only: no lock */
        if (letter) {
            bpf_spin_lock(&v->lock);
            hist_add(v, 'T', side & 1);
            bpf_spin_unlock(&v->lock);
        }
    } else {
        r->mono_ns = bpf_ktime_get_ns(); /* state, history or handshake times change: the precise clock */
        bpf_spin_lock(&v->lock);
        before = conn_update(v, r, t, side, segs);
        bpf_spin_unlock(&v->lock);
    }
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
    parse(skb, r, &s->tun, dir);
    if (!filter_pass(r, cf)) {
        c->n[CNT_FILTERED]++;
        return TC_ACT_UNSPEC;
    }
    u32 mode = cf->mode;
    /* The precise clock: now in MODE_PACKETS (every packet is a record), else only
     * when the packet needs it (conn_track's locked path, a new flow, a record);
     * packets that only move counters stamp last-seen with tick_ns(). */
    if (mode == MODE_PACKETS)
        r->mono_ns = bpf_ktime_get_ns();
    u32 n = cf->sample_n;
    u8 why = 0;
    int first = 0;
    if (mode != MODE_PACKETS) {
        u32 segs = skb->gso_segs ? skb->gso_segs : 1;
        int ct = mode == MODE_AUTO ? conn_track(s, segs, cf->first_packets, &first) : CONN_UNTRACKED;
        if (ct == CONN_TRACKED) {
            c->n[CNT_CONN_TRACKED]++;
        } else if (ct == CONN_FULL) {
            c->n[CNT_CONN_MAP_FULL]++;
            why = LOG_CONN_FALLBACK;
        } else {
            if (flow_account(s, segs, cf->flow_slot, mode == MODE_AUTO ? cf->first_packets : 0, &first) < 0) {
                c->n[CNT_FLOW_MAP_FULL]++;
                why = LOG_FLOW_FALLBACK;
            } else {
                c->n[CNT_FLOWED]++;
            }
        }
        if (mode == MODE_FLOWS && !why)
            return TC_ACT_UNSPEC;
    }
    if (mode != MODE_FLOWS)
        copy_candidate(skb, s); /* one call site: the verifier walks it once */
    if (mode == MODE_PACKETS) {
        if (n > 1) {
            if (!sample_hit(s, n)) {
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
        else if (n && sample_hit(s, n))
            why |= LOG_SAMPLED;
        else
            c->n[CNT_SAMPLED_OUT]++;
        if (!why)
            return TC_ACT_UNSPEC;
    }
    r->log_reason = why;
    if (!r->mono_ns)
        r->mono_ns = bpf_ktime_get_ns();
    if (emit(s) < 0) {
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
