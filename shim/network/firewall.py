"""NAT, published ports and network isolation, as one nftables table: ``ip vmshim``.

::

    table ip vmshim {
      set bridges      { type ifname }             every bridge of ours
      chain guard      prerouting, raw:            127.0.0.0/8 arriving on anything but lo
                                                   is dropped (route_localnet must not
                                                   open the host's loopback to containers)
      chain prerouting nat prerouting, dstnat:     fib daddr type local → publish
      chain output     nat output, -100:           fib daddr type local → publish
      chain publish    one DNAT rule per published port, comment "vmshim-ctr:<id>"
      chain postrouting nat postrouting, srcnat:   per network, comment "vmshim-net:<name>":
                                                   masquerade its subnet going elsewhere
                                                   (not for --internal), and what reaches it
                                                   from 127.0.0.0/8 or through a DNAT
      chain forward    filter forward:             ct dnat accepted; per network: traffic
                                                   to another of our bridges dropped, and
                                                   for --internal anything leaving it
    }

Why kernel DNAT rather than a proxy process per port: nothing to keep running (ports
keep working if a monitor dies), UDP for free, one table to inspect (``nft list table ip
vmshim``), and the same path for VMs (tap) and process containers (veth). Published
addresses on 127.0.0.1 need ``route_localnet`` on the bridge (set by
shim.network.host.ensure_bridge) and the masquerade of 127.0.0.0/8 sources; the ``guard``
chain is docker's fix for CVE-2020-8558 (no packet from outside may reach 127.0.0.1).

The table lives in the caller's network namespace. Rules are added and deleted in
``nft -f`` batches (each batch is atomic); they are found again by their comments.
Precondition: root, the ``nft`` binary (Debian package nftables).
"""

from __future__ import annotations

import json

from shim.errors import NetworkError
from shim.network.host import run
from shim.network.ports import ANY_IP, PortMapping

TABLE = "vmshim"
NFT = "nft"

BASE = f"""\
table ip {TABLE} {{
  set bridges {{ type ifname; }}
  chain guard {{
    type filter hook prerouting priority raw; policy accept;
    iifname != "lo" ip daddr 127.0.0.0/8 drop
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local jump publish
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    fib daddr type local jump publish
  }}
  chain publish {{
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct status dnat accept
  }}
}}
"""


def _nft(script: str, what: str) -> str:
    return run([NFT, "-f", "-"], input=script, what=what)


def _ensure_table(family: str, base: str) -> None:
    """Load *base* (the table's definition) unless ``table FAMILY vmshim`` exists."""
    try:
        run([NFT, "list", "table", family, TABLE])
        return
    except NetworkError as exc:
        if "not installed" in str(exc):
            raise
    _nft(base, f"cannot create the nftables table {family} {TABLE}")


def ensure_table() -> None:
    """Create the table with its base chains unless it exists. Call with the network
    store's lock held (two creators would both add the base rules)."""
    _ensure_table("ip", BASE)


def delete_table() -> None:
    """Remove everything of ours (tests; ``network prune`` with nothing left)."""
    for family in ("ip", "ip6", "bridge"):
        try:
            run([NFT, "delete", "table", family, TABLE])
        except NetworkError:
            pass


def _rules(chain: str, family: str = "ip") -> list[dict]:
    out = run([NFT, "-j", "-a", "list", "chain", family, TABLE, chain], what=f"cannot list nftables chain {chain}")
    return [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]


def _delete_commented(comment: str, chains: tuple[str, ...], family: str = "ip") -> int:
    lines = []
    for chain in chains:
        try:
            rules = _rules(chain, family)
        except NetworkError:
            continue  # no table (yet, or any more)
        lines += [
            f"delete rule {family} {TABLE} {chain} handle {r['handle']}" for r in rules if r.get("comment") == comment
        ]
    if lines:
        _nft("\n".join(lines) + "\n", f"cannot delete the rules of {comment}")
    return len(lines)


def _has_comment(comment: str, chain: str, family: str = "ip") -> bool:
    try:
        return any(r.get("comment") == comment for r in _rules(chain, family))
    except NetworkError:
        return False


