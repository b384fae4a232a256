"""Remote hosts over SSH (``vmshim --host ssh://user@host``, contexts).

The local CLI runs the remote host's own ``vmshim`` with the same arguments over an SSH
session (docker's ``-H ssh://`` model), so output and exit codes are the remote CLI's own.
Modules: ``target`` (URLs, contexts; no paramiko), ``ssh`` (connecting, host keys,
authentication), ``control`` (the per-user process that keeps one connection per host and
serves sessions on a unix socket), ``mux`` (the frames between CLI and control process),
``client`` (one command: stdin/stdout/stderr, TTY, resize, signals), ``verbs`` (what each
verb reads or writes locally: build contexts, ``cp``, ``save -o``, ``load -i``).
Only ``target`` and ``hook`` are imported when no remote host is in use.
"""
