"""Container networks: IPAM, bridges and taps, NAT and published ports, name resolution."""
