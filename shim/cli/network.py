"""``vmshim network …`` and ``vmshim port``: thin, the work is in shim.network."""

from __future__ import annotations

import json
import sys

import click

from shim.cli.table import print_table
from shim.containers.options import parse_labels
from shim.errors import NetworkError


def inspect_doc(net) -> dict:
    """The docker-shaped ``network inspect`` document."""
    from shim.network import dns
    from shim.network.host import link_exists

    containers = {}
    for cid, ep in sorted(net.endpoints.items()):
        containers[cid] = {
            "Name": ep.container_name,
            "MacAddress": ep.mac,
            "IPv4Address": f"{ep.ip}/{net.prefixlen}",
            "IPv6Address": f"{ep.ip6}/{net.prefixlen6}" if ep.ip6 else "",
            "Aliases": ep.aliases,
            "Isolation": ep.isolation,
            "Ports": [str(p) for p in ep.ports],
            "HostInterface": ep.host_ifname,
        }
    return {
        "Name": net.name,
        "Id": net.id,
        "Created": net.created,
        "Driver": net.driver,
        "Scope": "local",
        "Internal": net.internal,
        "EnableIPv6": net.ipv6,
        "IPAM": {
            "Driver": "default",
            "Config": [{"Subnet": net.subnet, "Gateway": net.gateway}]
            + ([{"Subnet": net.subnet6, "Gateway": net.gateway6}] if net.ipv6 else []),
        },
        "Containers": containers,
        "Options": {"bridge": net.bridge, "dns": "dnsmasq" if net.dns else "none"},
        "Labels": net.labels,
        "Vmshim": {"BridgeUp": link_exists(net.bridge), "DnsPid": (dns.running_pid(net) or 0) if net.dns else 0},
    }


@click.group("network")
def network_group() -> None:
    """Manage networks (bridges with NAT; containers on a user network find each other
    by name)."""


@network_group.command("create")
@click.option(
    "--driver",
    "-d",
    default="bridge",
    show_default=True,
    type=click.Choice(["bridge"]),
    help="Only bridge networks exist.",
)
@click.option(
    "--subnet",
    metavar="CIDR",
    multiple=True,
    help="e.g. 10.89.7.0/24 (default: "
    "a free /24 of 10.89.0.0/16); with --ipv6 also an IPv6 one, e.g. fd00:89::/64 "
    "(default: a random unique-local /64).",
)
@click.option(
    "--ipv6",
    is_flag=True,
    help="Dual stack: containers get an IPv6 address "
    "too and names resolve to it (AAAA). Within the network only: no NAT66, no "
    "published IPv6 ports.",
)
@click.option("--gateway", metavar="IP", help="The host's address on the network (default: the subnet's first).")
@click.option("--internal", is_flag=True, help="No NAT: containers cannot reach outside.")
@click.option("--label", multiple=True, metavar="KEY=VALUE")
@click.argument("name")
def create_cmd(driver, subnet, ipv6, gateway, internal, label, name):
    """Create a network NAME."""
    from shim.containers.networking import create_network

    v4 = [s for s in subnet if ":" not in s]
    v6 = [s for s in subnet if ":" in s]
    if len(v4) > 1 or len(v6) > 1:
        raise NetworkError("--subnet: at most one IPv4 and one IPv6 subnet")
    net = create_network(
        name,
        subnet=v4[0] if v4 else None,
        gateway=gateway,
        internal=internal,
        labels=parse_labels(label),
        ipv6=ipv6,
        subnet6=v6[0] if v6 else None,
    )
    click.echo(net.id)


