// SPDX-License-Identifier: (GPL-2.0 OR MIT)
//
// The end-to-end benchmark's traffic generator (bench/e2e.rs).
//
// It is never attached to an interface: the driver runs it with
// BPF_PROG_RUN and BPF_F_TEST_XDP_LIVE_FRAMES (Linux 5.18+). In that mode
// the kernel puts the driver's template frame into page-pool pages, runs
// this program on each, and carries out its verdict for real: XDP_TX is
// turned into a redirect out of the device given as ingress_ifindex in the
// xdp_md context (the generator namespace's veth), so each returned XDP_TX
// puts one frame on the wire towards l4lb.
//
// Per frame the program first copies the driver's template (the first 64
// bytes, from a map) over the frame: live-frame pages are recycled without
// being re-initialised, and a receiver that got the page itself (the
// kernel's forwarding path, which NATs and rewrites the Ethernet header in
// place) leaves its changes in it. It then writes a new client source
// address and port, taken from a per-CPU sequence number, and updates the
// IPv4 header checksum and the TCP/UDP checksum incrementally (RFC 1624,
// eqn. 3), so every frame on the wire has valid checksums.
//
// Client i (0 <= i < addrs * ports) is address first_client + i % addrs,
// port first_port + i / addrs: its source port, or with dst_ports set its
// destination port (one listener per port, for the memory test, so that
// each client has a session with each of many services).
// A CPU emits clients cpu, cpu + stride,
// cpu + 2 * stride, ... so that generator threads pinned to CPUs
// 0..stride-1 send disjoint sets of clients.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct gen_cfg {
	__u32 first_client; // host byte order
	__u32 addrs;        // distinct source addresses, >= 1
	__u32 ports;        // distinct source ports per address, >= 1
	__u32 stride;       // generator threads, >= 1
	__u16 first_port;   // host byte order
	__u16 dst_ports;    // 0: the ports are source ports; 1: destination
	                    // ports (one listener per port: the memory test)
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gen_cfg);
} bench_gen_cfg SEC(".maps");

#define TEMPLATE_LEN 64

struct template {
	__u8 data[TEMPLATE_LEN];
};

// [0]: the template frame, set by the driver.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct template);
} bench_gen_template SEC(".maps");

// [0] sequence number (next client), [1] frames returned as XDP_TX,
// [2] frames dropped because they were not a usable IPv4 TCP/UDP template.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} bench_gen_count SEC(".maps");

static __always_inline __u64 *counter(__u32 idx)
{
	return bpf_map_lookup_elem(&bench_gen_count, &idx);
}

static __always_inline __u16 fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'). Words are taken as they sit in
// memory; the one's complement sum does not depend on byte order (RFC 1071
// section 2(B)), as long as all words are read the same way.
static __always_inline __u16 csum_replace2(__u16 hc, __u16 from, __u16 to)
{
	__u32 s = (__u16)~hc;
	s += (__u16)~from;
	s += to;
	return (__u16)~fold(s);
}

static __always_inline __u16 csum_replace4(__u16 hc, __u32 from, __u32 to)
{
	__u32 s = (__u16)~hc;
	s += (__u16)~(from & 0xffff);
	s += (__u16)~(from >> 16);
	s += to & 0xffff;
	s += to >> 16;
	return (__u16)~fold(s);
}

static __always_inline int reject(void)
{
	__u64 *c = counter(2);
	if (c)
		*c += 1;
	return XDP_DROP;
}

SEC("xdp")
int bench_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;

	struct gen_cfg *cfg = bpf_map_lookup_elem(&bench_gen_cfg, &zero);
	struct template *tmpl = bpf_map_lookup_elem(&bench_gen_template, &zero);
	__u64 *seq = counter(0);
	__u64 *sent = counter(1);
	if (!cfg || !tmpl || !seq || !sent || cfg->addrs == 0 || cfg->ports == 0 ||
	    cfg->stride == 0)
		return reject();

	if (data + TEMPLATE_LEN > data_end)
		return reject();
	__builtin_memcpy(data, tmpl->data, TEMPLATE_LEN);
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return reject();
	struct iphdr *ip = (void *)(eth + 1);
	// The driver builds the template without IP options.
	if ((void *)(ip + 1) > data_end || ip->ihl != 5)
		return reject();

	__u32 cpu = bpf_get_smp_processor_id();
	__u32 n = (__u32)*seq;
	*seq += 1;
	__u32 flows = cfg->addrs * cfg->ports;
	__u32 i = (n * cfg->stride + cpu % cfg->stride) % flows;
	__u32 saddr = bpf_htonl(cfg->first_client + i % cfg->addrs);
	__u16 port = bpf_htons((__u16)(cfg->first_port + i / cfg->addrs));

	__u32 old_saddr = ip->saddr;
	ip->check = csum_replace4(ip->check, old_saddr, saddr);
	ip->saddr = saddr;

	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return reject();
		__u16 *field = cfg->dst_ports ? &udp->dest : &udp->source;
		__u16 old_port = *field;
		// RFC 768: an IPv4 UDP checksum of 0 means "none"; keep it so.
		if (udp->check) {
			__u16 c = csum_replace4(udp->check, old_saddr, saddr);
			c = csum_replace2(c, old_port, port);
			udp->check = c ? c : 0xffff;
		}
		*field = port;
	} else if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > data_end)
			return reject();
		__u16 *field = cfg->dst_ports ? &tcp->dest : &tcp->source;
		__u16 old_port = *field;
		__u16 c = csum_replace4(tcp->check, old_saddr, saddr);
		tcp->check = csum_replace2(c, old_port, port);
		*field = port;
	} else {
		return reject();
	}
	*sent += 1;
	return XDP_TX;
}

char _license[] SEC("license") = "Dual MIT/GPL";
