// SPDX-License-Identifier: GPL-2.0
/*
 * Cube sandbox egress filter: one object for all sandboxes (ARCHITECTURE.md §6).
 *
 * sandbox_egress: tc ingress (clsact, direct-action) of the HOST end of a sandbox's veth, i.e.
 * every frame the sandbox sends. sandbox_ingress: tc egress of the same device, i.e. every
 * frame sent towards the sandbox. Sandboxes are told apart by ifindex (map `sandboxes`); an
 * interface that is not registered drops everything (fail closed). Only uapi headers are used.
 *
 * Verdict of a new IPv4 flow, in order:
 *   1. to the slot's own host address: passed to the host, whose firewall admits only replies
 *      (and Cube's resolver);
 *   2. the destination's most specific `blocked` entry is BLOCK_ALWAYS -> deny, unless the
 *      matching allow rule is Cube's own (RULE_F_SYSTEM: the resolver). A sandbox's allow rule,
 *      static or DNS-learned, never opens such a range;
 *   3. an unexpired allow rule of the sandbox matches        -> allow   (allow beats deny)
 *   4. a deny rule of the sandbox matches                     -> deny
 *   5. the destination is in a range the operator opened (BLOCK_OPENABLE) -> deny
 *   6. the sandbox's default (SBX_F_DEFAULT_ALLOW or not).
 * Rules live in two LPM tries keyed by (sandbox, proto, port, prefix) and are looked up as
 * (proto, port) -> (proto, any port) -> (any proto, any port). Allow rules may expire
 * (CLOCK_BOOTTIME ns): that is how DNS-learned addresses follow their TTL.
 * Allowed flows go into an LRU table; packets of known flows skip the rules while the flow's
 * policy generation equals the sandbox's (`sbx_info.gen`, bumped by every policy change) and
 * the allow rule it was admitted by has not expired (DNS TTL). Otherwise the packet is decided
 * again: a flow the rules still allow is refreshed, one they deny is revoked (deleted, the
 * packet rejected, reason R_REVOKED). TCP is decided on the sandbox's packets (a reply still
 * gets in, and the guest's ACK of it is answered with a RST); UDP in both directions. New flows and denied attempts (at most 1/s per 5-tuple)
 * are reported through a ring buffer. Denied TCP is answered with a RST, other denied IPv4
 * with ICMP "administratively prohibited", so the sandbox fails fast instead of hanging.
 *
 * IPv6. The slot namespace has no IPv6 stack; slot_ipv6_relay (tc ingress of tap0 and of vg0
 * inside it, IPv6 frames only) hands the guest's IPv6 frames unchanged to the host end, where
 * sandbox_egress decides, and hands its answers back to tap0. An IPv6 frame is passed only if
 * the sandbox has IPv6 allow rules (SBX_F_ALLOW_IPV6) and decide6() allows its destination:
 * always-denied (blocked6) first, then the sandbox's IPv6 allow rules, then its IPv6 deny rules,
 * else denied. With SBX_F_REJECT a guest that configured IPv6 itself fails at once:
 *   - a Neighbor Solicitation (any target; not duplicate address detection, source ::) gets a
 *     Neighbor Advertisement whose link-layer address is the guest's gateway MAC (tap0's, from
 *     `sandboxes`), so the guest sends its packets instead of waiting ~3 s for neighbour
 *     discovery to time out;
 *   - any other packet to a unicast address from a unicast source is answered: TCP with a RST
 *     (connect() fails with ECONNREFUSED), the rest with ICMPv6 destination unreachable /
 *     administratively prohibited quoting its start (a connected UDP socket gets EACCES);
 *     packets to wider-than-link multicast are dropped;
 *   - the link's own plumbing (other neighbour discovery, MLD, ICMPv6 errors, link-local
 *     multicast) is dropped without an answer or an audit event.
 * Denied IPv6 packets are reported (reason R_NOT_IPV4, with next header and ports).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/icmpv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define NSEC_PER_SEC 1000000000ULL
#define ICMP_DEST_UNREACH 3
#define ICMP_PKT_FILTERED 13
#define ND_NEIGHBOR_SOLICIT 135 /* RFC 4861 (the kernel's ndisc.h is not uapi) */
#define ND_NEIGHBOR_ADVERT 136
#define ND_OPT_TARGET_LL_ADDR 2
#define ND_NA_FLAGS 0xe0000000 /* router, solicited, override */
struct icmphdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u32 unused;
};

enum verdict { V_DENY = 0, V_ALLOW = 1 };
enum reason {
	R_RULE = 0,       /* allowed by an allow rule */
	R_FLOW = 1,       /* packet of a known flow (not reported) */
	R_NO_RULE = 2,    /* default deny */
	R_EXPIRED = 3,    /* only an expired (DNS TTL) allow rule matched */
	R_UNKNOWN_IF = 4, /* interface not registered */
	R_NOT_IPV4 = 5,   /* IPv6 / other ethertype */
	R_MALFORMED = 6,
	R_INBOUND = 7,    /* unsolicited packet towards the sandbox */
	R_DENY_RULE = 8,  /* a deny rule matched */
	R_BLOCKED = 9,    /* always-denied range */
	R_DEFAULT = 10,   /* default allow */
	R_REVOKED = 11,   /* an established flow the current policy denies */
};