@network_group.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.option("--no-trunc", is_flag=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def ls_cmd(quiet, no_trunc, fmt):
    """List networks (none and host are always there too)."""
    from shim.network.store import NetworkStore

    nets = NetworkStore().list()
    if quiet:
        for net in nets:
            click.echo(net.id if no_trunc else net.id[:12])
        return
    if fmt == "json":
        for net in nets:
            click.echo(
                json.dumps(
                    {
                        "ID": net.id,
                        "Name": net.name,
                        "Driver": net.driver,
                        "Subnet": net.subnet,
                        "Containers": len(net.endpoints),
                    }
                )
            )
        return
    rows = [("NETWORK ID", "NAME", "DRIVER", "SUBNET", "CONTAINERS")]
    for net in nets:
        rows.append(
            (
                net.id if no_trunc else net.id[:12],
                net.name,
                net.driver,
                net.subnet + (f", {net.subnet6}" if net.ipv6 else "") + (" (internal)" if net.internal else ""),
                str(len(net.endpoints)),
            )
        )
    rows += [("-", "host", "host", "-", "-"), ("-", "none", "null", "-", "-")]
    print_table(rows)


@network_group.command("inspect")
@click.option("-f", "--format", "fmt", metavar="TEMPLATE", help="e.g. '{{.IPAM.Config}}'.")
@click.argument("networks", nargs=-1, required=True)
def inspect_cmd(fmt, networks):
    """Show networks as JSON: subnet, gateway, bridge, attached containers."""
    from shim.network.store import NetworkStore

    from shim.cli.each import inspect_each

    store = NetworkStore()
    inspect_each(networks, lambda ref: inspect_doc(store.get(ref)), fmt)


@network_group.command("rm")
@click.argument("networks", nargs=-1, required=True)
def rm_cmd(networks):
    """Remove networks (none may have containers attached)."""
    from shim.containers.networking import remove_network

    from shim.cli.each import each

    each(networks, remove_network)


@network_group.command("prune")
@click.option("-f", "--force", is_flag=True, help="Do not ask.")
def prune_cmd(force):
    """Remove every user network without containers (and endpoints left by crashed
    containers)."""
    from shim.containers.networking import prune_networks

    if not force and sys.stdin.isatty():
        click.confirm("Remove all user networks without containers?", abort=True)
    removed = prune_networks()
    if removed:
        click.echo("Deleted Networks:")
        for name in removed:
            click.echo(name)


@network_group.command("connect")
@click.option("--alias", multiple=True, metavar="NAME", help="Another name on this network.")
@click.option("--ip", metavar="IP", help="The container's address on this network.")
@click.argument("network")
@click.argument("container")
def connect_cmd(alias, ip, network, container):
    """Connect CONTAINER to NETWORK."""
    from shim.containers.netconnect import connect_container

    connect_container(container, network, aliases=list(alias), ip=ip)


@network_group.command("disconnect")
@click.option("-f", "--force", is_flag=True, help="Also when the container is gone.")
@click.argument("network")
@click.argument("container")
def disconnect_cmd(force, network, container):
    """Disconnect CONTAINER from NETWORK."""
    from shim.containers.netconnect import disconnect_container

    disconnect_container(container, network, force=force)


@click.command("port")
@click.argument("container")
@click.argument("private_port", required=False, metavar="[PORT[/PROTO]]")
def port_cmd(container, private_port):
    """List CONTAINER's published ports (or the host address of one of them)."""
    from shim.containers.networking import published_ports

    ports = published_ports(container)
    if private_port:
        port, _, proto = private_port.partition("/")
        ports = [p for p in ports if str(p.container_port) == port and p.protocol == (proto or "tcp")]
        if not ports:
            raise NetworkError(f"no public port {private_port} published for {container}")
        for p in ports:
            click.echo(f"{p.host_ip}:{p.host_port}")
        return
    for p in ports:
        click.echo(f"{p.container_port}/{p.protocol} -> {p.host_ip}:{p.host_port}")


# ---- the flags of run and create -------------------------------------------------------------


def network_options(func):
    """``run``/``create`` flags for networking (docker's names); see :func:`network_request`."""
    options = [
        click.option(
            "--network",
            "--net",
            "network",
            multiple=True,
            metavar="NETWORK",
            help="bridge (default: NAT), none (only lo), host, or a network from "
            "'network create' (repeat to join several; the first gets the ports "
            "and the default route).",
        ),
        click.option(
            "--network-alias",
            multiple=True,
            metavar="NAME",
            help="Another name peers on user networks resolve to this container.",
        ),
        click.option(
            "-p",
            "--publish",
            multiple=True,
            metavar="[IP:][HOST:]PORT[/PROTO]",
            help="Publish a container port on the host, e.g. 127.0.0.1:8080:80.",
        ),
        click.option("-P", "--publish-all", is_flag=True, help="Publish every EXPOSEd port on a free host port."),
        click.option(
            "--expose",
            multiple=True,
            metavar="PORT[/PROTO]",
            help="Expose a port (or a range) in addition to the image's.",
        ),
        click.option("--ip", metavar="IP", help="The address on the first user network."),
        click.option("--mac-address", metavar="MAC", help="The MAC of the first NIC."),
        click.option("--dns", multiple=True, metavar="IP", help="A DNS server."),
        click.option("--dns-search", multiple=True, metavar="DOMAIN", help="A search domain."),
        click.option("--dns-option", multiple=True, metavar="OPT", help="A resolv.conf option."),
        click.option(
            "--add-host",
            multiple=True,
            metavar="NAME:IP",
            help="Add NAME to /etc/hosts (IP may be host-gateway: the host).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def network_request(flags: dict):
    """The :class:`shim.containers.networking.NetworkRequest` of ``run``/``create`` flags.
    Without ``--network``: ``$VMSHIM_DEFAULT_NETWORK``, else the default NAT network."""
    from shim.containers.networking import parse_request

    return parse_request(
        network=list(flags.get("network") or ()),
        aliases=flags.get("network_alias") or (),
        publish=flags.get("publish") or (),
        publish_all=bool(flags.get("publish_all")),
        expose=flags.get("expose") or (),
        ip=flags.get("ip"),
        mac=flags.get("mac_address"),
        dns_servers=flags.get("dns") or (),
        dns_search=flags.get("dns_search") or (),
        dns_options=flags.get("dns_option") or (),
        add_hosts=flags.get("add_host") or (),
    )
