"""Remote overhead: `vmshim --host ssh://…` against the local CLI over loopback, for
`run --rm busybox true` and `exec CONTAINER true` (medians, min–max, ratios).

Usage: python benchmarks/remote.py [--runs N] [--json FILE]

It starts a real OpenSSH server on 127.0.0.1 with its own keys and config (tests/sshd.py;
the remote side is this machine's vmshim with the same VMSHIM_ROOT), so the difference is
what the remote path adds: the client's start-up, a channel on the control process's
kept-open connection, sshd's session (fork, shell, exec of the remote vmshim) and the
streams. One warm-up command opens the connection first; the first command's handshake
(without reuse) is timed separately as `connect`. Samples are interleaved local/remote.
Needs what `vmshim run` needs (libvirtd, the guest and busybox images).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from common import VMSHIM, summary_ms as summary, timed, save_json

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> int:
    from tests.sshd import Sshd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    os.chdir(HERE.parent)
    workdir = Path(tempfile.mkdtemp(prefix="vmshim-bench-remote-"))
    sshd = Sshd(workdir)
    sshd.start()
    env = sshd.client_env()
    remote = VMSHIM + ["--host", sshd.url]
    name = f"remote-bench-{os.getpid()}"
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "connect",
            "version_local",
            "ps_local",
            "ps_remote",
            "exec_local",
            "exec_remote",
            "run_local",
            "run_remote",
        )
    }
    try:
        samples["connect"].append(timed(remote + ["ps"], env))  # handshake + probe + command
        subprocess.run(
            VMSHIM + ["run", "-d", "--name", name, "busybox", "sleep", "1000000"], check=True, stdout=subprocess.DEVNULL
        )
        for _ in range(2):
            timed(VMSHIM + ["exec", name, "true"])
            timed(remote + ["exec", name, "true"], env)
        for _ in range(args.runs):
            samples["version_local"].append(timed(VMSHIM + ["--version"]))
            samples["ps_local"].append(timed(VMSHIM + ["ps"]))
            samples["ps_remote"].append(timed(remote + ["ps"], env))
            samples["exec_local"].append(timed(VMSHIM + ["exec", name, "true"]))
            samples["exec_remote"].append(timed(remote + ["exec", name, "true"], env))
            samples["run_local"].append(timed(VMSHIM + ["run", "--rm", "busybox", "true"]))
            samples["run_remote"].append(timed(remote + ["run", "--rm", "busybox", "true"], env))
    finally:
        subprocess.run(VMSHIM + ["rm", "-f", name], stdout=subprocess.DEVNULL)
        sshd.stop_control_processes()
        sshd.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # keys, sshd config, the client's HOME
    results = {key: summary(values) for key, values in samples.items() if values}
    from shim.vm.accel import detect_accel

    accel = detect_accel()
    results["accel"] = {"kind": accel.kind, "reason": accel.reason}
    print(f"accel: {accel.kind.upper()}; over loopback sshd; {args.runs} runs, medians [min–max]")
    for key, label in (
        ("connect", "first remote command (SSH handshake + probe)"),
        ("version_local", "local vmshim --version"),
        ("ps_local", "local vmshim ps"),
        ("ps_remote", "remote vmshim ps"),
        ("exec_local", "local exec CONTAINER true"),
        ("exec_remote", "remote exec CONTAINER true"),
        ("run_local", "local run --rm busybox true"),
        ("run_remote", "remote run --rm busybox true"),
    ):
        r = results[key]
        print(f"  {label:46s} {r['median_ms']:8.1f} ms  [{r['min_ms']:.1f}–{r['max_ms']:.1f}]")
    for what in ("ps", "exec", "run"):
        local, remote_ms = results[f"{what}_local"]["median_ms"], results[f"{what}_remote"]["median_ms"]
        results[f"{what}_overhead"] = {"ms": remote_ms - local, "ratio": remote_ms / local}
        print(f"  {what}: remote − local = {remote_ms - local:7.1f} ms, ratio {remote_ms / local:.2f}x")
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