enum stat_idx { S_ALLOW_PKTS = 0, S_DENY_PKTS, S_EVENTS_LOST, S_REJECTS, S_ND_ANSWERS, S_MAX = 8 };

#define SBX_F_REJECT 1        /* answer denied TCP with RST, other denied IP with ICMP(v6) */
#define SBX_F_DEFAULT_ALLOW 2 /* default verdict of new flows */
#define SBX_F_ALLOW_IPV6 4    /* pass IPv6 frames */
#define REJECT_MARK 0x5b0c1d
#define RULE_F_SYSTEM 1       /* Cube's own allow rule (the resolver): may reach BLOCK_ALWAYS */
#define BLOCK_ALWAYS 1        /* `blocked` value: no sandbox rule opens it */
#define BLOCK_OPENABLE 2      /* `blocked` value: denied unless a sandbox's allow rule names it */

struct sbx_info {
	__u32 sbx_id;
	__u32 flags;
	__u32 host_addr; /* network order: the slot's host-side veth address */
	__u32 gen;       /* policy generation: flows admitted under another one are decided again */
	__u8 gw_mac[ETH_ALEN]; /* the guest's gateway (tap0) MAC: source of answers to IPv6 */
	__u16 pad2;
};

struct rule_key {
	__u32 prefixlen; /* 64 + CIDR length */
	__u32 sbx_id;
	__u8 proto;      /* 0 = any */
	__u8 pad;
	__u16 dport;     /* network order, 0 = any */
	__u32 daddr;     /* network order */
};

struct rule_val {
	__u64 expires_ns; /* CLOCK_BOOTTIME, 0 = never */
	__u32 rule_id;
	__u32 flags;
};

struct block_key {
	__u32 prefixlen;
	__u32 daddr;
};

struct rule6_key {
	__u32 prefixlen; /* 64 + CIDR length */
	__u32 sbx_id;
	__u8 proto;      /* 0 = any */
	__u8 pad;
	__u16 dport;     /* network order, 0 = any */
	__u8 daddr[16];
};

struct block6_key {
	__u32 prefixlen;
	__u8 daddr[16];
};

struct flow_key {
	__u32 sbx_id;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct flow_val {
	__u64 last_seen_ns;
	__u64 expires_ns; /* of the allow rule that admitted the flow (CLOCK_BOOTTIME), 0 = never */
	__u32 rule_id;
	__u32 gen;        /* sbx_info.gen when the flow was (last) decided */
};

struct decision {
	__u64 expires_ns;
	__u32 rule_id;
	__u8 reason;
};

struct event {
	__u64 ts_ns;
	__u32 sbx_id;
	__u32 ifindex;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 verdict;
	__u8 reason;
	__u8 tcp_flags;
	__u32 rule_id;
	__u16 ethertype;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); /* ifindex of the host-side veth */
	__type(value, struct sbx_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sandboxes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__type(key, struct rule_key);
	__type(value, struct rule_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} allow_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__type(key, struct rule_key);
	__type(value, struct rule_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} deny_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__type(key, struct block_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blocked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct rule6_key);
	__type(value, struct rule_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} allow6_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct rule6_key);
	__type(value, struct rule_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} deny6_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__type(key, struct block6_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blocked6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072); /* preallocated: ~10 MiB */
	__type(key, struct flow_key);
	__type(value, struct flow_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, __u64);
} deny_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, S_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline void emit(struct __sk_buff *skb, const struct flow_key *fk,
				 __u8 verdict, __u8 reason, __u8 tcp_flags,
				 __u32 rule_id, __u16 ethertype, __u64 now)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		stat_inc(S_EVENTS_LOST);
		return;
	}
	e->ts_ns = now;
	e->sbx_id = fk->sbx_id;
	e->ifindex = skb->ifindex;
	e->saddr = fk->saddr;
	e->daddr = fk->daddr;
	e->sport = fk->sport;
	e->dport = fk->dport;
	e->proto = fk->proto;
	e->verdict = verdict;
	e->reason = reason;
	e->tcp_flags = tcp_flags;
	e->rule_id = rule_id;
	e->ethertype = ethertype;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
}

/* report a denied attempt at most once per second per 5-tuple */
static __always_inline void emit_deny_rule(struct __sk_buff *skb, const struct flow_key *fk,
					   __u8 reason, __u8 tcp_flags, __u32 rule_id,
					   __u16 ethertype, __u64 now)
{
	__u64 *last = bpf_map_lookup_elem(&deny_seen, fk);
	if (last && now - *last < NSEC_PER_SEC)
		return;
	bpf_map_update_elem(&deny_seen, fk, &now, BPF_ANY);
	emit(skb, fk, V_DENY, reason, tcp_flags, rule_id, ethertype, now);
}

static __always_inline void emit_deny(struct __sk_buff *skb, const struct flow_key *fk,
				      __u8 reason, __u8 tcp_flags, __u16 ethertype, __u64 now)
{
	emit_deny_rule(skb, fk, reason, tcp_flags, 0, ethertype, now);
}

/* the most specific unexpired rule of `map` matching (proto, port) -> (proto, any port) ->
 * (any proto, any port), or NULL; *expired set if an expired one matched on the way */
