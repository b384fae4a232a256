"""``vmshim build``: run a Dockerfile, step by step, into an image in the local store.

The classic docker builder's model: every instruction turns the image so far (its config
and layers) into the next one. RUN runs the command in a fresh container on the layers so
far — a microVM by default — and its filesystem diff becomes a layer (deletions as
whiteouts); COPY and ADD make their layer on the host from the build context, without a
container; WORKDIR adds a layer only when the directory is missing; every other
instruction changes the config only. Each step is cached (:mod:`shim.build.cache`), so an
unchanged rebuild runs nothing and makes nothing.

Step IDs (`` ---> 1a2b3c4d5e6f``) are the config digests of the images after each step; the
last one is the built image's ID. The result is stored like any image (config + manifest
blobs), and named with each ``-t``; without ``-t`` it gets the name
``localhost/vmshim-build@<manifest digest>`` so that it can be run and removed by its ID.

Output goes through a :class:`BuildOutput`; the CLI's prints docker's classic lines.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy as _copy
import datetime as _dt
import hashlib
import json
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from guest.spec import ProcessSpec
from shim.build import copy as copying
from shim.build.cache import BuildCache, cache_key
from shim.build.context import BuildContext, ContextError
from shim.build.dockerfile import (
    HEREDOC,
    Dockerfile,
    DockerfileError,
    Instruction,
    Stage,
    parse,
    parse_duration,
    parse_instruction,
)
from shim.build.errors import BuildError
from shim.build.mounts import parse_mount
from shim.build.mounts import prepare as prepare_mounts
from shim.build.runner import STALE_AGE, RunStepError, StepRunner
from shim.build.tree import LayerWriter, RootView
from shim.containers.resources import DEFAULT_VM_MIB
from shim.build.words import WordError, expand, parse_key_values, split_words
from shim.errors import ImageNotFound, UsageError, VmshimError
from shim.images.reference import parse_reference
from shim.images.store import OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST, ImageStore, canonical_json, host_arch

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ["/bin/sh", "-c"]
UNTAGGED_NAME = "localhost/vmshim-build"
CACHE_COMMENT = "vmshim.build cache-key "
"""How a built image's history entry names its step's cache key (``--cache-from``)."""
MAX_HISTORY = 10_000
ISOLATIONS = ("vm", "process")


@dataclass
class BuildOptions:
    context: Path
    dockerfile: Path | None = None  # default: <context>/Dockerfile; "-": stdin
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    pull: bool = False
    isolation: str = "vm"
    quiet: bool = False
    memory_mib: int = DEFAULT_VM_MIB
    network: str | None = None  # RUN steps' network: None/"default", none, host, NAME
    add_hosts: list[str] = field(default_factory=list)  # NAME:IP for RUN steps' /etc/hosts
    labels: dict[str, str] = field(default_factory=dict)  # --label: on the final image
    secrets: dict[str, Path] = field(default_factory=dict)  # --secret id → file
    jobs: int | None = None  # stages built at once (None: build_jobs())
    cache_from: list[str] = field(default_factory=list)  # images whose history is a cache

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise UsageError(f"invalid --isolation {self.isolation!r}: use vm or process")


@dataclass
class BuildResult:
    image_id: str
    manifest_digest: str
    tags: list[str]


class BuildOutput:
    """What a build reports. This base class reports nothing (library use, tests)."""

    run_fd: int | None = None
    """Where RUN output goes (None: nowhere; it is still kept for error messages)."""

    def step(self, number: int, total: int, text: str) -> None: ...
    def line(self, text: str) -> None: ...
    def status(self, text: str | None) -> None: ...
    def warn(self, text: str) -> None: ...


@dataclass
class ImageState:
    """The image after some step: its full OCI config and its layer descriptors."""

    config: dict
    layers: list[dict]

    @property
    def id(self) -> str:
        return "sha256:" + hashlib.sha256(canonical_json(self.config)).hexdigest()

    @property
    def runtime(self) -> dict:
        return self.config.setdefault("config", {})


def short_id(image_id: str) -> str:
    return image_id.split(":", 1)[-1][:12]


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def env_dict(env: list[str] | None) -> dict[str, str]:
    out = {}
    for entry in env or []:
        key, _, value = entry.partition("=")
        out[key] = value
    return out


def set_env(env: list[str], key: str, value: str) -> list[str]:
    out, done = [], False
    for entry in env or []:
        if entry.partition("=")[0] == key:
            if not done:
                out.append(f"{key}={value}")
                done = True
        else:
            out.append(entry)
    if not done:
        out.append(f"{key}={value}")
    return out


class _StageRun:
    """What is alive while one stage is built."""

    def __init__(self, stage: Stage, state: ImageState):
        self.stage = stage
        self.state = state
        self.args: dict[str, str | None] = {}
        self.cmd_set = False

    def env(self) -> dict[str, str]:
        """Names visible to variable substitution: the stage's ARGs, then ENV over them."""
        out = {k: v for k, v in self.args.items() if v is not None}
        out.update(env_dict(self.state.runtime.get("Env")))
        return out

    def run_args_env(self) -> list[str]:
        """Build args a RUN sees as environment (those ENV does not override)."""
        env = env_dict(self.state.runtime.get("Env"))
        return [f"{k}={v}" for k, v in sorted(self.args.items()) if v is not None and k not in env]


PROXY_ARGS = tuple(
    name
    for base in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
    for name in (base, base.lower())
)
"""docker's predefined build args: given with --build-arg they reach every RUN step's
environment without an ARG, and stay out of the image's history and the cache key."""


