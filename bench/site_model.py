#!/usr/bin/env python3
"""What one deployment of a site asks of its appliances: a model from the per-node costs measured on this machine.

No network, no root, nothing started: arithmetic over the figures of docs/benchmarks.md, docs/scale.md and
docs/reliability.md (each constant below names its source), for a site of N nodes split into VLANs of
--per-appliance nodes, one appliance each. For each appliance it prints the work one deployment brings (CPU of
the appliance's event loop, deploy-environment bytes, DHCP exchanges, BMC calls) and how long each takes at the
measured rates, next to the nodes' own floor (two POSTs, the deploy environment through a node link, the image
through a node link). The slowest line is what bounds that appliance; docs/scale.md ("Beyond one machine")
reads the table.

Run: .venv/bin/python bench/site_model.py [--nodes 4000 10000 40000] [--per-appliance 0 2000] [--nic-gbit 10] [--cores 8]
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

# Measured per-node costs (this machine: 2 vCPUs; see the docs named).
LOOP_CPU_S_PER_NODE = 0.044   # docs/scale.md n100: the appliance's CPU for a 100-node deployment, 4.3-6.7 s (median 4.4)
DEPLOY_ENV_BYTES = 60.9e6     # docs/deploy-env.md: vmlinuz 8.2 MB + initrd 52.7 MB, fetched once per node and deployment
DHCP_EXCHANGES_PER_NODE = 6   # firmware, iPXE and the deploy env's own DHCP; firmware and iPXE again; the installed OS
DHCP_PER_S = 9456             # docs/benchmarks.md: leases/s at < 1 % drop, relayed perfdhcp, 2026-12-05
BMC_CALLS_PER_NODE = 3        # bootdev, power status, reset (first reboot); BootNewEnv by kexec needs none
BMC_CPU_S_PER_CALL = 0.0089   # docs/reliability.md: ipmitool, 400 healthy BMCs, CPU per call
HTTP_NIC_EFFICIENCY = 0.94    # TCP/IP over Ethernet: 1448 payload bytes of 1538 on the wire (docs/benchmarks.md floor)


@dataclass(frozen=True)
class Site:
    """The site and the appliance hardware the model is asked about."""

    nodes: int
    per_appliance: int
    nic_gbit: float
    node_link_gbit: float
    image_mb: float
    post_s: float
    cores: int


def bounds(site: Site) -> dict[str, float]:
    """Seconds each kind of work takes one appliance of the site, and the nodes' own floor."""
    n = min(site.nodes, site.per_appliance)
    node_link = site.node_link_gbit * 1e9 / 8 * HTTP_NIC_EFFICIENCY
    nic = site.nic_gbit * 1e9 / 8 * HTTP_NIC_EFFICIENCY
    return {
        "node floor": 2 * site.post_s + (DEPLOY_ENV_BYTES + site.image_mb * 1e6) / node_link,
        "event loop CPU": n * LOOP_CPU_S_PER_NODE,
        "deploy env through the NIC": n * DEPLOY_ENV_BYTES / nic,
        "DHCP": n * DHCP_EXCHANGES_PER_NODE / DHCP_PER_S,
        "BMC calls": n * BMC_CALLS_PER_NODE * BMC_CPU_S_PER_CALL / site.cores,
        "image into the site": site.image_mb * 1e6 / nic,
    }


def main() -> int:
    """Print one row per site size and split: every bound, and the one that wins."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[4000, 10000, 40000])
    parser.add_argument("--per-appliance", type=int, nargs="+", default=[0, 2000],
                        help="nodes per VLAN, one appliance each (0: one appliance for the whole site)")
    parser.add_argument("--nic-gbit", type=float, default=10.0, help="the appliance's link")
    parser.add_argument("--node-link-gbit", type=float, default=1.0)
    parser.add_argument("--image-mb", type=float, default=150.0, help="docs/images.md: debian12.tar.zst is 149.5 MB")
    parser.add_argument("--post-s", type=float, default=60.0, help="docs/scale.md: the POST mean chosen for the experiments")
    parser.add_argument("--cores", type=int, default=8, help="the appliance's cores (ipmitool processes use them all)")
    args = parser.parse_args()
    print(f"appliance: {args.nic_gbit:g} Gbit/s, {args.cores} cores; node links {args.node_link_gbit:g} Gbit/s; "
          f"image {args.image_mb:g} MB; POST {args.post_s:g} s; seconds per deployment\n")
    names = list(bounds(Site(1, 1, 1, 1, 1, 1, 1)))
    print("| nodes | appliances | nodes each | " + " | ".join(names) + " | longest appliance-side |")
    print("| ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " | --- |")
    for nodes in args.nodes:
        for per in dict.fromkeys(min(p or nodes, nodes) for p in args.per_appliance):
            site = Site(nodes, per, args.nic_gbit, args.node_link_gbit, args.image_mb, args.post_s, args.cores)
            b = bounds(site)
            longest = max(names[1:], key=b.__getitem__)
            print(f"| {nodes} | {math.ceil(nodes / per)} | {min(nodes, per)} | "
                  + " | ".join(f"{b[k]:.0f}" for k in names) + f" | {longest} ({b[longest] / b['node floor']:.1f}x the floor) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
