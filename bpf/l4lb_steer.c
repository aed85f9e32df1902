// SPDX-License-Identifier: (GPL-2.0 OR MIT)
//
// l4lb's XDP steering program: the only kernel-side code of the project.
//
// It decides, per frame, whether l4lb's user-space data plane must see it
// (redirect into the AF_XDP socket bound to this RX queue) or whether the
// kernel keeps it (XDP_PASS). It never rewrites or drops anything: all
// forwarding decisions and all drop counters live in user space, where they
// are tested without a kernel (the classification in src/dataplane/pipeline.rs mirrors this logic).
//
// Redirected:
//   * frames to a VIP address that match a listener (vip, port, protocol);
//   * frames to a VIP address whose L4 header cannot be read (truncated,
//     fragmented, bad IHL), so that user space counts them as malformed
//     instead of the kernel dropping them silently;
//   * ICMP and ICMPv6 errors to a VIP (unreachable, packet too big, time
//     exceeded, parameter problem) that quote a listener's TCP or UDP
//     packet, or whose quote cannot be read: user space translates those
//     about a flow and sends them on to its server (errors about the
//     host's own traffic from a VIP address stay with the kernel);
//   * frames from a backend address to an address that is not one of this
//     host's own, nor a group (multicast, broadcast) address: replies of
//     NAT'ed flows. Replies to the host itself (its health checks, ssh,
//     ...) and a server's neighbour solicitations stay with the kernel.
// Everything else (ARP, neighbour discovery, other ports on a VIP, the host's
// own traffic) is passed to the kernel.
//
// Addresses are stored as 16 bytes: IPv6 as is, IPv4 as IPv4-mapped IPv6
// (::ffff:a.b.c.d), so one set of maps serves both families.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct addr_key {
	__u8 addr[16];
};

struct l4_key {
	__u8 addr[16];
	__u16 port; // network byte order
	__u8 proto; // IPPROTO_TCP or IPPROTO_UDP
	__u8 pad;
};

#define MAX_QUEUES 64 /* = control::xdp::MAX_QUEUES */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct addr_key);
	__type(value, __u32);
} l4lb_vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct l4_key);
	__type(value, __u32);
} l4lb_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct addr_key);
	__type(value, __u32);
} l4lb_backends SEC(".maps");

// Every address of every interface of the host (VIPs configured on lo
// for other uses included): room for more than the server hosts.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct addr_key);
	__type(value, __u32);
} l4lb_local SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} l4lb_xsks SEC(".maps");

// Per-CPU counters read by `l4lb stats`: [0] redirected, [1] passed.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} l4lb_steer_stats SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&l4lb_steer_stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline int redirect(struct xdp_md *ctx)
{
	// Falls back to XDP_PASS when no socket is bound to this queue (a
	// queue beyond the workers'): counted as passed, since the kernel
	// gets the frame, so that "redirected" is what reached l4lb.
	int act = bpf_redirect_map(&l4lb_xsks, ctx->rx_queue_index, XDP_PASS);
	count(act == XDP_REDIRECT ? 0 : 1);
	return act;
}

static __always_inline int pass(void)
{
	count(1);
	return XDP_PASS;
}

static __always_inline void map_v4(struct addr_key *k, __be32 a)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->addr[10] = 0xff;
	k->addr[11] = 0xff;
	__builtin_memcpy(&k->addr[12], &a, 4);
}

// A group address: IPv6 multicast, IPv4 multicast or the IPv4 limited
// broadcast (= util::is_group). Never a reply of a NAT'ed flow; IPv6
// neighbour solicitations from a server go to one.
static __always_inline int is_group(const struct addr_key *a)
{
	if (a->addr[0] == 0xff)
		return 1;
	for (int i = 0; i < 10; i++)
		if (a->addr[i])
			return 0;
	if (a->addr[10] != 0xff || a->addr[11] != 0xff)
		return 0;
	if ((a->addr[12] & 0xf0) == 0xe0)
		return 1;
	return a->addr[12] == 0xff && a->addr[13] == 0xff && a->addr[14] == 0xff &&
	       a->addr[15] == 0xff;
}

// Whether IPv6 next header `nh` is an extension header that a TCP or UDP
// header may follow in the clear: hop-by-hop, routing, fragment, AH,
// destination options, mobility, HIP, shim6 and the experimental 253/254
// (RFC 8200 §4, IANA "IPv6 Extension Header Types"; ESP is left out: what
// follows it is encrypted) (= packet::is_ipv6_extension).
static __always_inline int is_ipv6_extension(__u8 nh)
{
	return nh == 0 || nh == 43 || nh == 44 || nh == 51 || nh == 60 || nh == 135 ||
	       nh == 139 || nh == 140 || nh == 253 || nh == 254;
}

// Whether an ICMP or ICMPv6 message of type `type` is an error, which quotes
// the packet that caused it (= dataplane::icmp::is_error_type).
static __always_inline int is_icmp_error(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMPV6)
		return type >= 1 && type <= 4; // unreachable, too big, time, parameter
	return type == 3 || type == 11 || type == 12; // unreachable, time, parameter
}

