"""Validation of a merged compose document: the subset of compose-spec vmshim runs.

Our own checks rather than compose-spec's JSON schema: no maintained PyPI package ships
that schema (docker-compose 1.x's copy stopped at 2021; the ``compose-spec`` bindings
are a one-person 0.x), and a schema validator's messages ("… is not valid under any of
the given schemas") do not say which key to fix. Here every refusal is one line that
starts with the key's path (``services.web.ports[1]: …``); keys that compose-spec
knows but vmshim ignores, and keys nobody knows, are warnings.

Each checker takes ``(value, path)`` and raises ComposeError; a dict of checkers is the
schema of a mapping.
"""

from __future__ import annotations

import re

from shim.compose.errors import ComposeError
from shim.compose.loader import join, type_name

SERVICE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
ENV_KEY = re.compile(r"^[^=\s\x00]+$")
DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$")
SIZE = re.compile(r"^\d+(?:\.\d+)?\s*([bkmg]b?|[kmg]i?b?)?$", re.I)
SIGNAL = re.compile(r"^(?:SIG)?[A-Z0-9+-]+$")
RESTART = ("no", "always", "on-failure", "unless-stopped")
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
PORT_SPEC = re.compile(
    r"^(?:(?:(?P<ip>\[[0-9a-fA-F:.]+\]|[0-9.]+):)?(?P<host>\d+(?:-\d+)?)?:)?"
    r"(?P<container>\d+(?:-\d+)?)(?:/(?P<proto>tcp|udp|sctp))?$"
)


def _mark(func):
    """Flag a checker that takes the warnings list as its third argument."""
    func.wants_warnings = True
    return func


def fail(path: str, message: str):
    raise ComposeError(f"{path}: {message}")


# ---- scalar checkers -------------------------------------------------------------------


def string(value, path):
    if not isinstance(value, str):
        fail(path, f"must be a string, not {type_name(value)}")


def boolean(value, path):
    if not isinstance(value, bool):
        fail(path, f"must be true or false, not {value!r}")


def integer(minimum=None, maximum=None):
    def check(value, path):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            else:
                fail(path, f"must be a whole number, not {value!r}")
        if minimum is not None and value < minimum:
            fail(path, f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            fail(path, f"must be at most {maximum}, not {value}")

    return check


def number(value, path):
    if isinstance(value, bool):
        fail(path, f"must be a number, not {value!r}")
    try:
        if float(value) < 0:
            fail(path, f"must not be negative, not {value!r}")
    except (TypeError, ValueError):
        fail(path, f"must be a number such as 0.5, not {value!r}")


def duration(value, path):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return
    if not isinstance(value, str) or not DURATION.match(value.strip()):
        fail(path, f"invalid duration {value!r}: use e.g. 30s, 1m30s, 500ms")


def size(value, path):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return
    if not isinstance(value, str) or not SIZE.match(value.strip()):
        fail(path, f"invalid size {value!r}: use bytes or a number with b, k, m or g")


def one_of(*choices):
    def check(value, path):
        if value not in choices:
            fail(path, f"must be one of {', '.join(map(str, choices))}, not {value!r}")

    return check


def signal_name(value, path):
    import signal as sig

    text = str(value).upper()
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < sig.NSIG:
        return
    name = text if text.startswith("SIG") else "SIG" + text
    if not isinstance(value, str) or name not in sig.Signals.__members__:
        fail(path, f"unknown signal {value!r}")


def restart(value, path):
    string(value, path)
    policy, _, count = value.partition(":")
    if policy not in RESTART or (count and (policy != "on-failure" or not count.isdigit())):
        fail(path, f"invalid restart policy {value!r}: use no, always, on-failure[:N] or unless-stopped")


# ---- composite checkers -----------------------------------------------------------------


def list_of(item):
    def check(value, path):
        if not isinstance(value, list):
            fail(path, f"must be a list, not {type_name(value)}")
        for index, entry in enumerate(value):
            item(entry, f"{path}[{index}]")

    return check


def string_or_list(value, path):
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        fail(path, f"must be a string or a list of strings, not {type_name(value)}")
    for index, entry in enumerate(value):
        if not isinstance(entry, (str, int, float)) or isinstance(entry, bool):
            fail(f"{path}[{index}]", f"must be a string, not {type_name(entry)}")


def command(value, path):
    if value is None:
        return
    string_or_list(value, path)


def mapping_or_list(value, path):
    """environment/labels/args: ``{K: V}`` (V a scalar or null) or ``["K=V", …]``."""
    if isinstance(value, dict):
        for key, val in value.items():
            if not ENV_KEY.match(key):
                fail(join(path, key), "invalid variable name")
            if isinstance(val, (dict, list)):
                fail(join(path, key), f"must be a string, number, boolean or null, not {type_name(val)}")
        return
    if isinstance(value, list):
        for index, entry in enumerate(value):
            if not isinstance(entry, str):
                fail(f"{path}[{index}]", f"must be a KEY=VALUE string, not {type_name(entry)}")
            if not ENV_KEY.match(entry.partition("=")[0]):
                fail(f"{path}[{index}]", f"invalid entry {entry!r}: expected KEY=VALUE")
        return
    fail(path, f"must be a mapping or a list of KEY=VALUE, not {type_name(value)}")


def mapping(schema: dict, *, required: tuple = (), ignored: tuple = ()):
    """A mapping whose keys are checked by *schema*; *ignored* keys are known to
    compose-spec but not used by vmshim (warned); others are unknown (warned)."""

    def check(value, path, warnings=None):
        if not isinstance(value, dict):
            fail(path, f"must be a mapping, not {type_name(value)}")
        for key in required:
            if key not in value:
                fail(path, f"{key} is required")
        for key, val in value.items():
            where = join(path, key)
            if key.startswith("x-"):
                continue
            if key in schema:
                checker = schema[key]
                if getattr(checker, "wants_warnings", False):
                    checker(val, where, warnings)
                else:
                    checker(val, where)
            elif warnings is not None:
                why = "not supported by vmshim, ignored" if key in ignored else "unknown key, ignored"
                warnings.append(f"{where}: {why}")

    return _mark(check)


def port(value, path):
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            fail(path, f"port {value} is out of range (1-65535)")
        return
    if isinstance(value, dict):
        long_port(value, path)
        return
    if not isinstance(value, str):
        fail(path, f"must be a port spec string or a mapping, not {type_name(value)}")
    match = PORT_SPEC.match(value)
    if not match:
        fail(path, f"invalid port {value!r}: use [[IP:]HOST:]CONTAINER[/PROTOCOL]")
    for part in ("host", "container"):
        for number_text in (match.group(part) or "").split("-"):
            if number_text and not 1 <= int(number_text) <= 65535:
                fail(path, f"port {number_text} in {value!r} is out of range (1-65535)")


def _port_number(value, path):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, str))
        or not str(value).isdigit()
        or not 1 <= int(value) <= 65535
    ):
        fail(path, f"invalid port {value!r}: a number in 1-65535")


