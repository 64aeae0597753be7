/* Flow aggregation: per-interval, one-directional aggregates (included by hdrlog.c).
 *
 * Logic
 * -----
 * In MODE_FLOWS (and in MODE_AUTO for packets without a connection key),
 * flow_account() in hdrlog.c adds the packet to its flow: key (ifindex,
 * direction, IP version, protocol, addresses, ports (ICMP/ICMPv6: type and
 * code, as Zeek's conn.log has them); for a decapsulated packet,
 * tunnel.h, the inner ones plus the tunnel type and id), value packets, bytes,
 * first/last seen, OR of TCP flags. A GSO/GRO skb counts as the skb->gso_segs
 * frames it stands for (packets, and bytes with each frame's own headers). first_ns is the precise clock of the
 * flow's first packet; last_ns of later ones is hdrlog.c's tick_ns() (the
 * precise clock read once per jiffy per CPU: at most one tick, 1/CONFIG_HZ,
 * behind; max() keeps it from going back), so a flow's end_ts is exact to the
 * tick, as a connection's is (conntrack.h). Two hash maps, `flows0` and `flows1`:
 * cfg.flow_slot says which one is live. Every flow interval user space flips
 * the slot, waits a grace period for programs still using the old map, and
 * drains the old map whole with one batch lookup-and-delete
 * (collector/flows.py). So every flow row covers at most one interval (active
 * timeout = idle timeout = the interval) and nothing is read while it is being
 * written. The maps are plain hashes on purpose: an LRU map would evict a live
 * flow's counts silently when full; a full hash refuses the insert, and the
 * packet goes to the ring buffer instead with LOG_FLOW_FALLBACK
 * (CNT_FLOW_MAP_FULL), where user space adds it to the flows it builds from
 * such records. A flow that already had an entry in the other map (it was
 * alive in the last interval) is marked FLOW_CONTINUED, so its "first packets"
 * are not logged again.
 */
#ifndef HDRLOG_FLOWS_H
#define HDRLOG_FLOWS_H

#ifndef HDRLOG_FLOW_ENTRIES
#define HDRLOG_FLOW_ENTRIES 65536
#endif

/* flow_value.flags */
#define FLOW_CONTINUED (1 << 0) /* the flow had an entry in the other map: not new */

struct flow_key {
    __u32 ifindex;
    __u8  direction;
    __u8  ip_version;
    __u8  ip_proto;
    __u8  tunnel_type;   /* TUNNEL_* of a decapsulated packet (the key is the inner flow's), else 0 */
    __u8  src_ip[16];    /* as in pkt_record */
    __u8  dst_ip[16];
    __u16 src_port;
    __u16 dst_port;
    __u32 tunnel_id;     /* its VNI / GRE key: tenants reuse addresses */
};                       /* 48 bytes */

struct flow_value {
    __u64 packets;
    __u64 bytes;         /* frame bytes (wire_len; a GSO skb with every frame's headers) */
    __u64 first_ns;      /* CLOCK_MONOTONIC */
    __u64 last_ns;
    __u32 tcp_flags;     /* OR of pkt_record.tcp_flags */
    __u32 flags;         /* FLOW_* */
};                       /* 40 bytes */

/* The frame bytes of a record's `segs` frames on the wire. A GSO skb (TCP
 * builds them on egress before TC; GRO merges them on ingress) is `segs`
 * frames: its wire_len covers all the payload and one set of headers, and
 * every further frame carries its own L2-L4 headers (l4_payload_off bytes). */
static __always_inline u64 wire_frame_bytes(const struct pkt_record *r, u32 segs)
{
    u64 b = r->wire_len;
    u32 hdrs = r->l4_payload_off;
    if (segs > 1 && hdrs)
        b += (u64)(segs - 1) * hdrs;
    return b;
}

#endif /* HDRLOG_FLOWS_H */