static __always_inline struct rule_val *lookup3(void *map, __u32 sbx, __u8 proto, __u16 dport,
						__u32 daddr, __u64 now, int *expired)
{
	struct rule_key k = {};
	struct rule_val *v;

	k.prefixlen = 96;
	k.sbx_id = sbx;
	k.daddr = daddr;

	k.proto = proto;
	k.dport = dport;
	v = bpf_map_lookup_elem(map, &k);
	if (v) {
		if (!v->expires_ns || v->expires_ns > now)
			return v;
		*expired = 1;
	}
	if (dport) {
		k.dport = 0;
		v = bpf_map_lookup_elem(map, &k);
		if (v) {
			if (!v->expires_ns || v->expires_ns > now)
				return v;
			*expired = 1;
		}
	}
	if (proto) {
		k.proto = 0;
		k.dport = 0;
		v = bpf_map_lookup_elem(map, &k);
		if (v) {
			if (!v->expires_ns || v->expires_ns > now)
				return v;
			*expired = 1;
		}
	}
	return NULL;
}

/* V_ALLOW / V_DENY with the reason, rule and (for an allow) the rule's expiry. R_EXPIRED is a
 * deny where only an expired DNS-learned allow rule matched: the guest used an address past
 * its TTL. */
static __always_inline int decide(__u32 sbx, __u32 sbx_flags, __u8 proto, __u16 dport,
				  __u32 daddr, __u64 now, struct decision *d)
{
	int expired = 0;
	struct block_key bk = { .prefixlen = 32, .daddr = daddr };
	__u32 *blk = bpf_map_lookup_elem(&blocked, &bk);
	int always = blk && *blk == BLOCK_ALWAYS;
	struct rule_val *rv;

	d->rule_id = 0;
	d->expires_ns = 0;
	rv = lookup3(&allow_rules, sbx, proto, dport, daddr, now, &expired);
	if (rv && (!always || (rv->flags & RULE_F_SYSTEM))) {
		d->rule_id = rv->rule_id;
		d->expires_ns = rv->expires_ns;
		d->reason = R_RULE;
		return V_ALLOW;
	}
	rv = lookup3(&deny_rules, sbx, proto, dport, daddr, now, &expired);
	if (rv) {
		d->rule_id = rv->rule_id;
		d->reason = R_DENY_RULE;
	} else if (blk) {
		d->reason = R_BLOCKED;
	} else if (sbx_flags & SBX_F_DEFAULT_ALLOW) {
		d->reason = R_DEFAULT;
		return V_ALLOW;
	} else {
		d->reason = R_NO_RULE;
	}
	if (expired && !always)
		d->reason = R_EXPIRED;
	return V_DENY;
}

/* A packet of a known flow: still allowed? (decided again after a policy change or once the
 * rule that admitted it expired; a flow now denied is deleted) */
static __always_inline int flow_still_allowed(struct flow_val *fv, const struct flow_key *fk,
					      const struct sbx_info *sbx, __u64 now,
					      struct decision *d)
{
	if (fv->gen == sbx->gen && (!fv->expires_ns || fv->expires_ns > now)) {
		if (now - fv->last_seen_ns > NSEC_PER_SEC)
			fv->last_seen_ns = now;
		return 1;
	}
	if (decide(fk->sbx_id, sbx->flags, fk->proto, fk->dport, fk->daddr, now, d) == V_ALLOW) {
		fv->gen = sbx->gen;
		fv->expires_ns = d->expires_ns;
		fv->rule_id = d->rule_id;
		fv->last_seen_ns = now;
		return 1;
	}
	bpf_map_delete_elem(&flows, fk);
	return 0;
}

static __always_inline struct rule_val *lookup3_6(void *map, __u32 sbx, __u8 proto, __u16 dport,
						  const struct in6_addr *daddr)
{
	struct rule6_key k = {};
	struct rule_val *v;

	k.prefixlen = 64 + 128;
	k.sbx_id = sbx;
	__builtin_memcpy(k.daddr, daddr, 16);
	k.proto = proto;
	k.dport = dport;
	v = bpf_map_lookup_elem(map, &k);
	if (v)
		return v;
	if (dport) {
		k.dport = 0;
		v = bpf_map_lookup_elem(map, &k);
		if (v)
			return v;
	}
	if (proto) {
		k.proto = 0;
		k.dport = 0;
		v = bpf_map_lookup_elem(map, &k);
	}
	return v;
}

/* IPv6: always-denied (blocked6) -> allow rule -> deny rule -> openable range -> deny. There is
 * no default allow: slots have no IPv6 datapath, so IPv6 goes only where an allow rule says. */
static __always_inline int decide6(__u32 sbx, __u8 proto, __u16 dport,
				   const struct in6_addr *daddr, struct decision *d)
{
	struct block6_key bk = { .prefixlen = 128 };
	struct rule_val *rv;

	__builtin_memcpy(bk.daddr, daddr, 16);
	__u32 *blk = bpf_map_lookup_elem(&blocked6, &bk);
	d->rule_id = 0;
	d->expires_ns = 0;
	rv = lookup3_6(&allow6_rules, sbx, proto, dport, daddr);
	if (rv && !(blk && *blk == BLOCK_ALWAYS)) {
		d->rule_id = rv->rule_id;
		d->reason = R_RULE;
		return V_ALLOW;
	}
	rv = lookup3_6(&deny6_rules, sbx, proto, dport, daddr);
	if (rv) {
		d->rule_id = rv->rule_id;
		d->reason = R_DENY_RULE;
	} else if (blk) {
		d->reason = R_BLOCKED;
	} else {
		d->reason = R_NOT_IPV4;
	}
	return V_DENY;
}