def _published(value, path):
    if isinstance(value, str) and re.fullmatch(r"\d+-\d+", value):
        for part in value.split("-"):
            _port_number(part, path)
        return
    _port_number(value, path)


long_port = mapping(
    {
        "target": _port_number,
        "published": _published,
        "host_ip": string,
        "protocol": one_of("tcp", "udp", "sctp"),
        "mode": one_of("host", "ingress"),
        "name": string,
        "app_protocol": string,
    },
    required=("target",),
)


def volume_entry(value, path):
    if isinstance(value, str):
        parts = value.split(":")
        if not parts[-1 if len(parts) == 1 else 1]:
            fail(path, f"invalid volume {value!r}: an empty target")
        if len(parts) > 3:
            fail(path, f"invalid volume {value!r}: use SOURCE:TARGET[:MODE]")
        target = parts[1] if len(parts) > 1 else parts[0]
        if not target.startswith("/"):
            fail(path, f"invalid volume {value!r}: the target must be an absolute path")
        if len(parts) == 3 and not set(parts[2].split(",")) <= {"ro", "rw", "z", "Z", "nocopy"}:
            fail(path, f"invalid volume mode {parts[2]!r}: use ro or rw")
        return
    long_volume(value, path)
    if value.get("type", "volume") != "tmpfs" and not str(value.get("target", "")).startswith("/"):
        fail(join(path, "target"), "must be an absolute path")


long_volume = mapping(
    {
        "type": one_of("volume", "bind", "tmpfs"),
        "source": string,
        "target": string,
        "read_only": boolean,
        "consistency": string,
        "bind": mapping({"create_host_path": boolean}, ignored=("propagation", "selinux")),
        "volume": mapping({"nocopy": boolean}, ignored=("subpath",)),
        "tmpfs": mapping({"size": size, "mode": integer(0, 0o7777)}),
    },
    required=("type", "target"),
)


def names_or_mapping(what: str, config, *, null_config: bool = False):
    """A list of names (*what*) or a mapping from each name to what *config* (a check)
    accepts; a null config is allowed with *null_config*."""

    def check(value, path, warnings=None):
        if isinstance(value, list):
            list_of(string)(value, path)
            return
        if not isinstance(value, dict):
            fail(path, f"must be a list of {what} or a mapping, not {type_name(value)}")
        for name, cfg in value.items():
            if cfg is not None or not null_config:
                config(cfg, join(path, name), warnings)

    return _mark(check)


