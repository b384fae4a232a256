"""A VM container's NICs in a network namespace an engine prepared (vmshim-runtime).

The container record's ``engine_netns`` names two namespaces: ``netns``, the container's
(held by vmshim-runtime's stand-in, or the ``path`` of config.json), and ``host_netns``,
where libvirtd opens taps (the namespace vmshim-runtime was called in). The VM placement
drives one :class:`EngineNetwork` through the VM's life (shim.network.engine_netns does
each step):

- :meth:`prepare` before the domain exists: open both namespaces (so they stay reachable
  whatever happens to the processes that named them), read the engine's interfaces, make
  one tap per interface; returns the guest's network config (same MACs, addresses, MTU,
  default route);
- :meth:`interfaces` for the domain XML;
- :meth:`wire` once the domain runs: taps into the container's namespace, tc redirects;
- :meth:`close` when the VM is gone: taps deleted, namespaces let go of.
"""

from __future__ import annotations

import os

from shim.errors import NetworkError
from shim.network import engine_netns as ens


class EngineNetwork:
    """The engine-prepared network of one container (see the module doc)."""

    def __init__(self, spec: dict, container_id: str):
        self.spec = spec
        self.container_id = container_id
        self.links: list[ens.EngineLink] = []
        self.taps: list[str] = []
        self._fds: dict[str, int] = {}
        self.wired = False

    def path(self, which: str) -> str:
        """A path to namespace *which* (``netns`` or ``host_netns``) that stays valid while
        this object holds it open."""
        return f"/proc/{os.getpid()}/fd/{self._fds[which]}"

    def prepare(self) -> dict:
        """Open the namespaces, read the engine's interfaces and make the taps; return
        BootConfig.network for the guest. Raises NetworkError (nothing is left then)."""
        try:
            for which in ("netns", "host_netns"):
                source = self.spec.get(which)
                if not isinstance(source, str) or not source.startswith("/"):
                    raise NetworkError(f"engine network: {which} is not a path")
                try:
                    self._fds[which] = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise NetworkError(f"cannot open the network namespace {source}: "
                                       f"{exc.strerror}") from None
            self.links = ens.read_links(self.path("netns"))
            for index, _link in enumerate(self.links):
                tap = ens.tap_name(self.container_id, index)
                ens.create_tap(self.path("host_netns"), tap)
                self.taps.append(tap)
        except BaseException:
            self.close()
            raise
        return {"interfaces": [link.guest_interface() for link in self.links]} \
            if self.links else {}

    def interfaces(self) -> list:
        """The domain's NICs: one ethernet interface per tap, with the link's MAC and MTU."""
        from shim.vm.domain import Interface

        return [Interface(type="ethernet", mac=link.mac, tap=tap, mtu=link.mtu)
                for link, tap in zip(self.links, self.taps, strict=True)]

    def wire(self) -> None:
        """After the domain was created: move each tap into the container's namespace and
        redirect its link's traffic to it. Raises NetworkError."""
        for link, tap in zip(self.links, self.taps, strict=True):
            ens.wire(self.path("host_netns"), self.path("netns"), link, tap)
        self.wired = True

    def close(self) -> None:
        """Delete the taps (in either namespace) and close the namespaces. Never raises."""
        for tap in self.taps:
            for which in ("netns", "host_netns"):
                if which in self._fds:
                    ens.remove_tap(self.path(which), tap)
        self.taps = []
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}
