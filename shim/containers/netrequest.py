"""What a container asks of networking (``vmshim run``'s network flags, checked by
shim.containers.networking.parse_request): part of the container's record, so kept apart
from the code that acts on it (which needs the store)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from shim.network.ports import PortMapping, exposed_ports, publish_all
from shim.network.names import DEFAULT_NETWORK, PSEUDO_NETWORKS


@dataclass
class NetworkRequest:
    """The networking flags of ``vmshim run``, checked by :func:`parse_request`. Stored
    with the container (:meth:`to_dict`) and acted on at every start.

    ``endpoint_config`` maps a network name to ``{"aliases": [...], "ip": "..."}``
    (``--network-alias`` and ``--ip`` at run, ``--alias``/``--ip`` of network connect)."""

    networks: list[str] = field(default_factory=lambda: [DEFAULT_NETWORK])
    endpoint_config: dict[str, dict] = field(default_factory=dict)
    publish: list[PortMapping] = field(default_factory=list)
    publish_all: bool = False
    expose: list[str] = field(default_factory=list)
    mac: str | None = None
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    dns_options: list[str] = field(default_factory=list)
    add_hosts: list[tuple[str, str]] = field(default_factory=list)

    @property
    def mode(self) -> str:
        first = self.networks[0] if self.networks else "none"
        return first if first in PSEUDO_NETWORKS else "bridge"

    def aliases_for(self, network: str) -> list[str]:
        return list(self.endpoint_config.get(network, {}).get("aliases", []))

    def ip_for(self, network: str) -> str | None:
        return self.endpoint_config.get(network, {}).get("ip")

    def resolve_exposed(self, image_config: dict | None) -> NetworkRequest:
        """``-P``: add the image's EXPOSEd ports (and ``--expose``) to :attr:`publish`, so
        the stored request no longer needs the image."""
        if not self.publish_all:
            return self
        wanted = list(self.publish) + publish_all(exposed_ports(image_config or {}, self.expose))
        return replace(self, publish=wanted, publish_all=False)

    def to_dict(self) -> dict:
        return {
            "networks": list(self.networks),
            "endpoint_config": {k: dict(v) for k, v in self.endpoint_config.items()},
            "publish": [p.to_dict() for p in self.publish],
            "publish_all": self.publish_all,
            "expose": list(self.expose),
            "mac": self.mac,
            "dns": list(self.dns),
            "dns_search": list(self.dns_search),
            "dns_options": list(self.dns_options),
            "add_hosts": [list(h) for h in self.add_hosts],
        }

    @classmethod
    def from_dict(cls, data: dict) -> NetworkRequest:
        return cls(
            networks=list(data.get("networks") or [DEFAULT_NETWORK]),
            endpoint_config={k: dict(v) for k, v in (data.get("endpoint_config") or {}).items()},
            publish=[PortMapping.from_dict(p) for p in data.get("publish", [])],
            publish_all=bool(data.get("publish_all", False)),
            expose=list(data.get("expose", [])),
            mac=data.get("mac"),
            dns=list(data.get("dns", [])),
            dns_search=list(data.get("dns_search", [])),
            dns_options=list(data.get("dns_options", [])),
            add_hosts=[(h[0], h[1]) for h in data.get("add_hosts", [])],
        )
