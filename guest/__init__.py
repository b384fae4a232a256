"""The guest side of vmshim: stdlib only, packed into the guest image.

Nothing in this package may import from ``shim`` (the host side); the host imports
``guest.protocol`` and ``guest.runtime`` instead.
"""
