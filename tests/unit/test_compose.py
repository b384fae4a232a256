"""vmshim compose without VMs: malformed files, interpolation, merging, planning, health."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from guest.spec import ProcessSpec
from shim.compose import loader, planner, schema
from shim.compose.errors import ComposeError
from shim.compose.model import load_project, seconds
from shim.containers import health

GOOD_SERVICE = "    image: busybox\n"


def web(keys: str) -> str:
    """A compose file with the one service ``web`` (image busybox) and its further *keys*."""
    return "services:\n  web:\n" + GOOD_SERVICE + keys


# (name, file text, the start of the one-line error)
MALFORMED = [
    ("not a mapping", "- a\n- b\n", "(root): must be a mapping"),
    ("yaml syntax", "services:\n  web:\n    image: [busybox\n", "invalid YAML at line"),
    ("no services", "name: x\n", "(root): services is required"),
    ("services a list", "services:\n  - web\n", "services: must be a mapping"),
    ("no image nor build", "services:\n  web:\n    command: ls\n", "services.web: needs image or build"),
    ("bad port text", web("    ports: ['80:80', 'abc']\n"), "services.web.ports[1]: invalid port 'abc'"),
    ("port out of range", web("    ports: ['70000:80']\n"), "services.web.ports[0]: port 70000"),
    (
        "long port without target",
        web("    ports:\n      - published: 8080\n"),
        "services.web.ports[0]: target is required",
    ),
    ("environment a number", web("    environment: 5\n"), "services.web.environment: must be a mapping or a list"),
    (
        "environment value a list",
        web("    environment:\n      A: [1]\n"),
        "services.web.environment.A: must be a string",
    ),
    ("depends on unknown", web("    depends_on: [db]\n"), "services.web.depends_on.db: service 'db' is not defined"),
    (
        "bad condition",
        "services:\n  db:\n"
        + GOOD_SERVICE
        + "  web:\n"
        + GOOD_SERVICE
        + "    depends_on:\n      db: {condition: service_ready}\n",
        "services.web.depends_on.db.condition: must be one of",
    ),
    (
        "dependency cycle",
        "services:\n  a:\n" + GOOD_SERVICE + "    depends_on: [b]\n  b:\n" + GOOD_SERVICE + "    depends_on: [a]\n",
        "dependency cycle: a -> b -> a",
    ),
    (
        "bad interval",
        web("    healthcheck:\n      test: ['CMD', 'true']\n      interval: soon\n"),
        "services.web.healthcheck.interval: invalid duration 'soon'",
    ),
    (
        "bad healthcheck test",
        web("    healthcheck:\n      test: ['RUN', 'true']\n"),
        "services.web.healthcheck.test[0]: must be CMD, CMD-SHELL or NONE",
    ),
    (
        "replicas a word",
        web("    deploy:\n      replicas: many\n"),
        "services.web.deploy.replicas: must be a whole number",
    ),
    ("negative replicas", web("    deploy:\n      replicas: -1\n"), "services.web.deploy.replicas: must be at least 0"),
    ("bad isolation", web("    isolation: hyperv\n"), "services.web.isolation: must be vm or process"),
    (
        "undefined named volume",
        web("    volumes: ['data:/d']\n"),
        "services.web.volumes[0]: named volume 'data' is not defined",
    ),
    (
        "relative volume target",
        web("    volumes: ['./x:data']\n"),
        "services.web.volumes[0]: invalid volume './x:data': the target must be an absolute path",
    ),
    (
        "undefined network",
        web("    networks: [front]\n"),
        "services.web.networks.front: network 'front' is not defined",
    ),
    ("bad restart", web("    restart: sometimes\n"), "services.web.restart: invalid restart policy 'sometimes'"),
    ("bad memory", web("    mem_limit: lots\n"), "services.web.mem_limit: invalid size 'lots'"),
    ("bad cpus", web("    cpus: fast\n"), "services.web.cpus: must be a number"),
    ("bad signal", web("    stop_signal: SIGFOO\n"), "services.web.stop_signal: unknown signal 'SIGFOO'"),
    ("bad service name", "services:\n  'my web':\n" + GOOD_SERVICE, "services.my web: invalid service name"),
    ("command a mapping", web("    command: {a: b}\n"), "services.web.command: must be a string or a list"),
    ("read_only a word", web("    read_only: maybe\n"), "services.web.read_only: must be true or false"),
    (
        "required variable",
        "services:\n  web:\n    image: ${IMAGE:?set IMAGE}\n",
        "services.web.image: required variable IMAGE is missing a value: set IMAGE",
    ),
    (
        "bad interpolation",
        "services:\n  web:\n    image: busybox\n    command: echo ${A B}\n",
        "services.web.command: invalid interpolation format",
    ),
    ("bad project name", "name: My_App!\nservices:\n  web:\n" + GOOD_SERVICE, "name: invalid project name"),
]


@pytest.fixture
def state_root(tmp_path, monkeypatch):
    root = tmp_path / "state"
    root.mkdir()
    monkeypatch.setenv("VMSHIM_ROOT", str(root))
    monkeypatch.setenv("VMSHIM_RUN", str(tmp_path / "run"))
    monkeypatch.delenv("IMAGE", raising=False)
    return root


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("name,text,error", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_is_refused_with_key_path_and_nothing_created(tmp_path, state_root, name, text, error):
    from shim.cli.main import cli

    project = tmp_path / "app"
    project.mkdir()
    (project / "compose.yaml").write_text(text)
    result = CliRunner().invoke(cli, ["compose", "-f", str(project / "compose.yaml"), "up", "-d"])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert error in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert _all_files(state_root) == []
    assert not (tmp_path / "run").exists() or _all_files(tmp_path / "run") == []


def test_there_are_at_least_fifteen_malformed_cases():
    assert len(MALFORMED) >= 15


def test_unknown_keys_are_warned_not_refused():
    warnings = schema.validate(
        {"services": {"web": {"image": "busybox", "colour": "red", "logging": {}}}, "version": "3.8"}
    )
    assert "services.web.colour: unknown key, ignored" in warnings
    assert "services.web.logging: not supported by vmshim, ignored" in warnings
    assert any(w.startswith("version:") for w in warnings)


# ---- interpolation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("${A}", "a"),
        ("$A", "a"),
        ("x${A}y", "xay"),
        ("$$A", "$A"),
        ("${UNSET:-d}", "d"),
        ("${EMPTY:-d}", "d"),
        ("${EMPTY-d}", ""),
        ("${UNSET-d}", "d"),
        ("${A:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${EMPTY+alt}", "alt"),
        ("${UNSET+alt}", ""),
        ("${UNSET:-${A}}", "a"),
        ("${UNSET}", ""),
        ("${A:?no}", "a"),
    ],
)
def test_interpolation(text, expected):
    env = {"A": "a", "EMPTY": ""}
    assert loader.interpolate_text(text, env, "x") == expected


@pytest.mark.parametrize(
    "text,error",
    [
        ("${UNSET:?need it}", "x: required variable UNSET is missing a value: need it"),
        ("${EMPTY:?}", "required variable EMPTY"),
        ("${UNSET?}", "required variable UNSET"),
        ("$", "invalid interpolation format"),
        ("${1A}", "invalid interpolation format"),
    ],
)
def test_interpolation_errors(text, error):
    with pytest.raises(ComposeError, match=error.replace("?", r"\?")):
        loader.interpolate_text(text, {"EMPTY": ""}, "x")


def test_env_file_and_process_environment(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(
        textwrap.dedent("""\
        # comment
        TAG=1.0
        export NAME="quoted value"
        PORT=8080 # trailing comment
        """)
    )
    (tmp_path / "compose.yaml").write_text(
        textwrap.dedent("""\
        services:
          web:
            image: busybox:${TAG}
            environment:
              N: ${NAME}
            ports: ["${PORT}:80"]
        """)
    )
    monkeypatch.setenv("TAG", "2.0")  # the process's environment wins over .env
    project = load_project(cwd=tmp_path)
    web = project.services["web"]
    assert web.image == "busybox:2.0"
    assert web.environment == ["N=quoted value"]
    assert web.ports == ["8080:80"]
    assert project.name == tmp_path.name.lower().replace(".", "")


# ---- discovery and merging ------------------------------------------------------------------------


def test_discovery_prefers_compose_yaml_and_reads_the_override(tmp_path):
    (tmp_path / "docker-compose.yml").write_text("services:\n  old:\n    image: busybox\n")
    (tmp_path / "compose.yaml").write_text("services:\n  web:\n    image: busybox\n")
    (tmp_path / "compose.override.yaml").write_text("services:\n  web:\n    command: ls\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    files = loader.find_files([], sub)
    assert files == [tmp_path / "compose.yaml", tmp_path / "compose.override.yaml"]
    project = load_project(cwd=sub)
    assert list(project.services) == ["web"]
    assert project.services["web"].command == ["ls"]


def test_no_file_found(tmp_path):
    with pytest.raises(ComposeError, match="no compose file found"):
        loader.find_files([], tmp_path)


def test_overrides_merge_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text(
        textwrap.dedent("""\
        services:
          web:
            image: busybox
            command: ["a", "b"]
            environment: [A=1, B=2]
            ports: ["80:80"]
            volumes: ["./x:/data", "cache:/cache"]
            labels: {one: "1"}
        volumes:
          cache: {}
        """)
    )
    (tmp_path / "b.yaml").write_text(
        textwrap.dedent("""\
        services:
          web:
            command: ["c"]
            environment: {B: "3", C: "4"}
            ports: ["81:81"]
            volumes: ["./y:/data"]
            labels: [two=2]
            deploy: {replicas: 2}
        """)
    )
    (tmp_path / "c.yaml").write_text("services:\n  web:\n    image: busybox:musl\n")
    project = load_project(["a.yaml", "b.yaml", "c.yaml"], cwd=tmp_path)
    web = project.services["web"]
    assert web.image == "busybox:musl"
    assert web.command == ["c"]
    assert dict(e.split("=") for e in web.environment) == {"A": "1", "B": "3", "C": "4"}
    assert web.ports == ["80:80", "81:81"]
    assert web.volumes == ["cache:/cache", "./y:/data"]
    assert web.labels == {"one": "1", "two": "2"}
    assert web.replicas == 2


def test_profiles(tmp_path):
    (tmp_path / "compose.yaml").write_text(
        textwrap.dedent("""\
        services:
          web: {image: busybox}
          debug: {image: busybox, profiles: [dev]}
        """)
    )
    assert list(load_project(cwd=tmp_path).services) == ["web"]
    assert sorted(load_project(cwd=tmp_path, profiles=["dev"]).services) == ["debug", "web"]


def test_merge_rules_unit():
    assert loader.merge({"a": [1, 2]}, {"a": [2, 3]}) == {"a": [1, 2, 3]}
    merged = loader.merge({"services": {"w": {"command": ["x", "y"]}}}, {"services": {"w": {"command": ["z"]}}})
    assert merged["services"]["w"]["command"] == ["z"]


# ---- planning -------------------------------------------------------------------------------------


def _project(tmp_path, text):
    (tmp_path / "compose.yaml").write_text(textwrap.dedent(text))
    return load_project(cwd=tmp_path, project_name="app")


def test_replica_names_labels_aliases_and_options(tmp_path):
    project = _project(
        tmp_path,
        """\
        services:
          worker:
            image: busybox
            command: sleep 100
            deploy: {replicas: 3, resources: {limits: {memory: 64m, cpus: "0.5"}}}
            isolation: process
            healthcheck: {test: "true", interval: 2s, retries: 5}
            volumes: ["data:/data", "./conf:/conf:ro"]
            networks:
              default:
                aliases: [jobs]
        volumes:
          data: {}
        """,
    )
    worker = project.services["worker"]
    options = planner.run_options(project, worker, 2, 3)
    assert options.name == "app-worker-2"
    assert options.isolation == "process"
    assert options.command == ["sleep", "100"]
    assert options.labels[planner.LABEL_PROJECT] == "app"
    assert options.labels[planner.LABEL_SERVICE] == "worker"
    assert options.labels[planner.LABEL_NUMBER] == "2"
    assert options.network.networks == ["app_default"]
    assert options.network.endpoint_config["app_default"]["aliases"] == ["worker", "jobs"]
    assert options.healthcheck == {
        "Test": ["CMD-SHELL", "true"],
        "Interval": 2_000_000_000,
        "Timeout": 30_000_000_000,
        "Retries": 5,
        "StartPeriod": 0,
    }
    sources = {m.target: m.source for m in options.mounts}
    assert sources["/data"] == "app_data"
    assert sources["/conf"] == str((tmp_path / "conf").resolve())
    assert options.resources.memory == 64 << 20


def test_published_port_of_replicas_goes_to_the_balancer(tmp_path):
    project = _project(
        tmp_path,
        """\
        services:
          web:
            image: busybox
            ports: ["8080:80", "9000-9002:90", "7000"]
            deploy: {replicas: 3}
        """,
    )
    web = project.services["web"]
    assert [str(p) for p in planner.balanced_ports(web, 3)] == [
        str(p) for p in __import__("shim.network.ports", fromlist=["x"]).parse_publish("8080:80")
    ]
    assert planner.replica_ports(web, 3, 2) == ["9001:90", "7000"]
    assert planner.replica_ports(web, 1, 1) == ["8080:80", "9000-9002:90", "7000"]
    from shim.compose import balancer

    rules = balancer.rules("app", "web", planner.balanced_ports(web, 3), ["10.0.0.2", "10.0.0.3", "10.0.0.4"])
    assert ("tcp dport 8080 dnat to numgen inc mod 3 map { 0 : 10.0.0.2, 1 : 10.0.0.3, 2 : 10.0.0.4 }:80") in rules


def test_scale_flag_and_container_name_clash(tmp_path):
    assert planner.parse_scale(["worker=5"]) == {"worker": 5}
    with pytest.raises(ComposeError, match="--scale"):
        planner.parse_scale(["worker"])
    project = _project(
        tmp_path,
        """\
        services:
          db: {image: busybox, container_name: thedb}
        """,
    )
    with pytest.raises(ComposeError, match="container_name"):
        planner.replicas(project.services["db"], {"db": 2})


def test_dependency_waves(tmp_path):
    from shim.compose.runner import waves

    project = _project(
        tmp_path,
        """\
        services:
          api: {image: busybox, depends_on: {store: {condition: service_healthy}}}
          store: {image: busybox}
          worker: {image: busybox, depends_on: [api]}
          other: {image: busybox}
        """,
    )
    assert [sorted(s.name for s in w) for w in waves(project.ordered())] == [["other", "store"], ["api"], ["worker"]]


def test_condition_state():
    from types import SimpleNamespace

    from shim.compose.runner import condition_state

    def rec(status, health=None, code=0, check=True):
        return SimpleNamespace(
            name="c",
            status=SimpleNamespace(value=status),
            healthcheck={"Test": ["CMD", "x"]} if check else None,
            state=SimpleNamespace(health={"Status": health} if health else {}, exit_code=code),
        )

    assert condition_state([rec("running")], "service_started") == "ok"
    assert condition_state([rec("running", "starting")], "service_healthy") == "wait"
    assert condition_state([rec("running", "healthy")], "service_healthy") == "ok"
    assert "unhealthy" in condition_state([rec("running", "unhealthy")], "service_healthy")
    assert "no health check" in condition_state([rec("running", check=False)], "service_healthy")
    assert condition_state([rec("exited")], "service_completed_successfully") == "ok"
    assert "exited (3)" in condition_state([rec("exited", code=3)], "service_completed_successfully")


def test_durations():
    assert seconds("1m30s", 0) == 90
    assert seconds("500ms", 0) == 0.5
    assert seconds(None, 7) == 7


# ---- health ----------------------------------------------------------------------------------------


def test_health_state_machine():
    state = {}
    state = health.next_state(state, 1, "no", "t", retries=2, in_start_period=True)
    assert state["Status"] == "starting" and state["FailingStreak"] == 0
    state = health.next_state(state, 0, "ok", "t", retries=2, in_start_period=True)
    assert state["Status"] == "healthy"
    state = health.next_state(state, 1, "x", "t", retries=2, in_start_period=False)
    assert state["Status"] == "healthy" and state["FailingStreak"] == 1
    state = health.next_state(state, 1, "x" * 10000, "t", retries=2, in_start_period=False)
    assert state["Status"] == "unhealthy" and state["FailingStreak"] == 2
    assert len(state["Log"][-1]["Output"]) == health.OUTPUT_LIMIT
    for _ in range(10):
        state = health.next_state(state, 1, "", "t", retries=2, in_start_period=False)
    assert len(state["Log"]) == health.LOG_ENTRIES


def test_health_probe_bounds_hostile_output():
    results = []
    probe = health.Probe(results.append)
    from guest import protocol

    for _ in range(100):
        probe.send(protocol.STDOUT, b"A" * 1000)
    probe.send(protocol.EXIT, code="not a number")
    probe.finish()
    probe.finish()
    assert len(results) == 1
    assert len(probe.output) == health.OUTPUT_LIMIT
    assert probe.code == -1


def test_health_flags():
    check = health.from_flags(
        health_cmd="curl -f localhost",
        health_interval="2s",
        health_timeout="1m30s",
        health_retries=4,
        health_start_period="500ms",
    )
    assert check == {
        "Test": ["CMD-SHELL", "curl -f localhost"],
        "Interval": 2_000_000_000,
        "Timeout": 90_000_000_000,
        "Retries": 4,
        "StartPeriod": 500_000_000,
    }
    assert health.from_flags(no_healthcheck=True) == {"Test": ["NONE"]}
    assert health.from_flags() is None
    from shim.errors import UsageError

    with pytest.raises(UsageError, match="--health-interval"):
        health.from_flags(health_interval="soon")
    with pytest.raises(UsageError, match="conflicts"):
        health.from_flags(no_healthcheck=True, health_cmd="true")
    from shim.containers.run import effective_healthcheck

    image = {"Test": ["CMD", "true"], "Interval": 5}
    assert effective_healthcheck(image, {"Interval": 9}) == {"Test": ["CMD", "true"], "Interval": 9}
    assert effective_healthcheck(image, {"Test": ["NONE"]}) is None
    assert effective_healthcheck(None, None) is None


def test_health_checker_drives_an_exec_through_the_monitor_hooks():
    """A fake monitor with the attributes the checker uses: a probe is exec'd, its exit
    recorded, a stuck probe times out and is killed."""
    from guest import protocol

    class FakeMonitor:
        def __init__(self):
            from types import SimpleNamespace

            self.record = SimpleNamespace(
                token="t",
                process=ProcessSpec(args=["sleep"]),
                healthcheck={"Test": ["CMD", "check"], "Interval": 10**9, "Timeout": 10**9, "Retries": 1},
                state=SimpleNamespace(health={}),
            )
            self.main_running, self.agent = True, object()
            self.pending, self.procs, self.timers, self.sent = {}, {}, [], []

        @property
        def record_if_kept(self):
            return self.record

        def _update(self, change):
            change(self.record)

        def _timer(self, delay, name, func):
            self.timers.append((name, func))

        def _cancel_timers(self, *names):
            self.timers = [t for t in self.timers if t[0] not in names]

        def _new_proc_id(self):
            return 7

        def _to_agent(self, type, payload=b"", **fields):
            self.sent.append((type, fields))

    monitor = FakeMonitor()
    health.start(monitor)
    assert monitor.record.state.health["Status"] == "starting"
    name, run = monitor.timers.pop()
    assert name == "health"
    run()
    assert monitor.sent[-1][0] == protocol.EXEC
    assert monitor.sent[-1][1]["process"]["args"] == ["check"]
    probe = monitor.pending.pop(7)
    probe.send(protocol.EXIT, code=0)
    probe.finish()
    assert monitor.record.state.health["Status"] == "healthy"
    name, run = [t for t in monitor.timers if t[0] == "health"][0]
    monitor.timers.clear()
    run()  # the second probe never answers
    timeout = [t for t in monitor.timers if t[0] == "health-timeout"][0][1]
    timeout()
    assert monitor.sent[-1] == (protocol.SIGNAL, {"id": 7, "signal": 9})
    assert monitor.record.state.health["Status"] == "unhealthy"
    assert "exceeded timeout" in monitor.record.state.health["Log"][-1]["Output"]
    assert 7 not in monitor.pending


def test_ps_shows_health():
    from types import SimpleNamespace

    from shim.containers.listing import status_text
    from shim.containers.state import Status

    record = SimpleNamespace(
        status=Status.RUNNING,
        healthcheck={"Test": ["CMD", "x"]},
        state=SimpleNamespace(started_at="", restarting=False, health={"Status": "healthy"}),
    )
    assert status_text(record).endswith("(healthy)")
    record.state.health = {"Status": "starting"}
    assert status_text(record).endswith("(health: starting)")
    record.healthcheck = None
    assert "(" not in status_text(record)


def test_yaml_size_bound(tmp_path):
    path = tmp_path / "compose.yaml"
    with open(path, "wb") as f:
        f.truncate(loader.MAX_FILE_BYTES + 1)
    with pytest.raises(ComposeError, match="larger than"):
        loader.parse_yaml(path)


def test_yaml_alias_bomb_is_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("services: {}")
    path = tmp_path / "compose.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ComposeError, match="more than"):
        loader.parse_yaml(path)
