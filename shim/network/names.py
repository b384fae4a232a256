"""Network names every layer needs without the network store: the default network and
the ``--network`` values that are not networks of ours. Kept apart so that reading a
container record (shim.containers.netrequest) does not import the store (about 2 ms of
every CLI command)."""

DEFAULT_NETWORK = "bridge"
PSEUDO_NETWORKS = ("none", "host")
"""Accepted by ``--network`` but not networks of ours: no record, no bridge."""