networks_of_service = names_or_mapping(
    "network names",
    mapping(
        {"aliases": list_of(string), "ipv4_address": string},
        ignored=("ipv6_address", "priority", "link_local_ips", "mac_address", "driver_opts"),
    ),
    null_config=True,
)
depends_on = names_or_mapping(
    "services",
    mapping({"condition": one_of(*CONDITIONS), "restart": boolean, "required": boolean}, required=("condition",)),
)


def healthcheck_test(value, path):
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        fail(path, f"must be a string or a list starting with CMD, CMD-SHELL or NONE, not {type_name(value)}")
    list_of(string)(value, path)
    if value[0] not in ("CMD", "CMD-SHELL", "NONE"):
        fail(f"{path}[0]", f"must be CMD, CMD-SHELL or NONE, not {value[0]!r}")
    if value[0] != "NONE" and len(value) < 2:
        fail(path, f"{value[0]} needs a command")


healthcheck = mapping(
    {
        "test": healthcheck_test,
        "interval": duration,
        "timeout": duration,
        "retries": integer(0),
        "start_period": duration,
        "start_interval": duration,
        "disable": boolean,
    }
)


@_mark
def build(value, path, warnings=None):
    if isinstance(value, str):
        return
    mapping(
        {"context": string, "dockerfile": string, "args": mapping_or_list, "target": string, "labels": mapping_or_list},
        ignored=(
            "cache_from",
            "cache_to",
            "network",
            "shm_size",
            "extra_hosts",
            "platforms",
            "secrets",
            "ssh",
            "tags",
            "pull",
            "no_cache",
            "additional_contexts",
            "dockerfile_inline",
            "isolation",
            "privileged",
            "ulimits",
        ),
    )(value, path, warnings)


resources_limits = mapping({"cpus": number, "memory": size, "pids": integer(-1)})
deploy = mapping(
    {
        "replicas": integer(0, 100),
        "resources": mapping(
            {
                "limits": resources_limits,
                "reservations": mapping({"cpus": number, "memory": size}, ignored=("devices", "generic_resources")),
            }
        ),
        "restart_policy": mapping(
            {"condition": one_of("none", "on-failure", "any"), "max_attempts": integer(0)}, ignored=("delay", "window")
        ),
        "labels": mapping_or_list,
    },
    ignored=("mode", "endpoint_mode", "placement", "update_config", "rollback_config"),
)


def isolation(value, path):
    if value not in ("vm", "process"):
        fail(
            path,
            f"must be vm or process, not {value!r} (vmshim runs each service's "
            "containers in microVMs or as namespaces on the host)",
        )


SERVICE = mapping(
    {
        "image": string,
        "build": build,
        "command": command,
        "entrypoint": command,
        "environment": mapping_or_list,
        "env_file": string_or_list,
        "ports": list_of(port),
        "expose": list_of(lambda v, p: _port_number(str(v).split("/")[0], p)),
        "volumes": list_of(volume_entry),
        "tmpfs": string_or_list,
        "networks": networks_of_service,
        "depends_on": depends_on,
        "healthcheck": healthcheck,
        "restart": restart,
        "deploy": deploy,
        "mem_limit": size,
        "mem_reservation": size,
        "cpus": number,
        "hostname": string,
        "working_dir": string,
        "user": string,
        "labels": mapping_or_list,
        "init": boolean,
        "stop_signal": signal_name,
        "stop_grace_period": duration,
        "read_only": boolean,
        "cap_add": list_of(string),
        "cap_drop": list_of(string),
        "privileged": boolean,
        "isolation": isolation,
        "os": boolean,
        "security_opt": list_of(string),
        "profiles": list_of(string),
        "container_name": string,
        "scale": integer(0, 100),
        "stdin_open": boolean,
        "tty": boolean,
        "pids_limit": integer(-1),
        "dns": string_or_list,
        "dns_search": string_or_list,
        "extra_hosts": mapping_or_list,
        "pull_policy": one_of("always", "never", "missing", "build", "if_not_present"),
    },
    ignored=(
        "logging",
        "ulimits",
        "sysctls",
        "devices",
        "platform",
        "configs",
        "secrets",
        "network_mode",
        "ipc",
        "pid",
        "shm_size",
        "links",
        "external_links",
        "domainname",
        "mac_address",
        "cgroup_parent",
        "oom_score_adj",
        "userns_mode",
        "group_add",
        "labels_file",
        "attach",
        "develop",
        "runtime",
        "storage_opt",
        "volumes_from",
        "extends",
    ),
)