static __always_inline __u16 csum_fold(__s64 c)
{
	__u32 s = (__u32)c;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

struct icmp_reject {
	struct iphdr ip;
	struct icmphdr icmp;
	__u8 inner[40]; /* original IPv4 header (no options) + 20 bytes of L4 */
} __attribute__((packed, aligned(4)));

/*
 * Turn the denied packet into ICMP dest-unreachable / admin-prohibited and send it back out of
 * the same interface (towards the sandbox). The kernel refuses to trim a CHECKSUM_PARTIAL skb
 * below its L4 checksum field, so 40 bytes (IP + 20 bytes of L4) are quoted.
 */
static __always_inline int reflect_reject(struct __sk_buff *skb)
{
	struct ethhdr eth, neweth;
	struct icmp_reject r = {};

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r.inner), 0))
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, r.inner, sizeof(r.inner)))
		return TC_ACT_SHOT;
	if (bpf_skb_adjust_room(skb, sizeof(struct iphdr) + sizeof(struct icmphdr),
				BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;

	struct iphdr *orig = (struct iphdr *)r.inner;
	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tos = 0xc0;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.saddr = orig->daddr;
	r.ip.daddr = orig->saddr;
	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_PKT_FILTERED;
	r.icmp.checksum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.icmp,
					      sizeof(r.icmp) + sizeof(r.inner), 0));
	r.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0));
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0))
		return TC_ACT_SHOT;

	__builtin_memcpy(neweth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(neweth.h_source, eth.h_dest, ETH_ALEN);
	neweth.h_proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_store_bytes(skb, 0, &neweth, sizeof(neweth), 0))
		return TC_ACT_SHOT;
	stat_inc(S_REJECTS);
	skb->mark = REJECT_MARK; /* lets sandbox_ingress pass it */
	return bpf_redirect(skb->ifindex, 0);
}

struct pseudo_tcp {
	__u32 saddr;
	__u32 daddr;
	__u8 zero;
	__u8 proto;
	__u16 len;
	struct tcphdr th;
} __attribute__((packed, aligned(4)));

/* Answer a denied TCP segment with a RST (RFC 793 reset generation), back out of the device. */
static __always_inline int reflect_rst(struct __sk_buff *skb)
{
	struct ethhdr eth, neweth;
	struct iphdr ip;
	struct tcphdr th;
	struct pseudo_tcp p = {};

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip), &th, sizeof(th)))
		return TC_ACT_SHOT;

	__u32 seg_len = bpf_ntohs(ip.tot_len) - sizeof(ip) - th.doff * 4;
	seg_len += th.syn + th.fin;

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(ip) + sizeof(th), 0))
		return TC_ACT_SHOT;

	p.saddr = ip.daddr;
	p.daddr = ip.saddr;
	p.proto = IPPROTO_TCP;
	p.len = bpf_htons(sizeof(th));
	p.th.source = th.dest;
	p.th.dest = th.source;
	p.th.doff = 5;
	p.th.rst = 1;
	if (th.ack) {
		p.th.seq = th.ack_seq;
	} else {
		p.th.ack = 1;
		p.th.ack_seq = bpf_htonl(bpf_ntohl(th.seq) + seg_len);
	}
	p.th.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&p, sizeof(p), 0));

	ip.tot_len = bpf_htons(sizeof(ip) + sizeof(th));
	ip.daddr = p.daddr;
	ip.saddr = p.saddr;
	ip.ihl = 5;
	ip.ttl = 64;
	ip.id = 0;
	ip.frag_off = bpf_htons(0x4000);
	ip.tos = 0;
	ip.check = 0;
	ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0));

	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &p.th, sizeof(p.th), 0))
		return TC_ACT_SHOT;
	__builtin_memcpy(neweth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(neweth.h_source, eth.h_dest, ETH_ALEN);
	neweth.h_proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_store_bytes(skb, 0, &neweth, sizeof(neweth), 0))
		return TC_ACT_SHOT;
	stat_inc(S_REJECTS);
	skb->mark = REJECT_MARK;
	return bpf_redirect(skb->ifindex, 0);
}

/* -- IPv6 (only ever answered, never passed without SBX_F_ALLOW_IPV6) ----------------------- */

struct ip6_pseudo {
	struct in6_addr saddr;
	struct in6_addr daddr;
	__be32 len;
	__be32 nexthdr; /* three zero bytes and the next header */
};

struct nd_ns {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u32 reserved;
	struct in6_addr target;
};

struct nd_na {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__be32 flags;
	struct in6_addr target;
	__u8 opt_type; /* target link-layer address option (RFC 4861 4.6.1) */
	__u8 opt_len;  /* in units of 8 bytes */
	__u8 opt_mac[ETH_ALEN];
};

struct nd_reply {
	struct ipv6hdr ip6;
	struct nd_na na;
};

