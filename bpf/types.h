/* Records and constants shared by hdrlog.c and user space.
 *
 * Mirrored in Python by collector/records.py (RECORD_DTYPE, PARSE_*, COUNTER_NAMES;
 * tests/test_capture_records.py checks every constant shared with Python):
 * change both together. The record is fixed-size, naturally aligned and has no
 * padding holes, so a numpy structured dtype reads a run of them at once.
 * Multi-byte numbers are host order (little-endian on the machines we target);
 * addresses and MACs are network order, as on the wire.
 */
#ifndef HDRLOG_TYPES_H
#define HDRLOG_TYPES_H

/* Ring buffer size in pages (a power of two). */
#ifndef HDRLOG_RINGBUF_PAGES
#define HDRLOG_RINGBUF_PAGES 2048
#endif

/* Bytes of L4 payload copied after a record, at most (0 = no copy). A multiple
 * of HDRLOG_PAYLOAD_CHUNK. Only candidate payloads are copied (see hdrlog.c).
 * 2048 holds a whole full-sized segment (a browser's post-quantum ClientHello is
 * ~1,800 bytes: one 1,448-byte segment, the rest in the next, which is copied too). */
#ifndef HDRLOG_PAYLOAD_BYTES
#define HDRLOG_PAYLOAD_BYTES 2048
#endif
#ifndef HDRLOG_PAYLOAD_CHUNK
#define HDRLOG_PAYLOAD_CHUNK 128
#endif

/* Direction of a record. */
#define DIR_INGRESS 1
#define DIR_EGRESS 2

/* parse_flags bits: what the parser noticed. A set TRUNC bit means the header
 * named was cut short; every field that could still be read is filled. */
#define PARSE_TRUNC_L2        (1 << 0)  /* Ethernet header or a VLAN tag cut short */
#define PARSE_TRUNC_L3        (1 << 1)  /* IPv4/IPv6 header or an IPv6 extension header cut short */
#define PARSE_TRUNC_L4        (1 << 2)  /* TCP/UDP/ICMP header (or TCP options) cut short */
#define PARSE_BAD_IHL         (1 << 3)  /* IPv4 IHL < 5: L4 not parsed */
#define PARSE_EXTHDR_LIMIT    (1 << 4)  /* more IPv6 extension headers than HDRLOG_MAX_EXTHDR */
#define PARSE_VLAN_LIMIT      (1 << 5)  /* more VLAN tags than the parser walks */
#define PARSE_BAD_TCP_DOFF    (1 << 6)  /* TCP data offset < 5: options not parsed */
#define PARSE_BAD_TCP_OPT     (1 << 7)  /* malformed TCP option list, or more options than walked */
#define PARSE_VLAN_ACCEL      (1 << 8)  /* outer VLAN tag was in skb metadata, not in the frame */
#define PARSE_NONFIRST_FRAG   (1 << 9)  /* non-first fragment: no L4 header to parse */
#define PARSE_TCP_WSCALE      (1 << 10) /* window-scale option present (so tcp_wscale 0 is real) */
#define PARSE_BAD_IP_VERSION  (1 << 11) /* version nibble disagrees with the EtherType */
#define PARSE_GSO             (1 << 12) /* GSO/GRO super-packet: wire_len covers several frames */
#define PARSE_PAYLOAD_CUT     (1 << 13) /* payload copy shorter than the candidate payload (cap or load error) */
#define PARSE_TUNNEL          (1 << 14) /* a tunnel header was found: a struct tunnel_ext follows (tunnel.h) */

/* Counter indexes of the per-CPU `counters` map. */
#define CNT_SEEN         0 /* packets the program ran on */
#define CNT_LOGGED       1 /* records submitted to the ring buffer */
#define CNT_RINGBUF_FULL 2 /* records dropped: ring buffer full (raise ringbuf_bytes) */
#define CNT_TRUNCATED    3 /* records with a PARSE_TRUNC_* bit (informational) */
#define CNT_PAYLOAD      4 /* records carrying payload bytes (app-layer candidates) */
#define CNT_FILTERED     5 /* packets rejected by the filters (in no flow either) */
#define CNT_SAMPLED_OUT  6 /* packets not sent as records by sampling (still in flows in auto mode) */
#define CNT_FLOWED       7 /* packets added to a flow in the flow map */
#define CNT_FLOW_MAP_FULL 8 /* packets that found the flow map full: sent as records instead */
#define CNT_CONN_TRACKED 9 /* packets counted into a connection (conntrack.h) */
#define CNT_CONN_MAP_FULL 10 /* packets that found the connection map full: sent as records instead */
#define CNT_MAX          11

