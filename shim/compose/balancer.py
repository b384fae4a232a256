"""One published port for all replicas of a service: nftables ``numgen`` DNAT.

``deploy.replicas: 3`` with ``ports: ["8080:80"]``: the replicas cannot each take host
port 8080, so none of them publishes it; instead one rule in vmshim's ``publish`` chain
spreads new connections over the replicas' addresses round robin::

    tcp dport 8080 dnat to numgen inc mod 3 map { 0 : 10.89.0.2, 1 : 10.89.0.3,
                                                  2 : 10.89.0.4 }:80
        comment "vmshim-lb:<project>:<service>"

Why the kernel rather than a balancer process: the same reasons as for single published
ports (shim.network.firewall): nothing to keep running, no extra hop, one table to look
at. conntrack keeps a connection on its replica. The rule is rewritten by every ``up``
(``--scale`` included), since the replicas' addresses are given at their start; ``down``
deletes it. Limit: a replica that a restart policy brings back gets a new address, and
the rule follows only at the next ``up``.
"""

from __future__ import annotations

from shim.compose import planner
from shim.errors import NetworkError
from shim.network import firewall
from shim.network.ports import ANY_IP


def comment(project: str, service: str) -> str:
    return f"vmshim-lb:{project}:{service}"


def rules(project: str, service: str, ports, addresses: list[str]) -> str:
    """The nft commands for *ports* (PortMappings) over *addresses*."""
    table, c = firewall.TABLE, f'comment "{comment(project, service)}"'
    targets = ", ".join(f"{i} : {ip}" for i, ip in enumerate(addresses))
    lines = []
    for p in ports:
        match = f"ip daddr {p.host_ip} " if p.host_ip != ANY_IP else ""
        lines.append(
            f"add rule ip {table} publish {match}{p.protocol} dport {p.host_port} "
            f"dnat to numgen inc mod {len(addresses)} map {{ {targets} }}"
            f":{p.container_port} {c}"
        )
    return "\n".join(lines) + "\n"


def replica_addresses(project: str, service: str) -> list[str]:
    """The first-network addresses of the service's running replicas, by number."""
    from shim.network.store import NetworkStore

    store = NetworkStore()
    out = []
    for record in planner.project_containers(project, services=[service]):
        if record.status.value != "running":
            continue
        endpoints = store.endpoints_of(record.id)
        request = record.network
        first = request.networks[0] if request is not None and request.networks else None
        for net, endpoint in endpoints:
            if net.name == first:
                out.append(endpoint.ip)
    return out


def refresh(project: str, service, count: int) -> None:
    """Replace the service's balancer rules with ones over its running replicas (none
    when it has no balanced port). Raises NetworkError."""
    from shim.network.store import NetworkStore

    ports = planner.balanced_ports(service, count)
    with NetworkStore().locked():
        firewall._delete_commented(comment(project, service.name), ("publish",))
        if not ports:
            return
        addresses = replica_addresses(project, service.name)
        if addresses:
            firewall.ensure_table()
            firewall._nft(
                rules(project, service.name, ports, addresses), f"cannot balance ports of service {service.name}"
            )


def remove_project(project: str) -> None:
    """Delete every balancer rule of *project* (``down``)."""
    from shim.network.store import NetworkStore

    prefix = f"vmshim-lb:{project}:"
    with NetworkStore().locked():
        try:
            handles = [r["handle"] for r in firewall._rules("publish") if str(r.get("comment", "")).startswith(prefix)]
        except NetworkError:
            return  # no table here
        if handles:
            firewall._nft(
                "".join(f"delete rule ip {firewall.TABLE} publish handle {h}\n" for h in handles),
                "cannot delete balancer rules",
            )