#define V6_QUOTE 60 /* IPv6 header + 20 bytes of L4: keeps a TCP checksum field (see reflect_reject) */

struct icmp6_reject {
	struct ipv6hdr ip6;
	struct icmp6hdr icmp6;
	__u8 inner[V6_QUOTE];
};

static __always_inline int in6_is_unspecified(const struct in6_addr *a)
{
	return !(a->in6_u.u6_addr32[0] | a->in6_u.u6_addr32[1] | a->in6_u.u6_addr32[2] |
		 a->in6_u.u6_addr32[3]);
}

static __always_inline int in6_equal(const struct in6_addr *a, const struct in6_addr *b)
{
	return a->in6_u.u6_addr32[0] == b->in6_u.u6_addr32[0] &&
	       a->in6_u.u6_addr32[1] == b->in6_u.u6_addr32[1] &&
	       a->in6_u.u6_addr32[2] == b->in6_u.u6_addr32[2] &&
	       a->in6_u.u6_addr32[3] == b->in6_u.u6_addr32[3];
}

/* upper-layer checksum over IPv6: the pseudo-header (RFC 8200 8.1), then the message itself */
static __always_inline __u16 csum6(const struct ipv6hdr *ip6, void *msg, __u32 msg_len)
{
	struct ip6_pseudo ph = {};

	ph.saddr = ip6->saddr;
	ph.daddr = ip6->daddr;
	ph.len = bpf_htonl(msg_len);
	ph.nexthdr = bpf_htonl(ip6->nexthdr);
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	return csum_fold(bpf_csum_diff(0, 0, msg, msg_len, (__u32)sum));
}

static __always_inline int reflect_out(struct __sk_buff *skb, const struct ethhdr *orig,
				       const __u8 *gw_mac, __u16 proto)
{
	struct ethhdr neweth;

	__builtin_memcpy(neweth.h_dest, orig->h_source, ETH_ALEN);
	__builtin_memcpy(neweth.h_source, gw_mac, ETH_ALEN);
	neweth.h_proto = bpf_htons(proto);
	if (bpf_skb_store_bytes(skb, 0, &neweth, sizeof(neweth), 0))
		return TC_ACT_SHOT;
	skb->mark = REJECT_MARK; /* lets sandbox_ingress pass it */
	return bpf_redirect(skb->ifindex, 0);
}

/*
 * Answer a Neighbor Solicitation for any target with a Neighbor Advertisement carrying the
 * gateway's MAC (RFC 4861 7.2.4): whatever address the guest uses as its IPv6 gateway, or as
 * an on-link peer, resolves to tap0, so its packets come here and are refused at once. NS
 * that are not valid (7.1.1) and duplicate address detection (source ::) are dropped.
 */
static __always_inline int answer_ns(struct __sk_buff *skb, const struct ipv6hdr *ip6,
				     const __u8 *gw_mac)
{
	struct ethhdr eth;
	struct nd_ns ns;
	struct nd_reply r = {};

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(*ip6), &ns, sizeof(ns)))
		return TC_ACT_SHOT;
	if (ip6->hop_limit != 255 || ns.code != 0 || bpf_ntohs(ip6->payload_len) < sizeof(ns) ||
	    in6_is_unspecified(&ip6->saddr) || ip6->saddr.in6_u.u6_addr8[0] == 0xff ||
	    ns.target.in6_u.u6_addr8[0] == 0xff || in6_equal(&ns.target, &ip6->saddr))
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r), 0))
		return TC_ACT_SHOT;

	r.ip6.version = 6;
	r.ip6.payload_len = bpf_htons(sizeof(r.na));
	r.ip6.nexthdr = IPPROTO_ICMPV6;
	r.ip6.hop_limit = 255;
	r.ip6.saddr = ns.target;
	r.ip6.daddr = ip6->saddr;
	r.na.type = ND_NEIGHBOR_ADVERT;
	r.na.flags = bpf_htonl(ND_NA_FLAGS);
	r.na.target = ns.target;
	r.na.opt_type = ND_OPT_TARGET_LL_ADDR;
	r.na.opt_len = 1;
	__builtin_memcpy(r.na.opt_mac, gw_mac, ETH_ALEN);
	r.na.checksum = csum6(&r.ip6, &r.na, sizeof(r.na));
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0))
		return TC_ACT_SHOT;
	stat_inc(S_ND_ANSWERS);
	return reflect_out(skb, &eth, gw_mac, ETH_P_IPV6);
}

/* Turn a denied IPv6 packet into ICMPv6 destination unreachable / administratively prohibited
 * (RFC 4443 3.1) quoting its first V6_QUOTE bytes, and send it back towards the sandbox. */
