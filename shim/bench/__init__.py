"""``vmshim bench``: VM and namespace isolation measured side by side.

Every figure is measured through the CLI as a user runs it (``vmshim run``, ``exec``,
``inspect``, ``rm`` as subprocesses), next to the same figure for ``--isolation process``,
for runc on the same rootfs as an OCI bundle, and for the bare QEMU boot (the floor).

- :mod:`shim.bench.stats`     figures, subjects, medians and ratios (pure, unit-tested)
- :mod:`shim.bench.report`    results.json, the terminal table, the PNG charts
- :mod:`shim.bench.host`      accel, CPU, kernels and tool versions of this host
- :mod:`shim.bench.procmem`   PSS of process trees, /proc/meminfo parsing
- :mod:`shim.bench.drivers`   the subjects: vmshim (vm, process), runc, the floor
- :mod:`shim.bench.workloads` the shell scripts run inside containers, and their parsing
- :mod:`shim.bench.suite`     the benchmarks and the runner (interleaving, cleanup)
- :mod:`shim.bench.engine_net` dockerd's bridge with vmshim-runtime next to runc
- :mod:`shim.bench.engine_daemon` a private dockerd/containerd (also the e2e tests' fixtures)
"""