/* Value of the per-CPU `counters` map (one entry). */
struct counters {
    __u64 n[CNT_MAX];
};

/* One record per packet: a fixed 120-byte header, then payload_len bytes of the
 * L4 payload (0 for most packets), then, with PARSE_TUNNEL only, a struct
 * tunnel_ext (40 bytes; bpf/tunnel.h). Ring-buffer entries are therefore of variable
 * size; user space reads the fixed part in bulk and the tail (payload, extension) apart.
 * For a decapsulated packet (TUN_DECAP) the L3/L4 fields are the inner packet's.
 * App-layer fields (DNS, HTTP, TLS) are decoded from the tail in user space. */
struct pkt_record {
    __u64 mono_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u32 ifindex;        /* skb->ifindex */
    __u32 wire_len;       /* skb->len, + 4 when a VLAN tag was moved into skb metadata */
    __u8  src_ip[16];     /* IPv6, or IPv4-mapped ::ffff:a.b.c.d; network order */
    __u8  dst_ip[16];
    __u8  eth_src[6];     /* network order */
    __u8  eth_dst[6];
    __u16 vlan_id;        /* outermost VLAN id, 0 = untagged (vlan_inner_id: the innermost) */
    __u16 eth_type;       /* EtherType after all VLAN tags */
    __u32 ip_id;          /* IPv4 id or IPv6 fragment-header id */
    __u32 flow_label;     /* IPv6 */
    __u32 tcp_seq;
    __u32 tcp_ack;
    __u16 frag_offset;    /* 8-byte units */
    __u16 src_port;
    __u16 dst_port;
    __u16 tcp_flags;      /* bit 0 FIN .. bit 7 CWR, bit 8 AE */
    __u16 tcp_window;
    __u16 tcp_mss;
    __u16 udp_len;
    __u16 l4_payload_off; /* offset of the L4 payload from the frame start, 0 = none */
    __u16 l4_payload_len; /* bytes of L4 payload in the skb (not only the copied part) */
    __u16 parse_flags;    /* PARSE_* */
    __u8  direction;      /* DIR_* */
    __u8  ip_version;     /* 4, 6, 0 = not IP */
    __u8  ip_proto;       /* IPv4 protocol / last IPv6 next header */
    __u8  ttl;            /* IPv4 TTL / IPv6 hop limit */
    __u8  dscp;
    __u8  ecn;
    __u8  more_fragments;
    __u8  dont_fragment;
    __u8  tcp_wscale;
    __u8  icmp_type;
    __u8  icmp_code;
    __u8  log_reason;     /* LOG_* (modes.h): why this record was sent */
    __u16 payload_len;    /* bytes of L4 payload that follow this header */
    __u16 ip_len;         /* IP total length (IPv6: 40 + payload length), as the header says */
    __u16 l4_len;         /* bytes from the L4 header to the IP end, as the header says */
    __u16 vlan_inner_id;  /* innermost VLAN id when there are two or more tags, else 0 */
};

/* tunnel_ext.tunnel_type (bpf/tunnel.h). */
#define TUNNEL_VXLAN  1
#define TUNNEL_GENEVE 2
#define TUNNEL_GRE    3
#define TUNNEL_IPIP   4 /* IPv4 or IPv6 in IPv4 or IPv6 (protocols 4 and 41) */

/* tunnel_ext.tunnel_flags bits. */
#define TUN_DECAP  (1 << 0) /* the record's L3/L4 fields are the inner packet's */
#define TUN_CUT    (1 << 1) /* the tunnel header or the inner headers before IP were cut short */
#define TUN_BAD    (1 << 2) /* malformed: VXLAN I flag clear, Geneve version, inner IP version */
#define TUN_OTHER  (1 << 3) /* carries something not decoded: non-IP inner frame, GRE routing/v1, ... */
#define TUN_NESTED (1 << 4) /* the inner packet is a tunnel candidate itself: not opened (one level) */

/* The tunnel extension: 40 bytes after the record's payload bytes, on records with
 * PARSE_TUNNEL only (so a record is 120 + payload_len + 40 bytes then). */
struct tunnel_ext {
    __u8  tunnel_type;     /* TUNNEL_* */
    __u8  tunnel_flags;    /* TUN_* */
    __u16 tunnel_vlan_id;  /* VLAN id of the encapsulated Ethernet frame (its first tag), 0 = none */
    __u32 tunnel_id;       /* VXLAN / Geneve VNI, GRE key; 0 = none */
    __u8  outer_src_ip[16]; /* the outer IP header's addresses, as pkt_record's */
    __u8  outer_dst_ip[16];
};                         /* 40 bytes */

#endif /* HDRLOG_TYPES_H */