static __always_inline int reflect_reject6(struct __sk_buff *skb, const struct ipv6hdr *orig,
					   const __u8 *gw_mac)
{
	struct ethhdr eth;
	struct icmp6_reject r = {};

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN + V6_QUOTE, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, r.inner, V6_QUOTE))
		return TC_ACT_SHOT;
	if (bpf_skb_adjust_room(skb, sizeof(r.ip6) + sizeof(r.icmp6), BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;

	r.ip6.version = 6;
	r.ip6.payload_len = bpf_htons(sizeof(r.icmp6) + V6_QUOTE);
	r.ip6.nexthdr = IPPROTO_ICMPV6;
	r.ip6.hop_limit = 64;
	r.ip6.saddr = orig->daddr;
	r.ip6.daddr = orig->saddr;
	r.icmp6.icmp6_type = ICMPV6_DEST_UNREACH;
	r.icmp6.icmp6_code = ICMPV6_ADM_PROHIBITED;
	r.icmp6.icmp6_cksum = csum6(&r.ip6, &r.icmp6, sizeof(r.icmp6) + V6_QUOTE);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0))
		return TC_ACT_SHOT;
	stat_inc(S_REJECTS);
	return reflect_out(skb, &eth, gw_mac, ETH_P_IPV6);
}

struct rst6 {
	struct ipv6hdr ip6;
	struct tcphdr th;
};

/*
 * Answer a denied TCP segment over IPv6 with a RST, like reflect_rst. Not ICMPv6: Linux treats
 * an ICMPv6 error for a socket that connect() still holds locked as a soft error and fails the
 * connect only at the next SYN retransmit (1 s later); a RST waits in the socket's backlog.
 */
static __always_inline int reflect_rst6(struct __sk_buff *skb, const struct ipv6hdr *orig,
					const __u8 *gw_mac)
{
	struct ethhdr eth;
	struct tcphdr th;
	struct rst6 r = {};

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(*orig), &th, sizeof(th)))
		return TC_ACT_SHOT;
	__u32 seg_len = bpf_ntohs(orig->payload_len) - th.doff * 4 + th.syn + th.fin;
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r), 0))
		return TC_ACT_SHOT;

	r.ip6.version = 6;
	r.ip6.payload_len = bpf_htons(sizeof(r.th));
	r.ip6.nexthdr = IPPROTO_TCP;
	r.ip6.hop_limit = 64;
	r.ip6.saddr = orig->daddr;
	r.ip6.daddr = orig->saddr;
	r.th.source = th.dest;
	r.th.dest = th.source;
	r.th.doff = 5;
	r.th.rst = 1;
	if (th.ack) {
		r.th.seq = th.ack_seq;
	} else {
		r.th.ack = 1;
		r.th.ack_seq = bpf_htonl(bpf_ntohl(th.seq) + seg_len);
	}
	r.th.check = csum6(&r.ip6, &r.th, sizeof(r.th));
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0))
		return TC_ACT_SHOT;
	stat_inc(S_REJECTS);
	return reflect_out(skb, &eth, gw_mac, ETH_P_IPV6);
}

/*
 * An IPv6 frame from the sandbox. Passed only when SBX_F_ALLOW_IPV6 is set and decide6()
 * allows its destination (allowed packets are reported at most once a second per next header
 * and ports, like denials); otherwise answered or dropped.
 */
static __always_inline int sandbox_ipv6(struct __sk_buff *skb, struct flow_key *fk,
					__u32 sbx_flags, const __u8 *gw_mac, __u64 now)
{
	struct ipv6hdr ip6;
	struct decision d = { .reason = R_NOT_IPV4 };
	__u8 l4[14] = {}; /* ICMPv6 type + code, or TCP/UDP ports (+ TCP flags at 13) */

	fk->proto = 255;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) || ip6.version != 6) {
		stat_inc(S_DENY_PKTS);
		emit_deny(skb, fk, R_MALFORMED, 0, ETH_P_IPV6, now);
		return TC_ACT_SHOT;
	}
	int has_l4 = !bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip6), l4, 4);
	int is_tcp = ip6.nexthdr == IPPROTO_TCP &&
		     !bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip6), l4, sizeof(l4));

	if (ip6.nexthdr == IPPROTO_ICMPV6 && !(has_l4 && l4[0] == ICMPV6_ECHO_REQUEST)) {
		/* the link's plumbing: neighbour discovery, MLD, errors */
		stat_inc(S_DENY_PKTS);
		if (has_l4 && l4[0] == ND_NEIGHBOR_SOLICIT && (sbx_flags & SBX_F_REJECT))
			return answer_ns(skb, &ip6, gw_mac);
		return TC_ACT_SHOT;
	}
	__u8 mcast = ip6.daddr.in6_u.u6_addr8[0] == 0xff;
	if (mcast && (ip6.daddr.in6_u.u6_addr8[1] & 0x0f) <= 2) {
		stat_inc(S_DENY_PKTS);
		return TC_ACT_SHOT; /* interface- or link-local multicast never leaves the link */
	}

	fk->proto = ip6.nexthdr;
	if (has_l4 && (ip6.nexthdr == IPPROTO_TCP || ip6.nexthdr == IPPROTO_UDP)) {
		__builtin_memcpy(&fk->sport, &l4[0], 2);
		__builtin_memcpy(&fk->dport, &l4[2], 2);
	}
	__u8 tcp_flags = is_tcp ? l4[13] : 0;
	if ((sbx_flags & SBX_F_ALLOW_IPV6) &&
	    decide6(fk->sbx_id, fk->proto, fk->dport, &ip6.daddr, &d) == V_ALLOW) {
		fk->pad[0] = 1; /* rate-limit allow reports apart from denials */
		__u64 *last = bpf_map_lookup_elem(&deny_seen, fk);
		if (!last || now - *last >= NSEC_PER_SEC) {
			bpf_map_update_elem(&deny_seen, fk, &now, BPF_ANY);
			emit(skb, fk, V_ALLOW, R_RULE, tcp_flags, d.rule_id, ETH_P_IPV6, now);
		}
		stat_inc(S_ALLOW_PKTS);
		return TC_ACT_OK;
	}
	stat_inc(S_DENY_PKTS);
	emit_deny_rule(skb, fk, d.reason, tcp_flags, d.rule_id, ETH_P_IPV6, now);
	/* RFC 4443 2.4 (e): no error for a multicast destination or a non-unicast source */
	if (!(sbx_flags & SBX_F_REJECT) || mcast || in6_is_unspecified(&ip6.saddr) ||
	    ip6.saddr.in6_u.u6_addr8[0] == 0xff)
		return TC_ACT_SHOT;
	if (is_tcp)
		return (tcp_flags & 0x04) ? TC_ACT_SHOT : reflect_rst6(skb, &ip6, gw_mac);
	return reflect_reject6(skb, &ip6, gw_mac);
}

