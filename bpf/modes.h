/* Logging modes: which packets become records, and the runtime configuration (included by hdrlog.c).
 *
 * Logic
 * -----
 * MODE_PACKETS logs every packet that passes the filters (or a 1:N sample,
 * LOG_SAMPLED, when cfg.sample_n > 1); MODE_FLOWS logs none (the flow maps
 * count them, flows.h; only map-full fallbacks become records); MODE_AUTO
 * counts every packet into its connection (conntrack.h; packets without a
 * connection key into the flow maps) and logs notable packets -- the first
 * cfg.first_packets of a connection or flow, TCP SYN/FIN/RST, DNS ports, ICMP,
 * app-layer candidates (payload copied, payload.h) -- and a 1:N sample of the
 * rest (cfg.sample_n, 0 = none; the draw is payload.h's sample_hit(), a per-CPU
 * generator). Packets not logged count as CNT_SAMPLED_OUT.
 * The record's log_reason says why it was logged, so user space can set
 * sample_rate: N for LOG_SAMPLED only, else 1.
 *
 * Everything here is configuration in the `cfg` map, so mode, sampling, first-N
 * and filters change while running without reloading the program.
 */
#ifndef HDRLOG_MODES_H
#define HDRLOG_MODES_H

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

#endif /* HDRLOG_MODES_H */