// Whether user space must see the ICMP error (`proto`) whose quoted packet
// starts at `q`. The quote is a packet this host sent from the VIP: user
// space translates errors about a listener's TCP or UDP flows (the quote's
// source address and port are the listener's), and counts quotes it cannot
// read here. An error about anything else the host sends from a VIP (its
// own services on other ports, its ICMP) is the kernel's (= the
// Toward::Server case of Processor::icmp).
static __always_inline int quote_is_users(__u8 proto, void *q, void *data_end)
{
	struct l4_key lk;
	__u8 qproto;
	void *ql4;

	if (proto == IPPROTO_ICMP) {
		struct iphdr *qip = q;
		if ((void *)(qip + 1) > data_end)
			return 1;
		__u32 qihl = qip->ihl & 0xf;
		if (qihl < 5 || (qip->frag_off & bpf_htons(0x1fff)) != 0)
			return 1; // broken, or a later fragment: no ports
		qproto = qip->protocol;
		ql4 = (void *)qip + qihl * 4;
		struct addr_key a;
		map_v4(&a, qip->saddr);
		__builtin_memcpy(lk.addr, a.addr, 16);
	} else {
		struct ipv6hdr *qip6 = q;
		if ((void *)(qip6 + 1) > data_end)
			return 1;
		qproto = qip6->nexthdr;
		ql4 = (void *)(qip6 + 1);
		__builtin_memcpy(lk.addr, &qip6->saddr, 16);
	}
	if (qproto != IPPROTO_TCP && qproto != IPPROTO_UDP)
		return 0;
	if (ql4 + 2 > data_end)
		return 1;
	lk.port = *(__u16 *)ql4; // the quoted source port
	lk.proto = qproto;
	lk.pad = 0;
	return bpf_map_lookup_elem(&l4lb_listeners, &lk) != NULL;
}

// Decide for a frame whose L3 addresses are known. `l4` points at the L4
// header or is NULL when it cannot be read (truncated or a fragment).
static __always_inline int steer(struct xdp_md *ctx, struct addr_key *dst, struct addr_key *src,
				 __u8 proto, void *l4, void *data_end)
{
	if (bpf_map_lookup_elem(&l4lb_vips, dst)) {
		if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
			// Errors about a listener's flows: user space translates
			// them. Echo, the rest, and errors about the host's own
			// traffic from the VIP are the kernel's business.
			// (A message shorter than its 8-byte header is no error user
			// space could use either: the kernel drops it.)
			if (!l4 || l4 + 8 > data_end || !is_icmp_error(proto, *(__u8 *)l4))
				return pass();
			if (quote_is_users(proto, l4 + 8, data_end))
				return redirect(ctx);
			return pass();
		}
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
			return pass(); // other protocols to a VIP: the kernel's business
		if (!l4 || l4 + 4 > data_end)
			return redirect(ctx); // malformed: user space counts it
		struct l4_key lk;
		__builtin_memcpy(lk.addr, dst->addr, 16);
		lk.port = *(__u16 *)(l4 + 2);
		lk.proto = proto;
		lk.pad = 0;
		if (bpf_map_lookup_elem(&l4lb_listeners, &lk))
			return redirect(ctx);
		return pass();
	}
	if (bpf_map_lookup_elem(&l4lb_backends, src) && !is_group(dst) &&
	    !bpf_map_lookup_elem(&l4lb_local, dst))
		return redirect(ctx);
	return pass();
}

SEC("xdp")
int l4lb_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct addr_key src, dst;

	if ((void *)(eth + 1) > data_end)
		return pass();

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return pass(); // cannot tell whose it is: the kernel drops it
		// Not an IPv4 header after all: the kernel drops it, as user
		// space would pass it (a frame it cannot hand back).
		if (ip->version != 4)
			return pass();
		map_v4(&dst, ip->daddr);
		map_v4(&src, ip->saddr);
		void *l4 = NULL;
		__u32 ihl = ip->ihl & 0xf;
		// A fragment (MF set or non-zero offset) carries no usable ports.
		int frag = (ip->frag_off & bpf_htons(0x3fff)) != 0;
		if (ihl >= 5 && !frag)
			l4 = (void *)ip + ihl * 4;
		return steer(ctx, &dst, &src, ip->protocol, l4, data_end);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return pass();
		__builtin_memcpy(dst.addr, &ip6->daddr, 16);
		__builtin_memcpy(src.addr, &ip6->saddr, 16);
		__u8 nh = ip6->nexthdr;
		if (nh == IPPROTO_TCP || nh == IPPROTO_UDP || nh == IPPROTO_ICMPV6)
			return steer(ctx, &dst, &src, nh, (void *)(ip6 + 1), data_end);
		// Extension headers are not followed: a TCP/UDP packet behind
		// them may be a listener's, so such frames to a VIP reach user
		// space without ports and are counted there as unsupported.
		if (is_ipv6_extension(nh))
			return steer(ctx, &dst, &src, IPPROTO_TCP, NULL, data_end);
		// Another upper-layer protocol (ESP, GRE, SCTP, OSPF, ...): as
		// for IPv4, to a VIP it is the kernel's.
		return steer(ctx, &dst, &src, nh, NULL, data_end);
	}
	return pass();
}

char _license[] SEC("license") = "Dual MIT/GPL";
