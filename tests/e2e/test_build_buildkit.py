"""BuildKit-era Dockerfile syntax with real RUN steps (issue 20): ``# syntax=`` ignored,
heredocs in RUN and COPY."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.conftest import vmshim

SUFFIX = str(os.getpid())

HEREDOCS = """\
# syntax=docker/dockerfile:1.7
FROM busybox
ENV WHO=heredoc
RUN <<EOF
set -e
mkdir -p /out
echo "script ran as $(id -u)" > /out/script
EOF
RUN cat <<'RAW' > /out/raw && cat <<-TABS > /out/tabs
$WHO stays literal
RAW
\tindented $WHO
\tTABS
COPY <<conf.ini /out/
name = $WHO
conf.ini
"""


def text(proc) -> str:
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


@pytest.mark.parametrize("isolation", [pytest.param("vm", marks=pytest.mark.vm), "process"])
def test_heredocs_run_and_copy(isolation, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(HEREDOCS)
    tag = f"vmshim-test/heredoc-{isolation}-{SUFFIX}"
    iidfile = tmp_path / "iid"
    proc = vmshim("build", "--no-cache", "--network", "none", "--isolation", isolation,
                  "--label", "org.example.kind=heredoc", "--iidfile", str(iidfile),
                  "-t", tag, str(ctx), timeout=600)
    assert proc.returncode == 0, text(proc)
    image = json.loads(vmshim("image", "inspect", tag).stdout)
    image = image[0] if isinstance(image, list) else image
    assert iidfile.read_text() == image["Id"]
    assert image["Config"]["Labels"] == {"org.example.kind": "heredoc"}
    run = vmshim("run", "--rm", "--isolation", "process", "--network", "none", tag,
                 "sh", "-c", "cat /out/script /out/raw /out/tabs /out/conf.ini")
    assert run.stdout.decode() == ("script ran as 0\n$WHO stays literal\nindented heredoc\n"
                                   "name = heredoc\n"), text(run)
    vmshim("rmi", tag)