def _with_labels(state: ImageState, labels: dict[str, str]) -> ImageState:
    """*state* with *labels* added to its config (``--label``; no history entry, as
    BuildKit does; the same labels on the same image give the same ID)."""
    if not labels:
        return state
    config = _copy.deepcopy(state.config)
    runtime = config.setdefault("config", {})
    runtime["Labels"] = {**(runtime.get("Labels") or {}), **labels}
    return ImageState(config, list(state.layers))


def _run_script(ins: Instruction) -> str:
    """The shell command of a RUN in shell form. With heredocs: ``RUN <<EOF`` alone runs
    the heredoc as the script; ``RUN cmd <<EOF`` hands the command and its heredocs to the
    shell, which feeds them (BuildKit's behaviour)."""
    if not ins.heredocs:
        return ins.rest
    only = HEREDOC.fullmatch(ins.rest.strip())
    if only is not None and len(ins.heredocs) == 1:
        return ins.heredocs[0].content
    return ins.rest + "\n" + "".join(f"{doc.content}{doc.word}\n" for doc in ins.heredocs)


def build_jobs() -> int:
    """How many independent stages a build runs at once: one per core (each RUN step's
    VM has one vCPU), or ``$VMSHIM_BUILD_JOBS``."""
    try:
        return max(1, int(os.environ["VMSHIM_BUILD_JOBS"]))
    except (KeyError, ValueError):
        return max(1, os.cpu_count() or 1)


def _network_request(options: BuildOptions):
    """The RUN steps' network (shim.containers.networking.NetworkRequest), checked
    before any step runs. Raises NetworkError, NetworkNotFound."""
    from shim.containers import networking as netc

    network = None if options.network in (None, "", "default") else options.network
    request = netc.parse_request(network=network, add_hosts=list(options.add_hosts))
    netc.check_networks_exist(request)
    return request