# ---- networks ----------------------------------------------------------------------------


def network_comment(name: str) -> str:
    return f"vmshim-net:{name}"


def network_rules(name: str, bridge: str, subnet: str, internal: bool) -> str:
    """The nft commands that give one network its NAT and isolation."""
    c = f'comment "{network_comment(name)}"'
    lines = [f'add element ip {TABLE} bridges {{ "{bridge}" }}']
    post = f"add rule ip {TABLE} postrouting"
    fwd = f"add rule ip {TABLE} forward"
    if not internal:
        lines.append(f'{post} ip saddr {subnet} oifname != "{bridge}" masquerade {c}')
    lines += [
        f'{post} ip saddr 127.0.0.0/8 oifname "{bridge}" masquerade {c}',
        f'{post} ip saddr {subnet} oifname "{bridge}" ct status dnat masquerade {c}',
        f'{fwd} iifname "{bridge}" oifname != "{bridge}" oifname @bridges drop {c}',
    ]
    if internal:
        lines += [
            f'{fwd} iifname "{bridge}" oifname != "{bridge}" drop {c}',
            f'{fwd} oifname "{bridge}" iifname != "{bridge}" drop {c}',
        ]
    return "\n".join(lines) + "\n"


def ensure_network(name: str, bridge: str, subnet: str, internal: bool, ipv6: bool = False) -> None:
    """Add the network's rules unless they are there (*ipv6*: also its IPv6 rules).
    Lock held, table ensured."""
    if not _has_comment(network_comment(name), "postrouting"):
        _nft(network_rules(name, bridge, subnet, internal), f"cannot add the NAT rules of network {name}")
    if ipv6 and not _has_comment(network_comment(name), "forward", family="ip6"):
        _nft(IP6_BASE + network_rules6(name, bridge), f"cannot add the IPv6 rules of network {name}")


# IPv6 on a dual-stack network reaches that network's own subnet and nothing else: no
# NAT66, no routing between networks or out (``table ip6 vmshim``: whatever would be
# forwarded from or to one of our bridges is dropped).
IP6_BASE = f"""\
table ip6 {TABLE} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
  }}
}}
"""


def network_rules6(name: str, bridge: str) -> str:
    c = f'comment "{network_comment(name)}"'
    fwd = f"add rule ip6 {TABLE} forward"
    # Not plain `iifname "{bridge}" drop`: with br_netfilter loaded (docker loads it)
    # frames bridged between two ports pass this hook too, in and out the bridge itself.
    return (
        f'{fwd} iifname "{bridge}" oifname != "{bridge}" drop {c}\n'
        f'{fwd} oifname "{bridge}" iifname != "{bridge}" drop {c}\n'
    )


def remove_network(name: str, bridge: str) -> None:
    _delete_commented(network_comment(name), ("postrouting", "forward"))
    _delete_commented(network_comment(name), ("forward",), family="ip6")
    try:
        _nft(f'delete element ip {TABLE} bridges {{ "{bridge}" }}\n', "")
    except NetworkError:
        pass


# ---- published ports ---------------------------------------------------------------------


def container_comment(container_id: str) -> str:
    return f"vmshim-ctr:{container_id[:12]}"


def port_rules(container_id: str, container_ip: str, ports: list[PortMapping]) -> str:
    c = f'comment "{container_comment(container_id)}"'
    lines = []
    for p in ports:
        match = f"ip daddr {p.host_ip} " if p.host_ip != ANY_IP else ""
        lines.append(
            f"add rule ip {TABLE} publish {match}{p.protocol} dport {p.host_port} "
            f"dnat to {container_ip}:{p.container_port} {c}"
        )
    return "\n".join(lines) + "\n"


def publish(container_id: str, container_ip: str, ports: list[PortMapping]) -> None:
    """DNAT each of *ports* (concrete host ports) to *container_ip*. Replaces the
    container's earlier rules. Lock held, table ensured."""
    unpublish(container_id)
    if ports:
        _nft(port_rules(container_id, container_ip, ports), f"cannot publish ports {', '.join(map(str, ports))}")


