"""Published ports: parsing ``-p``/``--expose``/``-P`` and picking host ports.

Grammar (docker's)::

    -p [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTO]
       HOST_PORT and CONTAINER_PORT may be ranges (8000-8009); equal lengths, or a host
       range with one container port (the first free host port of the range is used);
       HOST_PORT empty or missing: a free port is picked; PROTO is tcp (default) or udp.
    --expose PORT[-PORT][/PROTO]     adds to the image's EXPOSE list
    -P                               publishes every exposed port on a free host port

IPv4 host addresses only. How a mapping reaches the container is shim.network.firewall's
business (kernel DNAT); here the mappings are only made concrete.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Iterable, Sequence

from shim.errors import NetworkError

PROTOCOLS = ("tcp", "udp")
ANY_IP = "0.0.0.0"


@dataclass(frozen=True)
class PortMapping:
    """One published port. ``host_port`` 0 means "pick one" (within ``host_range`` when
    that is set) until :func:`assign_host_ports` made it concrete."""

    container_port: int
    protocol: str = "tcp"
    host_ip: str = ANY_IP
    host_port: int = 0
    host_range: tuple[int, int] | None = None

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.container_port}/{self.protocol}"

    def to_dict(self) -> dict:
        data = {
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "container_port": self.container_port,
            "protocol": self.protocol,
        }
        if self.host_range is not None:
            data["host_range"] = list(self.host_range)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PortMapping:
        host_range = data.get("host_range")
        return cls(
            container_port=int(data["container_port"]),
            protocol=data["protocol"],
            host_ip=data["host_ip"],
            host_port=int(data["host_port"]),
            host_range=(int(host_range[0]), int(host_range[1])) if host_range else None,
        )

    def clashes_with(self, other: PortMapping) -> bool:
        """Whether both cannot be published at once (same port and protocol, and the same
        address or one of them on every address)."""
        return (
            self.protocol == other.protocol
            and self.host_port == other.host_port
            and (self.host_ip == other.host_ip or ANY_IP in (self.host_ip, other.host_ip))
        )


def _port(text: str, what: str, spec: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise NetworkError(f"invalid {what} {text!r} in {spec!r}: ports are 1-65535")
    return int(text)


def _range(text: str, what: str, spec: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    start = _port(first, what, spec)
    end = _port(last, what, spec) if sep else start
    if end < start:
        raise NetworkError(f"invalid {what} range {text!r} in {spec!r}: the end is before the start")
    return start, end


def _protocol(text: str, spec: str) -> str:
    proto = text.lower() or "tcp"
    if proto not in PROTOCOLS:
        raise NetworkError(f"invalid protocol {text!r} in {spec!r}: use tcp or udp")
    return proto


def parse_publish(spec: str) -> list[PortMapping]:
    """One ``-p`` value → its mappings (one per container port). Raises NetworkError."""
    if not isinstance(spec, str) or not spec.strip():
        raise NetworkError("invalid -p '': expected [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTO]")
    if spec.startswith("[") or spec.count(":") > 2:
        raise NetworkError(f"invalid -p {spec!r}: IPv6 host addresses are not supported")
    body, _, proto = spec.partition("/")
    protocol = _protocol(proto, spec)
    parts = body.split(":")
    host_ip, host = ANY_IP, ""
    if len(parts) == 3:
        host_ip, host, container = parts
        try:
            host_ip = str(ipaddress.IPv4Address(host_ip or ANY_IP))
        except ValueError:
            raise NetworkError(f"invalid host address {parts[0]!r} in -p {spec!r}: an IPv4 address is needed") from None
    elif len(parts) == 2:
        host, container = parts
    else:
        container = parts[0]
    c_start, c_end = _range(container, "container port", spec)
    count = c_end - c_start + 1
    if not host:
        return [PortMapping(container_port=p, protocol=protocol, host_ip=host_ip) for p in range(c_start, c_end + 1)]
    h_start, h_end = _range(host, "host port", spec)
    if h_end - h_start + 1 == count:
        return [
            PortMapping(container_port=c_start + i, protocol=protocol, host_ip=host_ip, host_port=h_start + i)
            for i in range(count)
        ]
    if count == 1:
        return [PortMapping(container_port=c_start, protocol=protocol, host_ip=host_ip, host_range=(h_start, h_end))]
    raise NetworkError(f"invalid -p {spec!r}: the host and container port ranges differ in length")


def parse_expose(spec: str) -> list[tuple[int, str]]:
    """One ``--expose`` value or image ``ExposedPorts`` key (``80``, ``80/tcp``,
    ``8000-8010/udp``) → ``[(port, protocol)]``. Raises NetworkError."""
    body, _, proto = str(spec).partition("/")
    protocol = _protocol(proto, spec)
    start, end = _range(body, "exposed port", spec)
    return [(p, protocol) for p in range(start, end + 1)]


def exposed_ports(image_config: dict, extra: Sequence[str] = ()) -> list[tuple[int, str]]:
    """The image's ``ExposedPorts`` plus ``--expose`` values, in order, without repeats."""
    out: list[tuple[int, str]] = []
    keys = list((image_config or {}).get("ExposedPorts") or {}) + list(extra)
    for key in keys:
        for item in parse_expose(key):
            if item not in out:
                out.append(item)
    return out


