import pytest

from shim.containers.options import RunOptions, build_process_spec, merge_env, parse_env_entry, read_env_file
from shim.errors import UsageError

IMAGE_CONFIG = {"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "WorkingDir": "/srv", "User": "1000"}


def spec(**kw):
    return build_process_spec(IMAGE_CONFIG, RunOptions(image="busybox", **kw))


def test_image_defaults_apply():
    s = spec()
    assert s.args == ["sh"] and s.cwd == "/srv" and s.user == "1000"
    assert s.env == ["PATH=/bin", "A=1"]


def test_flags_override_image():
    s = spec(command=["echo", "hi"], env=["A=2", "B=3"], workdir="/tmp", user="0:0")
    assert s.args == ["echo", "hi"] and s.cwd == "/tmp" and s.user == "0:0"
    assert s.env == ["PATH=/bin", "A=2", "B=3"]


def test_entrypoint_resets_image_cmd():
    assert spec(entrypoint="/bin/true").args == ["/bin/true"]
    assert spec(entrypoint="/bin/echo", command=["x"]).args == ["/bin/echo", "x"]


def test_tty_sets_term():
    assert "TERM=xterm" in spec(tty=True).env


@pytest.mark.parametrize("bad", ["", "=x", "A B=1", "=", " =1"])
def test_malformed_env_is_refused(bad):
    with pytest.raises(UsageError, match="invalid -e"):
        parse_env_entry(bad)


def test_env_key_alone_takes_host_value(monkeypatch):
    monkeypatch.setenv("VMSHIM_T", "v")
    monkeypatch.delenv("VMSHIM_MISSING", raising=False)
    assert parse_env_entry("VMSHIM_T") == "VMSHIM_T=v"
    assert parse_env_entry("VMSHIM_MISSING") is None


def test_env_file(tmp_path):
    f = tmp_path / "env"
    f.write_text("# comment\nX=1\n\nY = 2\n")
    with pytest.raises(UsageError, match="line 4"):
        read_env_file(str(f))
    f.write_text("# comment\nX=1\n\nY=a=b\n")
    assert read_env_file(str(f)) == ["X=1", "Y=a=b"]
    with pytest.raises(UsageError, match="cannot read --env-file"):
        read_env_file(str(tmp_path / "nope"))


def test_merge_env_keeps_first_position():
    assert merge_env(["A=1", "B=2"], ["A=3"]) == ["A=3", "B=2"]


def test_bad_options():
    with pytest.raises(UsageError, match="--isolation"):
        RunOptions(image="x", isolation="container")
    with pytest.raises(UsageError, match="-w"):
        RunOptions(image="x", workdir="relative")
    with pytest.raises(UsageError, match="name"):
        RunOptions(image="x", name="bad name")


def test_nothing_to_run():
    with pytest.raises(UsageError, match="no command"):
        build_process_spec({}, RunOptions(image="scratchy"))
