/* In-kernel filters (included by hdrlog.c; filter_pass() is there, as it uses the maps).
 *
 * Logic
 * -----
 * The rules live in maps that user space rewrites while the program runs
 * (collector/filters.py): `f_addr` (LPM trie over IPv6 / IPv4-mapped addresses),
 * `f_ports` (one entry per port number), `f_ifaces` (per ifindex) and the
 * protocol and direction tables inside `cfg` (modes.h). Each entry holds
 * F_INC_* / F_EXC_* bits for the source side, the destination side and either
 * side. A dimension that has include rules (cfg.filter_flags) keeps only
 * packets that match one of them; an exclude rule that matches drops the
 * packet; dimensions are ANDed. User space ORs the bits of every covering
 * prefix into each trie entry, so the one longest-prefix lookup per address
 * answers for all rules. Rejected packets count as CNT_FILTERED and cost
 * nothing further.
 */
#ifndef HDRLOG_FILTER_H
#define HDRLOG_FILTER_H

#ifndef HDRLOG_FILTER_PREFIXES
#define HDRLOG_FILTER_PREFIXES 4096
#endif
#ifndef HDRLOG_FILTER_IFACES
#define HDRLOG_FILTER_IFACES 256
#endif

/* Filter bits, in f_addr / f_ports / f_ifaces values and cfg.proto / cfg.dir. */
#define F_INC_SRC (1 << 0)
#define F_EXC_SRC (1 << 1)
#define F_INC_DST (1 << 2)
#define F_EXC_DST (1 << 3)
#define F_INC_ANY (1 << 4) /* either side */
#define F_EXC_ANY (1 << 5)

/* cfg.filter_flags: which dimensions have rules at all (skip their lookups when
 * not) and which have include rules (then a packet must match one). */
#define FF_ADDR        (1 << 0)
#define FF_ADDR_INC_SRC (1 << 1)
#define FF_ADDR_INC_DST (1 << 2)
#define FF_ADDR_INC_ANY (1 << 3)
#define FF_PORT        (1 << 4)
#define FF_PORT_INC_SRC (1 << 5)
#define FF_PORT_INC_DST (1 << 6)
#define FF_PORT_INC_ANY (1 << 7)
#define FF_PROTO       (1 << 8)
#define FF_PROTO_INC   (1 << 9)
#define FF_IFACE       (1 << 10)
#define FF_IFACE_INC   (1 << 11)
#define FF_DIR         (1 << 12)
#define FF_DIR_INC     (1 << 13)

struct addr_key {        /* LPM trie key */
    __u32 prefixlen;     /* 0..128 over the IPv6 / IPv4-mapped address */
    __u8  addr[16];
};

/* One dimension: include rules present -> must match one; exclude match -> out. */
#define F_OK(bits, inc_present, inc_bit, exc_bit) \
    ((!(inc_present) || ((bits) & (inc_bit))) && !((bits) & (exc_bit)))

#endif /* HDRLOG_FILTER_H */
