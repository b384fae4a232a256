"""``vmshim-runtime``: an OCI runtime (runc's command line) that runs each container of
podman, containerd or Kubernetes in its own microVM.

- :mod:`shim.oci.bundle` reads a bundle's config.json into a vmshim container record
  and says what of it a VM cannot honour;
- :mod:`shim.oci.state` keeps the runtime's containers under ``--root`` and answers
  ``state``;
- :mod:`shim.oci.standin` is the host process whose pid the engine is given: it lives as
  long as the container's process and exits with its status;
- :mod:`shim.oci.runtime` does the operations (create, start, kill, delete, exec …) on
  top of the monitor (shim.containers.monitor), which boots and watches the VM;
- :mod:`shim.oci.hooks` runs the config's hooks on the host.
"""