NETWORK = mapping(
    {
        "name": string,
        "external": boolean,
        "internal": boolean,
        "labels": mapping_or_list,
        "driver": one_of("bridge", "default"),
        "ipam": mapping(
            {"config": list_of(mapping({"subnet": string, "gateway": string}, ignored=("ip_range", "aux_addresses")))},
            ignored=("driver", "options"),
        ),
    },
    ignored=("driver_opts", "attachable", "enable_ipv6", "enable_ipv4"),
)
VOLUME = mapping(
    {
        "name": string,
        "external": boolean,
        "labels": mapping_or_list,
        "driver": one_of("local"),
        "driver_opts": mapping({"size": size}, ignored=("type", "o", "device")),
    }
)


def _services(value, path, warnings):
    if not isinstance(value, dict):
        fail(path, f"must be a mapping of service names, not {type_name(value)}")
    for name, service in value.items():
        where = join(path, name)
        if not SERVICE_NAME.match(name):
            fail(where, "invalid service name: use letters, digits, '_', '.', '-'")
        if service is None:
            fail(where, "must be a mapping, not null")
        SERVICE(service, where, warnings)
        if "image" not in service and "build" not in service:
            fail(where, "needs image or build")


def _named(value, path, warnings, schema):
    if not isinstance(value, dict):
        fail(path, f"must be a mapping, not {type_name(value)}")
    for name, config in value.items():
        if not re.match(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$", name):
            fail(join(path, name), "invalid name: use letters, digits, '_', '.', '-'")
        if config is not None:
            schema(config, join(path, name), warnings)


def validate(document: dict) -> list[str]:
    """Check *document* (merged, interpolated). Returns warnings; raises ComposeError
    with the path of the first invalid key. Also checks references between sections
    (depends_on, networks, named volumes) and depends_on cycles."""
    warnings: list[str] = []
    if "services" not in document:
        fail("(root)", "services is required")
    for key in ("services", "networks", "volumes"):
        if key in document and document[key] is None:
            document[key] = {}
    if "version" in document:
        warnings.append("version: the attribute is obsolete, ignored")
    _top_check(document, warnings)
    _check_references(document)
    return warnings


def _top_check(document, warnings):
    schema = {
        "version": lambda v, p: None,
        "name": _project_name,
        "services": _mark(_services),
        "networks": _mark(lambda v, p, w: _named(v, p, w, NETWORK)),
        "volumes": _mark(lambda v, p, w: _named(v, p, w, VOLUME)),
    }
    mapping(schema, ignored=("configs", "secrets", "include"))(document, "", warnings)


def _project_name(value, path):
    string(value, path)
    if not PROJECT_NAME.match(value):
        fail(
            path,
            f"invalid project name {value!r}: lower-case letters, digits, '_', '-', starting with a letter or digit",
        )


def _check_references(document):
    services = document.get("services") or {}
    networks = set((document.get("networks") or {}).keys()) | {"default"}
    volumes = set((document.get("volumes") or {}).keys())
    for name, service in services.items():
        path = f"services.{name}"
        deps = service.get("depends_on") or {}
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                fail(f"{path}.depends_on.{dep}", f"service {dep!r} is not defined")
            if dep == name:
                fail(f"{path}.depends_on.{dep}", "a service cannot depend on itself")
        nets = service.get("networks") or {}
        for net in nets if isinstance(nets, list) else nets.keys():
            if net not in networks:
                fail(f"{path}.networks.{net}", f"network {net!r} is not defined in the top-level networks")
        for index, entry in enumerate(service.get("volumes") or []):
            source = _named_source(entry)
            if source is not None and source not in volumes:
                fail(f"{path}.volumes[{index}]", f"named volume {source!r} is not defined in the top-level volumes")
    _check_cycles(services)


def _named_source(entry) -> str | None:
    """The named volume an entry uses (None: bind, tmpfs or anonymous)."""
    if isinstance(entry, dict):
        if entry.get("type") != "volume" or not entry.get("source"):
            return None
        return entry["source"]
    parts = entry.split(":")
    if len(parts) < 2:
        return None
    source = parts[0]
    if source.startswith(("/", ".", "~")):
        return None
    return source


def _check_cycles(services: dict) -> None:
    def deps(name):
        value = services[name].get("depends_on") or {}
        return list(value if isinstance(value, list) else value.keys())

    state: dict[str, int] = {}

    def visit(name, trail):
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = trail[trail.index(name) :] + [name]
            fail(f"services.{trail[-1]}.depends_on", "dependency cycle: " + " -> ".join(cycle))
        state[name] = 1
        for dep in deps(name):
            visit(dep, trail + [name])
        state[name] = 2

    for name in services:
        visit(name, [])
