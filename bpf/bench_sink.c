// SPDX-License-Identifier: (GPL-2.0 OR MIT)
//
// The end-to-end benchmark's backend sink (bench/e2e.rs): attached to the
// sink namespace's veth, it counts every frame that reaches the backends and
// drops it, so that the backends cost (almost) nothing and never answer.
//
// Counters (per-CPU, summed by the driver):
//   [0] frames seen
//   [1] IPv4 frames still addressed to the VIP: not NAT'ed. The bare AF_XDP
//       forwarder only sets MACs, so for it this equals [0]; for l4lb and
//       nftables it must stay 0.
//   [2] bytes seen

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} bench_sink_count SEC(".maps");

// [0]: the VIP (network byte order), set by the driver before attaching.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} bench_sink_cfg SEC(".maps");

static __always_inline void bump(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&bench_sink_count, &idx);
	if (v)
		*v += n;
}

SEC("xdp")
int bench_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;

	bump(0, 1);
	bump(2, data_end - data);
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_DROP;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return XDP_DROP;
	__u32 *vip = bpf_map_lookup_elem(&bench_sink_cfg, &zero);
	if (vip && ip->daddr == *vip)
		bump(1, 1);
	return XDP_DROP;
}

char _license[] SEC("license") = "Dual MIT/GPL";