def publish_all(exposed: list[tuple[int, str]]) -> list[PortMapping]:
    """``-P``: every exposed port on a free host port of every address."""
    return [PortMapping(container_port=port, protocol=proto) for port, proto in exposed]


def assign_host_ports(wanted: list[PortMapping], taken: list[PortMapping]) -> list[PortMapping]:
    """Make every mapping concrete: check fixed host ports against *taken* (ours) and
    against sockets bound on this host, and pick free ports for the others.

    Raises NetworkError naming the port that is in use or the range with none free."""
    done: list[PortMapping] = []
    for mapping in wanted:
        busy = list(taken) + done
        if mapping.host_port:
            _check_free(mapping, busy)
            done.append(mapping)
            continue
        candidates: Iterable[int]
        if mapping.host_range is not None:
            candidates = range(mapping.host_range[0], mapping.host_range[1] + 1)
        else:
            candidates = (_ephemeral_port(mapping) for _ in range(50))
        for port in candidates:
            candidate = PortMapping(
                container_port=mapping.container_port,
                protocol=mapping.protocol,
                host_ip=mapping.host_ip,
                host_port=port,
            )
            try:
                _check_free(candidate, busy)
            except NetworkError:
                continue
            done.append(candidate)
            break
        else:
            where = f"{mapping.host_range[0]}-{mapping.host_range[1]}" if mapping.host_range else "the ephemeral range"
            raise NetworkError(
                f"no free host port in {where} on {mapping.host_ip} to "
                f"publish {mapping.container_port}/{mapping.protocol}"
            )
    return done


def _check_free(mapping: PortMapping, busy: list[PortMapping]) -> None:
    for other in busy:
        if mapping.clashes_with(other):
            raise NetworkError(
                f"cannot publish {mapping}: {other.host_ip}:{other.host_port}/"
                f"{other.protocol} is already published by another container"
            )
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((mapping.host_ip, mapping.host_port))
        except OSError as exc:
            if exc.errno == 99:  # EADDRNOTAVAIL
                raise NetworkError(
                    f"cannot publish {mapping}: {mapping.host_ip} is not an address of this host"
                ) from None
            raise NetworkError(
                f"cannot publish {mapping}: {mapping.host_ip}:"
                f"{mapping.host_port}/{mapping.protocol} is in use on this "
                f"host ({exc.strerror})"
            ) from None


def _ephemeral_port(mapping: PortMapping) -> int:
    """A port the kernel considers free on the mapping's address (its ephemeral range)."""
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((mapping.host_ip, 0))
        return sock.getsockname()[1]