class Builder:
    def __init__(self, options: BuildOptions, output: BuildOutput | None = None, store: ImageStore | None = None):
        self.options = options
        self.out = output or BuildOutput()
        self.store = store or ImageStore()
        self.cache = BuildCache()
        self.runner = StepRunner(
            self.store,
            isolation=options.isolation,
            memory_mib=options.memory_mib,
            status=self.out.status,
            warn=self.out.warn,
            network=_network_request(options),
        )
        self._views: dict[str, RootView] = {}
        self._stages: dict[int, ImageState] = {}  # finished stages by index
        self._stage_names: dict[str, int] = {}
        self._current = threading.local()  # .stage: the index of the stage this thread builds
        self._steps: dict[int, int] = {}  # a stage's first step number
        self._used_args: set[str] = set(PROXY_ARGS)  # predefined: never "not consumed"
        self._global_args: dict[str, str | None] = {}
        self._work: Path | None = None
        self._cache_from: dict = {}
        self._df = "Dockerfile"
        self.escape = "\\"
        self.step_number = 0
        self.total = 0

    # ---- entry point ----------------------------------------------------------------------
    def build(self) -> BuildResult:
        """Run the whole build. Raises BuildError (and subclasses: the Dockerfile, a
        context path, a failing RUN), ImageNotFound, VmshimError. Nothing is tagged and
        no VM is left when it fails; finished steps stay in the build cache."""
        opts = self.options
        dockerfile = self._read_dockerfile()
        self.context = BuildContext(opts.context)
        last = len(dockerfile.stages) - 1
        if opts.target is not None:
            last = dockerfile.stage_index(opts.target)
        stages = dockerfile.stages[: last + 1]
        self.total = sum(1 + len(s.instructions) for s in stages)
        self.escape = dockerfile.escape
        self._df = dockerfile.path
        self._global_args = self._declare_global_args(dockerfile)
        if opts.cache_from and not opts.no_cache:
            self._cache_from = self._load_cache_from()
        tmp_root = self.store.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        for stale in tmp_root.glob("build-*"):  # left by builds that were killed
            if time.time() - stale.stat().st_mtime > STALE_AGE:
                shutil.rmtree(stale, ignore_errors=True)
        self._work = Path(tempfile.mkdtemp(dir=tmp_root, prefix="build-"))
        try:
            with self.store.writing():
                self._build_stages(stages)
                final = self._stages[last]
                result = self._commit(_with_labels(final, opts.labels))
        finally:
            self.out.status(None)
            shutil.rmtree(self._work, ignore_errors=True)
        unused = sorted(set(opts.build_args) - self._used_args)
        if unused:
            self.out.warn(f"One or more build-args [{' '.join(unused)}] were not consumed")
        return result

    def _read_dockerfile(self) -> Dockerfile:
        opts = self.options
        if opts.dockerfile is not None and str(opts.dockerfile) == "-":
            return parse(sys.stdin.buffer.read(), "Dockerfile (stdin)")
        path = Path(opts.dockerfile) if opts.dockerfile is not None else Path(opts.context) / "Dockerfile"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BuildError(f"cannot find the Dockerfile {path}") from None
        except OSError as exc:
            raise BuildError(f"cannot read the Dockerfile {path}: {exc.strerror}") from None
        return parse(data, str(path if opts.dockerfile is not None else "Dockerfile"))

    def _declare_global_args(self, dockerfile: Dockerfile) -> dict[str, str | None]:
        values: dict[str, str | None] = {}
        for ins in dockerfile.global_args:
            for word in split_words(ins.rest, dockerfile.escape):
                name, sep, default = word.partition("=")
                self._used_args.add(name)
                if name in self.options.build_args:
                    values[name] = self.options.build_args[name]
                elif sep:
                    values[name] = self._expand(default, {k: v for k, v in values.items() if v is not None}, ins)
                else:
                    values[name] = None
        return values

    # ---- stages ---------------------------------------------------------------------------
    def _scratch(self) -> Path:
        """The build's private scratch directory (made by :meth:`build` for its run)."""
        assert self._work is not None, "used outside build()"
        return self._work

    def _build_stages(self, stages: list[Stage]) -> None:
        """Build *stages* into ``self._stages``: one after the other, or, when the machine
        has cores for more than one step at a time, every stage whose dependencies
        (:meth:`_dependencies`) are built runs in a thread of its own, lowest index
        first. The first failure stops new stages from starting and is raised once the
        running ones ended."""
        number = 1
        for stage in stages:
            self._steps[stage.index] = number
            number += 1 + len(stage.instructions)
            if stage.name is not None:
                self._stage_names[stage.name] = stage.index
        deps = {stage.index: self._dependencies(stage) for stage in stages}
        jobs = self.options.jobs or build_jobs()
        if jobs <= 1 or all(deps[s.index] >= set(range(s.index)) for s in stages):
            for stage in stages:  # a chain: nothing could run beside anything
                self._stages[stage.index] = self._build_stage(stage)
            return
        pending = [stage.index for stage in stages]
        running: dict[concurrent.futures.Future, int] = {}
        failure: BaseException | None = None
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="stage") as pool:
            while pending or running:
                while failure is None and pending and len(running) < jobs:
                    ready = [i for i in pending if deps[i] <= self._stages.keys()]
                    if not ready:
                        break
                    pending.remove(ready[0])
                    running[pool.submit(self._build_stage, stages[ready[0]])] = ready[0]
                if not running:
                    break
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    index = running.pop(future)
                    try:
                        self._stages[index] = future.result()
                    except BaseException as exc:  # noqa: B036 (re-raised below)
                        failure = failure or exc
        if failure is not None:
            raise failure

    def _dependencies(self, stage: Stage) -> set[int]:
        """The earlier stages *stage* uses: its FROM, ``COPY/ADD --from`` and ``RUN
        --mount=…,from=``. A name with a variable in it may be any of them."""
        names = [stage.base]
        for ins in stage.instructions:
            if ins.keyword in ("COPY", "ADD") and "from" in ins.flags:
                names.append(ins.flags["from"])
            elif ins.keyword == "RUN" and "mount" in ins.flags:
                for spec in ins.flags["mount"].split("\n"):
                    for item in spec.split(","):
                        key, _, value = item.partition("=")
                        if key.strip().lower() == "from":
                            names.append(value)
        out: set[int] = set()
        for name in names:
            if "$" in name:
                return set(range(stage.index))
            lowered = name.lower()
            index = self._stage_names.get(lowered)
            if index is None and lowered.isdigit():
                index = int(lowered)
            if index is not None and index < stage.index:
                out.add(index)
        return out

    def _build_stage(self, stage: Stage) -> ImageState:
        self._current.stage = stage.index
        self._current.step = self._steps.get(stage.index, 1) - 1
        self._next_step(stage.from_)
        env = {k: v for k, v in self._global_args.items() if v is not None}
        base_ref = self._expand(stage.base, env, stage.from_)
        platform = stage.from_.flag("platform")
        if platform and self._expand(platform, env, stage.from_).split("/")[-1] not in (host_arch(), "linux"):
            raise BuildError(
                f"{self._df}:{stage.from_.line}: FROM --platform={platform}: only "
                f"linux/{host_arch()} images can be built here"
            )
        state = self._base_state(base_ref, stage.from_)
        run = _StageRun(stage, state)
        triggers = list(state.runtime.get("OnBuild") or [])
        if triggers:
            state.runtime.pop("OnBuild", None)
            self.out.line(f"# Executing {len(triggers)} build trigger{'s' if len(triggers) != 1 else ''}")
            for text in triggers:
                keyword, _, value = str(text).strip().partition(" ")
                ins = parse_instruction(
                    keyword.upper(), value, stage.from_.line, "ONBUILD trigger", self.escape, nested=True
                )
                self._execute(run, ins)
        self.out.line(f" ---> {short_id(run.state.id)}")
        for ins in stage.instructions:
            self._next_step(ins)
            self._execute(run, ins)
            self.out.line(f" ---> {short_id(run.state.id)}")
        return run.state

    def _next_step(self, ins: Instruction) -> None:
        self._current.step += 1
        self.step_number = self._current.step
        self.out.step(self._current.step, self.total, ins.text)

    def _earlier_stage(self, name: str) -> int | None:
        """The index of the stage *name* (a name or a number) if it comes before the one
        this thread builds (later ones are image names, as docker reads them)."""
        lowered = name.lower()
        index = self._stage_names.get(lowered)
        if index is None and lowered.isdigit():
            index = int(lowered)
        current = getattr(self._current, "stage", None)
        if index is None or (current is not None and index >= current):
            return None
        return index

    def _base_state(self, ref: str, ins: Instruction) -> ImageState:
        if ref.lower() == "scratch":
            return ImageState(
                {
                    "architecture": host_arch(),
                    "os": "linux",
                    "config": {"Env": [f"PATH={DEFAULT_PATH}"]},
                    "rootfs": {"type": "layers", "diff_ids": []},
                    "history": [],
                },
                [],
            )
        index = self._earlier_stage(ref)
        if index is not None and not ref.isdigit():
            return _copy.deepcopy(self._stages[index])
        image = self._resolve_image(ref, ins)
        config = _copy.deepcopy(image.config)
        config.setdefault("config", {})
        config.setdefault("history", [])
        config["rootfs"] = {"type": "layers", "diff_ids": [l.diff_id for l in image.layers]}
        for key in ("container", "container_config", "docker_version"):
            config.pop(key, None)
        layers = [{"mediaType": l.media_type, "digest": l.digest, "size": l.size} for l in image.layers]
        if any(d is None for d in config["rootfs"]["diff_ids"]):
            raise BuildError(f"image {ref} lacks diff_ids in its config; cannot build on it")
        return ImageState(config, layers)

    def _resolve_image(self, ref: str, ins: Instruction):
        """The image *ref* from the store; pulled first with --pull, or when missing."""
        try:
            parse_reference(ref)
        except VmshimError as exc:
            raise BuildError(f"{self._df}:{ins.line}: {exc}") from None
        local = None
        try:
            local = self.store.resolve(ref)
        except ImageNotFound:
            pass
        if local is not None and not self.options.pull:
            return local
        from shim.images.distribution import pull  # always shipped (shim.images.archive imports it)

        self.out.status(f"pulling {ref}")
        try:
            if self.options.pull:
                pull(ref, store=self.store)
            else:
                with _single_attempt():
                    pull(ref, store=self.store)
        except VmshimError as exc:
            if local is None:
                try:
                    self.store.resolve(ref)
                except ImageNotFound as missing:
                    raise BuildError(f"{self._df}:{ins.line}: {missing} (pulling it failed: {exc})") from None
            raise BuildError(f"--pull: cannot pull {ref}: {exc}") from None
        finally:
            self.out.status(None)
        return self.store.resolve(ref)

    # ---- instructions ---------------------------------------------------------------------
    def _expand(self, word: str, env: dict, ins: Instruction) -> str:
        try:
            return expand(word, env, self.escape)
        except WordError as exc:
            raise DockerfileError(f"{self._df}:{ins.line}: {ins.keyword}: {exc}") from None

    def _words(self, run: _StageRun, ins: Instruction) -> list[str]:
        env = run.env()
        raw = ins.json if ins.json is not None else split_words(ins.rest, self.escape)
        if ins.json is not None:
            return [self._expand_json(a, env, ins) for a in raw]
        return [self._expand(w, env, ins) for w in raw]

    def _expand_json(self, arg: str, env: dict, ins: Instruction) -> str:
        """Exec-form arguments of COPY/ADD/VOLUME: variables substituted, no quote removal."""
        try:
            return expand(arg.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"'), env, "\\")
        except WordError as exc:
            raise DockerfileError(f"{self._df}:{ins.line}: {ins.keyword}: {exc}") from None

    def _shell(self, run: _StageRun) -> list[str]:
        return list(run.state.runtime.get("Shell") or DEFAULT_SHELL)

    def _execute(self, run: _StageRun, ins: Instruction) -> None:
        handler = getattr(self, f"_do_{ins.keyword.lower()}")
        handler(run, ins)

    def _cached(self, run: _StageRun, key: str, change=None, whole=None) -> bool:
        """Take the step's result from the build cache, or (*replay*) from a --cache-from
        image's history entry with the same key: the parent's config with that entry, its
        layer, *change* (the step's change of the runtime config) and *whole* (its change
        of the whole config) gives exactly the image the step made there."""
        if self.options.no_cache:
            return False
        hit = self.cache.get(key, self.store)
        if hit is None:
            found = self._cache_from.get(key)
            if found is None:
                return False
            entry, layer, diff_id = found
            config = _copy.deepcopy(run.state.config)
            layers = list(run.state.layers)
            if layer is not None:
                layers.append(dict(layer))
                config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
                config["rootfs"].setdefault("diff_ids", []).append(diff_id)
            if change is not None:
                change(config.setdefault("config", {}))
            if whole is not None:
                whole(config)
            config["created"] = entry["created"]
            config.setdefault("history", []).append(dict(entry))
            hit = (config, layers)
            self.cache.put(key, config, layers)
        run.state = ImageState(hit[0], hit[1])
        self.out.line(" ---> Using cache")
        return True

    def _load_cache_from(self) -> dict[str, tuple[dict, dict | None, str | None]]:
        """{cache key: (history entry, layer descriptor or None, diff_id)} of the
        ``--cache-from`` images' history entries that carry a key (builds by vmshim).
        An image that is not stored is pulled once; one that cannot be had is a warning,
        as with docker."""
        index: dict[str, tuple[dict, dict | None, str | None]] = {}
        for ref in self.options.cache_from:
            try:
                image = self.store.resolve(ref)
            except ImageNotFound:
                try:
                    from shim.images.distribution import pull

                    with _single_attempt():
                        pull(ref, store=self.store)
                    image = self.store.resolve(ref)
                except (ImportError, VmshimError) as exc:
                    self.out.warn(f"--cache-from {ref}: not used: {exc}")
                    continue
            history = image.config.get("history")
            if not isinstance(history, list):
                continue
            history = history[:MAX_HISTORY]
            if not all(isinstance(entry, dict) for entry in history):
                continue
            layers = list(image.layers)
            # the entries that made layers made the last ones (a base may lack history)
            at = len(layers) - sum(1 for e in history if e.get("empty_layer") is not True)
            if at < 0:
                continue
            for entry in history:
                empty = entry.get("empty_layer") is True
                layer = None
                if not empty:
                    if at >= len(layers):
                        break
                    layer = layers[at]
                    at += 1
                comment = entry.get("comment")
                if not (
                    isinstance(comment, str)
                    and comment.startswith(CACHE_COMMENT)
                    and isinstance(entry.get("created"), str)
                ):
                    continue
                key = comment[len(CACHE_COMMENT) :]
                if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
                    continue
                desc = (
                    None
                    if layer is None
                    else {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                )
                index.setdefault(key, (entry, desc, None if layer is None else layer.diff_id))
        return index

    def _metadata(self, run: _StageRun, ins: Instruction, created_by: str, change, inputs=None) -> None:
        """A config-only step: apply *change* (a function of the runtime config)."""
        key = cache_key(run.state.id, created_by, inputs)
        if self._cached(run, key, change):
            return
        config = _copy.deepcopy(run.state.config)
        change(config.setdefault("config", {}))
        now = now_rfc3339()
        config["created"] = now
        config.setdefault("history", []).append(
            {"created": now, "created_by": created_by, "empty_layer": True, "comment": CACHE_COMMENT + key}
        )
        run.state = ImageState(config, list(run.state.layers))
        self.cache.put(key, run.state.config, run.state.layers)

    def _add_layer(
        self, run: _StageRun, layer: Path | None, digest: str | None, created_by: str, key: str, change=None
    ) -> None:
        config = _copy.deepcopy(run.state.config)
        layers = list(run.state.layers)
        now = now_rfc3339()
        entry: dict[str, str | bool] = {"created": now, "created_by": created_by, "comment": CACHE_COMMENT + key}
        if layer is not None:
            with open(layer, "rb") as f:
                stored = self.store.put_blob(f, expected_digest=None)
            if stored != digest:
                raise BuildError(f"layer digest changed while storing it ({digest} → {stored})")
            size = layer.stat().st_size
            layer.unlink()
            layers.append({"mediaType": OCI_LAYER_TAR, "digest": stored, "size": size})
            config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
            config["rootfs"].setdefault("diff_ids", []).append(stored)
        else:
            entry["empty_layer"] = True
        if change is not None:
            change(config.setdefault("config", {}))
        config["created"] = now
        config.setdefault("history", []).append(entry)
        run.state = ImageState(config, layers)
        self.cache.put(key, run.state.config, run.state.layers)

    def _view(self, state: ImageState) -> RootView:
        view = self._views.get(state.id)
        if view is None:
            if state.layers:
                self.out.status("reading the image's file list")
            view = RootView.of(self.store, state.layers)
            self._views[state.id] = view
            self.out.status(None)
        return view

    # RUN -----------------------------------------------------------------------------------
    def _do_run(self, run: _StageRun, ins: Instruction) -> None:
        if ins.json is not None:
            args = list(ins.json)
        else:
            args = self._shell(run) + [_run_script(ins)]
        build_env = run.run_args_env()
        mount_specs = [
            parse_mount(spec, f"{self._df}:{ins.line}") for spec in ins.flags.get("mount", "").split("\n") if spec
        ]
        created_by = " ".join(args)
        if mount_specs:  # ids and targets only: a secret's content is never in the key
            created_by = " ".join(f"--mount={spec}" for spec in ins.flags["mount"].split("\n")) + " " + created_by
        if build_env:
            created_by = f"|{len(build_env)} {' '.join(build_env)} {created_by}"
        binds = [self._bind_source(fields, ins) for fields in mount_specs if fields["type"] == "bind"]
        key = cache_key(run.state.id, created_by, {"binds": binds} if binds else None)
        if self._cached(run, key):
            return
        cfg = run.state.runtime
        env = list(cfg.get("Env") or [f"PATH={DEFAULT_PATH}"])
        for entry in build_env:
            env.append(entry)
        from shim.containers.options import confinement

        capabilities, seccomp, _nnp = confinement()  # docker build: the run defaults
        declared = {entry.partition("=")[0] for entry in build_env}
        for name in PROXY_ARGS:  # docker's predefined args: in the step, not in its history
            if name in self.options.build_args and name not in declared:
                env.append(f"{name}={self.options.build_args[name]}")
        process = ProcessSpec(
            args=args,
            env=env,
            cwd=cfg.get("WorkingDir") or "/",
            user=cfg.get("User") or "",
            capabilities=capabilities,
            seccomp=seccomp,
        )
        base = self._view(run.state)
        holder: dict = {}

        def announce(container_id: str) -> None:
            holder["id"] = container_id
            self.out.line(f" ---> Running in {container_id[:12]}")

        run_fd = self.out.run_fd
        sink = None
        if run_fd is None:
            sink = open(os.devnull, "wb")
            run_fd = sink.fileno()
        mounts = None
        try:
            if mount_specs:
                mounts = prepare_mounts(
                    mount_specs,
                    isolation=self.options.isolation,
                    secrets=self.options.secrets,
                    workdir=cfg.get("WorkingDir") or "/",
                    scratch_dir=self._scratch(),
                )
            result = self.runner.run(run.state.layers, process, base, out_fd=run_fd, announce=announce, mounts=mounts)
        except RunStepError as exc:
            if self.out.run_fd is None and exc.output:
                self.out.warn("output of the failed step:\n" + exc.output.decode(errors="replace").rstrip())
            if "id" in holder:
                self.out.line(f"Removing intermediate container {holder['id'][:12]}")
            raise
        finally:
            if sink is not None:
                sink.close()
            if mounts is not None:
                mounts.cleanup()
        self.out.line(f"Removing intermediate container {result.container_id[:12]}")
        self._add_layer(run, result.layer, result.digest, created_by, key)

    def _bind_source(self, fields: dict, ins: Instruction) -> list:
        """Plan what a ``RUN --mount=type=bind`` shows (the context's, a stage's or an
        image's file or directory) into *fields* for shim.build.mounts.prepare; returns
        its cache-key material (the context files' digests; for a stage or an image, its
        ID and the path). Raises ContextError, BuildError."""
        what = f"{self._df}:{ins.line}: RUN --mount type=bind"
        source = fields["source"]
        if "from" in fields:
            state = self._from_source(fields["from"], ins)
            view = self._view(state)
            fields["plans"] = copying.plan_image(view, [source], what, fields["from"])
            fields["open_many"] = view.open_many
            return [state.id, source]
        plans = copying.plan_context(self.context, [source], what)
        fields["plans"] = plans
        return [p.key() for p in plans]

    # COPY / ADD ----------------------------------------------------------------------------
    def _do_copy(self, run: _StageRun, ins: Instruction) -> None:
        self._copy_or_add(run, ins, add=False)

    def _do_add(self, run: _StageRun, ins: Instruction) -> None:
        self._copy_or_add(run, ins, add=True)

    def _copy_or_add(self, run: _StageRun, ins: Instruction, add: bool) -> None:
        what = ins.keyword
        words = self._words(run, ins)
        sources, dest = words[:-1], words[-1]
        env = run.env()
        flags = {k: self._expand(v, env, ins) for k, v in ins.flags.items()}
        chmod = copying.parse_chmod(flags["chmod"]) if "chmod" in flags else None
        workdir = run.state.runtime.get("WorkingDir") or "/"
        source_view = None
        from_id = None
        try:
            if "from" in flags:
                from_state = self._from_source(flags["from"], ins)
                from_id = from_state.id
                source_view = self._view(from_state)
                plans = copying.plan_image(source_view, sources, what, flags["from"])
            elif flags.get("parents", "false").lower() not in ("false", "0"):
                plans = copying.plan_context(self.context, sources, what, parents=True)
            else:
                plans = []
                for src in sources:
                    doc = ins.heredoc(src)
                    if doc is not None:  # COPY <<EOF FILE: the heredoc is the file
                        content = self._expand(doc.content, env, ins) if doc.expand else doc.content
                        plans.append(copying.plan_inline(doc.word, content.encode()))
                    elif add and src.startswith(("http://", "https://")):
                        self.out.status(f"downloading {src}")
                        fetched = copying.plan_url(src, self._scratch(), what)
                        self.out.status(None)
                        if "checksum" in flags:
                            copying.check_checksum(fetched, flags["checksum"], what)
                        plans += fetched
                    elif src.startswith(("http://", "https://", "git@")) or src.endswith(".git"):
                        raise ContextError(
                            f"{what} failed: {src}: COPY takes files from the build context; use ADD for URLs"
                        )
                    else:
                        plans += copying.plan_context(self.context, [src], what, extract=add)
        except ContextError as exc:
            raise type(exc)(f"{self._df}:{ins.line}: {exc}") from None
        multiple = len(plans) > 1 or any(copying.has_wildcard(s) for s in sources)
        created_by = f"{what} " + " ".join([f"--{k}={v}" for k, v in sorted(flags.items())] + sources + [dest])
        inputs = {"workdir": workdir, "from": from_id, "plans": [p.key() for p in plans]}
        key = cache_key(run.state.id, created_by, inputs)
        if self._cached(run, key):
            return
        view = self._view(run.state)
        chown = None
        if "chown" in flags:
            try:
                chown = copying.parse_chown(flags["chown"], view)
            except copying.CopyError as exc:
                raise copying.CopyError(f"{self._df}:{ins.line}: {exc}") from None
        layer = self._scratch() / f"copy-layer-{run.stage.index}.tar"
        writer = LayerWriter(layer)
        try:
            count = copying.write_layer(
                writer,
                view,
                plans,
                dest,
                workdir,
                chown=chown,
                chmod=chmod,
                what=what,
                multiple=multiple,
                open_view_files=source_view.open_many if source_view is not None else None,
            )
            digest = writer.close()
        except copying.CopyError as exc:
            writer.abort()
            raise copying.CopyError(f"{self._df}:{ins.line}: {exc}") from None
        except BaseException:
            writer.abort()
            raise
        if count == 0 and not plans:
            layer.unlink()
            self._add_layer(run, None, None, f"/bin/sh -c #(nop) {created_by}", key)
        else:
            self._add_layer(run, layer, digest, f"/bin/sh -c #(nop) {created_by}", key)

    def _from_source(self, name: str, ins: Instruction) -> ImageState:
        index = self._earlier_stage(name)
        if index is not None:
            return self._stages[index]
        if name.isdigit():
            raise BuildError(f"{self._df}:{ins.line}: {ins.keyword} --from={name}: there is no earlier stage {name}")
        return self._base_state(name, ins)

    # WORKDIR -------------------------------------------------------------------------------
    def _do_workdir(self, run: _StageRun, ins: Instruction) -> None:
        value = self._expand(ins.rest, run.env(), ins)
        current = run.state.runtime.get("WorkingDir") or "/"
        path = posixpath.normpath(posixpath.join(current, value))
        if not path.startswith("/"):
            path = "/" + path
        created_by = f"WORKDIR {path}"
        key = cache_key(run.state.id, created_by)

        def change(cfg: dict) -> None:
            cfg["WorkingDir"] = path

        if self._cached(run, key, change):
            return

        view = self._view(run.state)
        if view.is_dir(path):
            self._metadata(run, ins, f"/bin/sh -c #(nop) {created_by}", change)
            return
        layer = self._scratch() / f"workdir-layer-{run.stage.index}.tar"
        writer = LayerWriter(layer)
        try:
            copying.write_layer(
                writer,
                view,
                [copying.SourcePlan("dir", "", [])],
                path,
                "/",
                chown=None,
                chmod=None,
                what="WORKDIR",
                multiple=False,
            )
            digest = writer.close()
        except copying.CopyError as exc:
            writer.abort()
            raise copying.CopyError(f"{self._df}:{ins.line}: {exc}") from None
        self._add_layer(run, layer, digest, f"/bin/sh -c #(nop) {created_by}", key, change)

    # config-only instructions --------------------------------------------------------------
    def _do_env(self, run: _StageRun, ins: Instruction) -> None:
        env = run.env()
        pairs = []
        for key, raw in parse_key_values(ins.rest, "ENV", self.escape):
            name = self._expand(key, env, ins)
            value = self._expand(raw, env, ins)
            pairs.append((name, value))  # all values see the env before this line (docker)
        created_by = "ENV " + " ".join(f"{k}={v}" for k, v in pairs)

        def change(cfg: dict) -> None:
            for name, value in pairs:
                cfg["Env"] = set_env(cfg.get("Env") or [], name, value)

        self._metadata(run, ins, f"/bin/sh -c #(nop)  {created_by}", change)

    def _do_label(self, run: _StageRun, ins: Instruction) -> None:
        env = run.env()
        pairs = [
            (self._expand(k, env, ins), self._expand(v, env, ins))
            for k, v in parse_key_values(ins.rest, "LABEL", self.escape)
        ]

        def change(cfg: dict) -> None:
            labels = dict(cfg.get("Labels") or {})
            labels.update(pairs)
            cfg["Labels"] = labels

        text = " ".join(f"{k}={json.dumps(v)}" for k, v in pairs)
        self._metadata(run, ins, f"/bin/sh -c #(nop)  LABEL {text}", change)

    def _do_maintainer(self, run: _StageRun, ins: Instruction) -> None:
        author = self._expand(ins.rest, run.env(), ins)
        key = cache_key(run.state.id, f"MAINTAINER {author}")

        def whole(config: dict) -> None:
            config["author"] = author

        if self._cached(run, key, whole=whole):
            return
        config = _copy.deepcopy(run.state.config)
        whole(config)
        now = now_rfc3339()
        config["created"] = now
        config.setdefault("history", []).append(
            {
                "created": now,
                "created_by": f"/bin/sh -c #(nop)  MAINTAINER {author}",
                "empty_layer": True,
                "comment": CACHE_COMMENT + key,
            }
        )
        run.state = ImageState(config, list(run.state.layers))
        self.cache.put(key, run.state.config, run.state.layers)

    def _do_expose(self, run: _StageRun, ins: Instruction) -> None:
        ports = []
        for word in self._words(run, ins):
            port, _, proto = word.partition("/")
            proto = (proto or "tcp").lower()
            if proto not in ("tcp", "udp", "sctp"):
                raise DockerfileError(f"{self._df}:{ins.line}: EXPOSE {word}: invalid protocol (tcp, udp or sctp)")
            low, _, high = port.partition("-")
            if not low.isdigit() or (high and not high.isdigit()):
                raise DockerfileError(f"{self._df}:{ins.line}: EXPOSE {word}: invalid port")
            for number in range(int(low), int(high or low) + 1):
                if not 0 < number < 65536:
                    raise DockerfileError(f"{self._df}:{ins.line}: EXPOSE {word}: port out of range")
                ports.append(f"{number}/{proto}")
        self._metadata(run, ins, f"/bin/sh -c #(nop)  EXPOSE {' '.join(ports)}", _add_keys("ExposedPorts", ports))

    def _do_volume(self, run: _StageRun, ins: Instruction) -> None:
        volumes = [v for v in self._words(run, ins) if v]
        if not volumes:
            raise DockerfileError(f"{self._df}:{ins.line}: VOLUME needs a path")
        self._metadata(run, ins, f"/bin/sh -c #(nop)  VOLUME {json.dumps(volumes)}", _add_keys("Volumes", volumes))

    def _do_user(self, run: _StageRun, ins: Instruction) -> None:
        user = self._expand(ins.rest, run.env(), ins)

        def change(cfg: dict) -> None:
            cfg["User"] = user

        self._metadata(run, ins, f"/bin/sh -c #(nop)  USER {user}", change)

    def _do_stopsignal(self, run: _StageRun, ins: Instruction) -> None:
        sig = self._expand(ins.rest, run.env(), ins)

        def change(cfg: dict) -> None:
            cfg["StopSignal"] = sig

        self._metadata(run, ins, f"/bin/sh -c #(nop)  STOPSIGNAL {sig}", change)

    def _command(self, run: _StageRun, ins: Instruction) -> list[str]:
        if ins.json is not None:
            return list(ins.json)
        return self._shell(run) + [ins.rest]

    def _do_cmd(self, run: _StageRun, ins: Instruction) -> None:
        cmd = self._command(run, ins)
        run.cmd_set = True

        def change(cfg: dict) -> None:
            cfg["Cmd"] = cmd

        self._metadata(run, ins, f"/bin/sh -c #(nop)  CMD {json.dumps(cmd)}", change)

    def _do_entrypoint(self, run: _StageRun, ins: Instruction) -> None:
        entrypoint = self._command(run, ins)
        reset_cmd = not run.cmd_set

        def change(cfg: dict) -> None:
            if entrypoint:
                cfg["Entrypoint"] = entrypoint
            else:
                cfg.pop("Entrypoint", None)
            if reset_cmd:
                cfg.pop("Cmd", None)  # docker: ENTRYPOINT resets a CMD inherited from the base

        self._metadata(
            run, ins, f"/bin/sh -c #(nop)  ENTRYPOINT {json.dumps(entrypoint)}", change, inputs={"reset_cmd": reset_cmd}
        )

    def _do_shell(self, run: _StageRun, ins: Instruction) -> None:
        shell = list(ins.json or [])  # the parser refuses a SHELL not in JSON form

        def change(cfg: dict) -> None:
            cfg["Shell"] = shell

        self._metadata(run, ins, f"/bin/sh -c #(nop)  SHELL {json.dumps(shell)}", change)

    def _do_healthcheck(self, run: _StageRun, ins: Instruction) -> None:
        keyword, _, rest = ins.rest.partition(" ")
        if keyword.upper() == "NONE":
            check: dict[str, list[str] | int] = {"Test": ["NONE"]}
        else:
            rest = rest.strip()
            from shim.build.dockerfile import _json_form

            form = _json_form(rest)
            check = {"Test": ["CMD"] + form if form is not None else ["CMD-SHELL", rest]}
            for flag, name in (
                ("interval", "Interval"),
                ("timeout", "Timeout"),
                ("start-period", "StartPeriod"),
                ("start-interval", "StartInterval"),
            ):
                if flag in ins.flags:
                    check[name] = parse_duration(ins.flags[flag], f"{self._df}:{ins.line}")
            if "retries" in ins.flags:
                check["Retries"] = int(ins.flags["retries"])

        def change(cfg: dict) -> None:
            cfg["Healthcheck"] = check

        self._metadata(run, ins, f"/bin/sh -c #(nop)  HEALTHCHECK {json.dumps(check)}", change)

    def _do_onbuild(self, run: _StageRun, ins: Instruction) -> None:
        trigger = ins.rest.strip()
        keyword, _, value = trigger.partition(" ")
        trigger = f"{keyword.upper()} {value.strip()}".strip()

        def change(cfg: dict) -> None:
            cfg["OnBuild"] = list(cfg.get("OnBuild") or []) + [trigger]

        self._metadata(run, ins, f"/bin/sh -c #(nop)  ONBUILD {trigger}", change)

    def _do_arg(self, run: _StageRun, ins: Instruction) -> None:
        env = run.env()
        declared = []
        for word in split_words(ins.rest, self.escape):
            name, sep, default = word.partition("=")
            self._used_args.add(name)
            value: str | None
            if name in self.options.build_args:
                value = self.options.build_args[name]
            elif sep:
                value = self._expand(default, env, ins)
            else:
                value = self._global_args.get(name)
            run.args[name] = value
            env = run.env()
            declared.append(f"{name}={value}" if value is not None else name)
        created_by = f"/bin/sh -c #(nop)  ARG {' '.join(declared)}"
        self._metadata(run, ins, created_by, lambda cfg: None)

    def _do_from(self, run: _StageRun, ins: Instruction) -> None:  # pragma: no cover
        raise DockerfileError(f"{self._df}:{ins.line}: FROM inside a stage")

    # ---- the result -----------------------------------------------------------------------
    def _commit(self, state: ImageState) -> BuildResult:
        """Store the final config and manifest; name the image. Returns its ID."""
        config_digest, config_size = self.store.put_json(state.config)
        if config_digest != state.id:
            raise BuildError(f"internal error: image ID {state.id} != stored {config_digest}")
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
            "layers": state.layers,
        }
        manifest_digest, _ = self.store.put_json(manifest)
        tags = []
        refs = []
        for tag in self.options.tags:
            try:
                ref = parse_reference(tag)
            except VmshimError as exc:
                raise UsageError(f"invalid tag {tag!r}: {exc}") from None
            if ref.digest is not None:
                raise UsageError(f"invalid tag {tag!r}: a tag cannot name a digest")
            refs.append(ref)
        if refs:
            for ref in refs:
                self.store.tag(ref, manifest_digest)
                tags.append(ref.familiar)
        else:
            self.store.tag(f"{UNTAGGED_NAME}@{manifest_digest}", manifest_digest)
        return BuildResult(image_id=config_digest, manifest_digest=manifest_digest, tags=tags)


@contextlib.contextmanager
def _single_attempt():
    """A base image that is not stored is pulled once, without the registry client's
    retries: it is most often a typo or an offline machine, and retrying turns that
    answer into a minute of waiting (``--pull`` and ``vmshim pull`` do retry)."""
    saved = os.environ.get("VMSHIM_REGISTRY_RETRIES")
    os.environ["VMSHIM_REGISTRY_RETRIES"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VMSHIM_REGISTRY_RETRIES", None)
        else:
            os.environ["VMSHIM_REGISTRY_RETRIES"] = saved


def build(options: BuildOptions, output: BuildOutput | None = None) -> BuildResult:
    """Build per *options*; see :class:`Builder`."""
    return Builder(options, output).build()


def _add_keys(key: str, names: list[str]):
    """A config change adding *names* to the set-like ``{name: {}}`` mapping at *key*
    (``ExposedPorts``, ``Volumes``)."""

    def change(cfg: dict) -> None:
        current = dict(cfg.get(key) or {})
        for name in names:
            current[name] = {}
        cfg[key] = current

    return change