def unpublish(container_id: str) -> int:
    """Delete the container's DNAT rules; return how many there were. Idempotent."""
    return _delete_commented(container_comment(container_id), ("publish",))


# ---- anti-spoofing on bridge ports -------------------------------------------------------
# A container's port on a bridge (the VM's tap, or the host end of a process container's
# veth) may only send what its endpoint owns: frames from its MAC, IPv4 from its address,
# ARP claiming its MAC and address (or 0.0.0.0, an ARP probe), and no other ethertype
# (no VLAN tags, no raw L2 protocols; IPv6 only on a dual-stack network: from its IPv6
# address, its MAC's EUI-64 link-local address or :: (duplicate address detection), and
# neighbour advertisements only for those addresses, ND's ARP). Like libvirt's ``clean-traffic`` nwfilter,
# but one nftables table that covers both isolations: ``table bridge vmshim``.
BRIDGE_BASE = f"""\
table bridge {TABLE} {{
  chain antispoof {{
    type filter hook prerouting priority -300; policy accept;
  }}
}}
"""


def ensure_bridge_table() -> None:
    """Create ``table bridge vmshim`` unless it exists. Lock held."""
    _ensure_table("bridge", BRIDGE_BASE)


def port_comment(host_ifname: str) -> str:
    return f"vmshim-port:{host_ifname}"


def link_local(mac: str) -> str:
    """The EUI-64 link-local IPv6 address the kernel gives a NIC with *mac*."""
    import ipaddress

    b = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([b[0] ^ 0x02]) + b[1:3] + b"\xff\xfe" + b[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))


def antispoof_rules(host_ifname: str, mac: str, ip: str, ip6: str = "") -> str:
    """The nft commands that pin the bridge port *host_ifname* to *mac*, *ip* and (on a
    dual-stack network) *ip6*."""
    import ipaddress

    c = f'comment "{port_comment(host_ifname)}"'
    rule = f'add rule bridge {TABLE} antispoof iifname "{host_ifname}"'
    lines = [
        f"{rule} ether saddr != {mac} drop {c}",
        f"{rule} ether type != {{ ip, arp{', ip6' if ip6 else ''} }} drop {c}",
        f"{rule} ether type ip ip saddr != {ip} drop {c}",
        f"{rule} ether type arp arp saddr ether != {mac} drop {c}",
        f"{rule} ether type arp arp saddr ip != {{ 0.0.0.0, {ip} }} drop {c}",
    ]
    if ip6:
        own = [str(ipaddress.IPv6Address(ip6)), link_local(mac)]
        targets = ", ".join(f"0x{int(ipaddress.IPv6Address(a)):032x}" for a in own)
        lines += [
            f"{rule} ether type ip6 ip6 saddr != {{ ::, {', '.join(own)} }} drop {c}",
            # @th,64,128: the target address of a neighbour advertisement (nft 1.0.6
            # has no name for it)
            f"{rule} ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 != {{ {targets} }} drop {c}",
        ]
    return "\n".join(lines) + "\n"


def guard_port(host_ifname: str, mac: str, ip: str, ip6: str = "") -> None:
    """Let the bridge port *host_ifname* send only as *mac*/*ip* (/*ip6*) (replacing
    earlier rules of that port). The interface need not exist yet. Lock held."""
    ensure_bridge_table()
    unguard_port(host_ifname)
    _nft(antispoof_rules(host_ifname, mac, ip, ip6), f"cannot add the anti-spoofing rules of {host_ifname}")


def unguard_port(host_ifname: str) -> int:
    """Delete the port's anti-spoofing rules; return how many there were. Idempotent."""
    try:
        out = run([NFT, "-j", "-a", "list", "chain", "bridge", TABLE, "antispoof"])
    except NetworkError:
        return 0  # no table (yet, or any more)
    rules = [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]
    lines = [
        f"delete rule bridge {TABLE} antispoof handle {r['handle']}"
        for r in rules
        if r.get("comment") == port_comment(host_ifname)
    ]
    if lines:
        _nft("\n".join(lines) + "\n", f"cannot delete the anti-spoofing rules of {host_ifname}")
    return len(lines)
