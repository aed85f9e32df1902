// SPDX-License-Identifier: (GPL-2.0 OR MIT)
//
// The end-to-end benchmark's backend sink (bench/e2e.rs): attached to the
// sink namespace's veth, it counts every frame that reaches the backends and
// drops it, so that the backends never answer and cost as little as a veth
// allows. Two entry points with the same logic: tc ingress (the default)
// and native XDP (`l4lb-bench run --sink xdp`). Every frame reaching the
// sink is a socket buffer (AF_XDP copy-mode TX, kernel forwarding): native
// XDP on a veth copies each into a page-pool page first; tc does not.
//
// Counters (per-CPU, summed by the driver):
//   [0] frames seen
//   [1] IPv4 frames still addressed to the VIP: not NAT'ed. The bare AF_XDP
//       forwarder only sets MACs, so for it this equals [0]; for l4lb and
//       nftables it must stay 0.
//   [2] bytes seen
//
// Frames from the load balancer's own backend-side address (its health
// checks) are not counted but passed to the sink namespace's kernel, which
// holds the backend addresses and a listener on the health-check port, so
// that l4lb keeps its backends up.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} bench_sink_count SEC(".maps");

// Set by the driver before attaching. Addresses in network byte order.
struct sink_cfg {
	__u32 vip;
	__u32 lb_addr; // the load balancer's backend-side address
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sink_cfg);
} bench_sink_cfg SEC(".maps");

static __always_inline void bump(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&bench_sink_count, &idx);
	if (v)
		*v += n;
}

// 1: the kernel's (ARP, l4lb's health checks), 0: count and drop.
static __always_inline int sink(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	__u32 zero = 0;

	if ((void *)(eth + 1) > data_end)
		goto drop;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return 1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		goto drop;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		goto drop;
	struct sink_cfg *cfg = bpf_map_lookup_elem(&bench_sink_cfg, &zero);
	if (!cfg)
		goto drop;
	if (ip->saddr == cfg->lb_addr)
		return 1;
	if (ip->daddr == cfg->vip)
		bump(1, 1);
drop:
	bump(0, 1);
	bump(2, data_end - data);
	return 0;
}

// Attached as XDP (native) to the sink's veth.
SEC("xdp")
int bench_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	return sink(data, data_end) ? XDP_PASS : XDP_DROP;
}

// The same at the tc ingress hook (direct action): frames that arrive as
// socket buffers (AF_XDP copy-mode TX, kernel forwarding) are counted and
// dropped without the copy native XDP on a veth makes of each of them.
SEC("tc")
int bench_sink_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	return sink(data, data_end) ? TC_ACT_OK : TC_ACT_SHOT;
}

char _license[] SEC("license") = "Dual MIT/GPL";