SEC("tc")
int sandbox_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct flow_key fk = {};
	struct decision d = { .reason = R_NO_RULE };
	__u64 now = bpf_ktime_get_boot_ns();
	__u8 tcp_flags = 0;
	int is_syn = 0, l4_ok = 0;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;

	__u32 ifindex = skb->ifindex;
	struct sbx_info *sbx = bpf_map_lookup_elem(&sandboxes, &ifindex);
	if (!sbx) {
		stat_inc(S_DENY_PKTS);
		return TC_ACT_SHOT; /* unregistered interface: fail closed */
	}
	fk.sbx_id = sbx->sbx_id;
	__u32 sbx_flags = sbx->flags;
	__u32 host_addr = sbx->host_addr;

	__u16 h_proto = eth->h_proto;
	if (h_proto == bpf_htons(ETH_P_ARP)) {
		stat_inc(S_ALLOW_PKTS);
		return TC_ACT_OK;
	}
	if (h_proto == bpf_htons(ETH_P_IPV6)) {
		__u8 gw_mac[ETH_ALEN];
		__builtin_memcpy(gw_mac, sbx->gw_mac, ETH_ALEN);
		return sandbox_ipv6(skb, &fk, sbx_flags, gw_mac, now);
	}
	if (h_proto != bpf_htons(ETH_P_IP)) {
		fk.proto = 255;
		fk.dport = h_proto;
		emit_deny(skb, &fk, R_NOT_IPV4, 0, bpf_ntohs(h_proto), now);
		stat_inc(S_DENY_PKTS);
		return TC_ACT_SHOT;
	}

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		goto malformed;
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		goto malformed;
	fk.saddr = ip->saddr;
	fk.daddr = ip->daddr;
	fk.proto = ip->protocol;

	if (fk.daddr == host_addr) {
		/* the host's own end of this slot: its firewall admits only replies + the resolver */
		stat_inc(S_ALLOW_PKTS);
		return TC_ACT_OK;
	}

	/* non-first fragments carry no L4 header: only "any port" rules apply */
	int frag = (ip->frag_off & bpf_htons(0x1fff)) != 0;
	void *l4 = (void *)ip + ihl;

	if (!frag && fk.proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			goto malformed;
		fk.sport = th->source;
		fk.dport = th->dest;
		tcp_flags = ((__u8 *)th)[13];
		is_syn = th->syn && !th->ack;
		l4_ok = 1;
	} else if (!frag && fk.proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			goto malformed;
		fk.sport = uh->source;
		fk.dport = uh->dest;
		l4_ok = 1;
	}

	/* known flow? (not for a TCP SYN: a new SYN re-checks the rules) */
	if (l4_ok && !is_syn) {
		struct flow_val *fv = bpf_map_lookup_elem(&flows, &fk);
		if (fv) {
			if (flow_still_allowed(fv, &fk, sbx, now, &d)) {
				stat_inc(S_ALLOW_PKTS);
				return TC_ACT_OK;
			}
			d.reason = R_REVOKED;
			goto deny;
		}
	}

	if (decide(fk.sbx_id, sbx_flags, fk.proto, fk.dport, fk.daddr, now, &d) == V_ALLOW) {
		if (l4_ok) {
			struct flow_val nv = { .last_seen_ns = now, .expires_ns = d.expires_ns,
					       .rule_id = d.rule_id, .gen = sbx->gen };
			/* report only when the flow is new (SYN retransmits are not) */
			if (bpf_map_update_elem(&flows, &fk, &nv, BPF_NOEXIST) == 0)
				emit(skb, &fk, V_ALLOW, d.reason, tcp_flags, d.rule_id, ETH_P_IP, now);
		}
		stat_inc(S_ALLOW_PKTS);
		return TC_ACT_OK;
	}

deny:
	emit_deny_rule(skb, &fk, d.reason, tcp_flags, d.rule_id, ETH_P_IP, now);
	stat_inc(S_DENY_PKTS);
	if ((sbx_flags & SBX_F_REJECT) && l4_ok && ihl == sizeof(*ip)) {
		if (fk.proto == IPPROTO_TCP)
			return (tcp_flags & 0x04) ? TC_ACT_SHOT : reflect_rst(skb);
		return reflect_reject(skb);
	}
	return TC_ACT_SHOT;

malformed:
	emit_deny(skb, &fk, R_MALFORMED, 0, ETH_P_IP, now);
	stat_inc(S_DENY_PKTS);
	return TC_ACT_SHOT;
}

/* IPv6 towards a sandbox with IPv6 allow rules (stateless): TCP/UDP only from a source port
 * and address its allow rules name, ICMPv6 errors, echo replies and neighbour discovery. */
static __always_inline int ipv6_towards_sandbox(struct __sk_buff *skb, __u32 sbx_id)
{
	struct ipv6hdr ip6;
	struct decision d = {};
	__u8 l4[4];

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip6), l4, sizeof(l4)))
		return TC_ACT_SHOT;
	if (ip6.nexthdr == IPPROTO_ICMPV6)
		return (l4[0] < 128 || l4[0] == ICMPV6_ECHO_REPLY || l4[0] == ND_NEIGHBOR_SOLICIT ||
			l4[0] == ND_NEIGHBOR_ADVERT) ? TC_ACT_OK : TC_ACT_SHOT;
	if (ip6.nexthdr != IPPROTO_TCP && ip6.nexthdr != IPPROTO_UDP)
		return TC_ACT_SHOT;
	__u16 sport;
	__builtin_memcpy(&sport, &l4[0], 2);
	return decide6(sbx_id, ip6.nexthdr, sport, &ip6.saddr, &d) == V_ALLOW ? TC_ACT_OK
									       : TC_ACT_SHOT;
}

/*
 * tc egress of the host-side device (traffic towards the sandbox): only ARP, our own rejects,
 * traffic from the slot's host address (the host talking to its guest, e.g. envd), replies of
 * flows the sandbox opened and ICMP errors get in.
 */
SEC("tc")
int sandbox_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct flow_key fk = {};

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	if (eth->h_proto == bpf_htons(ETH_P_ARP) || skb->mark == REJECT_MARK)
		return TC_ACT_OK;
	__u32 ifindex = skb->ifindex;
	struct sbx_info *sbx = bpf_map_lookup_elem(&sandboxes, &ifindex);
	if (!sbx)
		return TC_ACT_SHOT;
	if (eth->h_proto != bpf_htons(ETH_P_IP)) {
		if (eth->h_proto == bpf_htons(ETH_P_IPV6) && (sbx->flags & SBX_F_ALLOW_IPV6))
			return ipv6_towards_sandbox(skb, sbx->sbx_id);
		return TC_ACT_SHOT;
	}
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_SHOT;
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return TC_ACT_SHOT;
	if (ip->saddr == sbx->host_addr)
		return TC_ACT_OK;
	void *l4 = (void *)ip + ihl;

	fk.sbx_id = sbx->sbx_id;
	fk.proto = ip->protocol;
	fk.saddr = ip->daddr; /* reverse direction */
	fk.daddr = ip->saddr;
	if (ip->frag_off & bpf_htons(0x1fff))
		return TC_ACT_OK; /* non-first fragment of a reply; reassembly needs it */
	if (fk.proto == IPPROTO_ICMP) {
		__u8 *type = l4;
		if ((void *)(type + 1) > data_end)
			return TC_ACT_SHOT;
		/* echo reply, dest unreachable, time exceeded */
		if (*type == 0 || *type == 3 || *type == 11)
			return TC_ACT_OK;
		return TC_ACT_SHOT;
	}
	if (fk.proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return TC_ACT_SHOT;
		fk.sport = th->dest;
		fk.dport = th->source;
	} else if (fk.proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return TC_ACT_SHOT;
		fk.sport = uh->dest;
		fk.dport = uh->source;
	} else {
		return TC_ACT_SHOT;
	}
	__u64 now = bpf_ktime_get_boot_ns();
	struct flow_val *fv = bpf_map_lookup_elem(&flows, &fk);
	if (fv) {
		struct decision d = {};
		/* TCP is decided again on the sandbox's side: its ACK of this segment gets the RST
		 * that ends a revoked connection (dropping here would leave the guest waiting) */
		if (fk.proto == IPPROTO_TCP || flow_still_allowed(fv, &fk, sbx, now, &d))
			return TC_ACT_OK;
		emit_deny_rule(skb, &fk, R_REVOKED, 0, d.rule_id, ETH_P_IP, now);
		return TC_ACT_SHOT;
	}
	emit_deny(skb, &fk, R_INBOUND, 0, ETH_P_IP, now);
	return TC_ACT_SHOT;
}

/*
 * tc ingress of tap0 and of vg0 inside a slot's namespace, added for IPv6 frames only. The
 * namespace has no IPv6 stack: this hands the guest's IPv6 frames, unchanged, from tap0 to vg0
 * (so sandbox_egress on the host end sees them) and that program's answers from vg0 back to
 * tap0. The filter's classid minor, which cls_bpf puts into skb->tc_classid before the program
 * runs, is the ifindex (in this namespace) to send to.
 */
SEC("tc")
int slot_ipv6_relay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 to = skb->tc_classid;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6) || !to)
		return TC_ACT_SHOT;
	return bpf_redirect(to, 0);
}

char LICENSE[] SEC("license") = "GPL";
