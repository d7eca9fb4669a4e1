"""The Grafana dashboard against the metrics the service really exports.

Static: every series and label a query names exists in `service.metrics.Metrics().registry`, every
metric is plotted, latency panels are `histogram_quantile` over `rate(..._bucket[...])`, every query is
filtered by the `$instance` variable, and the README lists exactly the dashboard's panels.

Live: a real Prometheus (Debian's package, installed here when missing and possible) scrapes the
exporter every second, and every dashboard query is evaluated through its HTTP API and must return at
least one series — once over the metrics contract (the registry exposed as-is), once over the
running service under a short, bounded load.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from deploy_check import (
    DASHBOARD,
    ROOT,
    Prometheus,
    Query,
    dashboard_panels,
    dashboard_queries,
    exported_metrics,
    free_port,
    metric_names,
    prometheus_binary,
)

RATE_INTERVAL = "30s"  # stands in for Grafana's $__rate_interval: covers the whole 1 s-scrape run
AGGREGATION_LABELS = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def queries(dashboard) -> list[Query]:
    found = dashboard_queries(dashboard)
    assert len(found) >= 15
    return found


def series_index() -> dict[str, tuple[str, tuple[str, ...]]]:
    """series name as scraped -> (family, label names)."""
    return {s: (m.name, m.labels) for m in exported_metrics().values() for s in m.series}


# ---- static --------------------------------------------------------------------------------------------


def test_every_series_named_by_the_dashboard_is_exported(dashboard, queries) -> None:
    exported = series_index()
    variables = [v.get("definition", "") for v in dashboard["templating"]["list"]]
    for text in [q.expr for q in queries] + variables:
        unknown = metric_names(text) - set(exported)
        assert not unknown, f"dashboard names series the service does not export: {sorted(unknown)} in {text}"


def test_every_exported_metric_is_on_the_dashboard(queries) -> None:
    index = series_index()
    plotted = {index[n][0] for q in queries for n in metric_names(q.expr) if n in index}
    missing = set(exported_metrics()) - plotted
    assert not missing, f"metrics with no panel: {sorted(missing)}"


def test_labels_used_by_queries_and_legends_exist(queries) -> None:
    exported = series_index()
    for q in queries:
        names = metric_names(q.expr)
        allowed = {"instance", "job"} | {label for n in names for label in exported.get(n, ("", ()))[1]}
        if any(n.endswith("_bucket") for n in names):
            allowed.add("le")
        used = {lab.strip() for group in re.findall(AGGREGATION_LABELS, q.expr) for lab in group.split(",")}
        used |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"", q.expr))
        used |= set(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", q.legend))
        unknown = {u for u in used if u} - allowed
        assert not unknown, f"{q.panel}/{q.ref}: labels {sorted(unknown)} not on {sorted(names)}"


def test_latency_quantiles_are_histogram_quantile_over_bucket_rates(queries) -> None:
    histograms = {m.name for m in exported_metrics().values() if m.type == "histogram"}
    for q in queries:
        for quantile in re.findall(r"histogram_quantile\((.*)", q.expr):
            assert re.search(r"rate\(rellax_[a-z_]+_bucket\{[^}]*\}\[\$__rate_interval\]\)", quantile), q
            assert re.search(r"by \(le\b|by \([^)]*\ble\b", quantile), f"{q.panel}: quantile without `le`"
        # A histogram's _bucket series appear only inside histogram_quantile (never summed raw).
        for name in metric_names(q.expr):
            if name.endswith("_bucket"):
                assert name.removesuffix("_bucket") in histograms and "histogram_quantile(" in q.expr, q
    panels = {q.panel for q in queries if "rellax_request_duration_seconds_bucket" in q.expr}
    for quantile in ("p50", "p95", "p99"):
        assert any(quantile in p and "endpoint" in p for p in panels), f"no {quantile} per endpoint panel"


def test_every_selector_is_templated_by_instance(dashboard, queries) -> None:
    (instance,) = [v for v in dashboard["templating"]["list"] if v["name"] == "instance"]
    assert instance["includeAll"] and instance["allValue"] == ".*"
    assert metric_names(instance["definition"]) and "instance" in instance["definition"]
    for q in queries:
        selectors = re.findall(r"\brellax_[a-z0-9_]+(\{[^}]*\})?", q.expr)
        assert selectors and all('instance=~"$instance"' in s for s in selectors), q


def test_panel_layout_is_well_formed(dashboard) -> None:
    panels = [p for p in dashboard["panels"]]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p.get("description") is not None
    (ds,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"


def test_readme_lists_exactly_the_dashboard_panels(dashboard) -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^### Grafana dashboard panels\n(.*?)(?=^#)", readme + "\n#", re.S | re.M)
    assert match, "README: no '### Grafana dashboard panels' section"
    listed = re.findall(r"^\s*[-*] `([^`]+)`", match.group(1), re.M)
    assert listed == [p["title"] for p in dashboard_panels(dashboard)]


# ---- live: a real Prometheus ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    binary, reason = prometheus_binary()
    if binary is None:
        pytest.skip(reason)
    return binary


def scrape_config(target: str) -> dict[str, Any]:
    """docker/prometheus.yml itself, pointed at `target` and scraping every second."""
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "rellax"]
    job.update(scrape_timeout="1s", static_configs=[{"targets": [target]}])
    return config


def instantiate(expr: str, target: str) -> str:
    """Substitute the dashboard's variables as Grafana would for instance=`target`."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL)
    value = re.escape(target).replace("\\", "\\\\")  # a regex inside a PromQL string literal
    out = out.replace("${instance}", value).replace("$instance", value)
    assert "$" not in out, f"unknown dashboard variable in {expr}"
    return out


def evaluate_all(prom: Prometheus, queries: list[Query], target: str) -> dict[str, list[dict[str, Any]]]:
    """Every query evaluated; a few seconds of grace for the scrape after the last observation."""
    results, failures = {}, []
    for q in queries:
        result = prom.wait_for_samples(instantiate(q.expr, target), timeout_s=5)
        results[f"{q.panel}/{q.ref}"] = result
        if not result:
            failures.append(f"{q.panel}/{q.ref}: {q.expr}")
    assert not failures, "dashboard queries with no series:\n" + "\n".join(failures)
    return results


@pytest.fixture()
def contract_exporter() -> Iterator[tuple[Any, str]]:
    """`Metrics().registry` served over real HTTP by prometheus-client's own exporter."""
    from prometheus_client import start_http_server

    from service.metrics import Metrics

    metrics, port = Metrics(), free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        yield metrics, f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def observe_contract(metrics: Any, prom: Prometheus, scrapes: int, max_rounds: int = 200) -> None:
    """Every metric with every label it has, as the service records them (values are irrelevant),
    repeated until Prometheus has scraped `scrapes` times (bounded by `max_rounds`)."""
    from service.metrics import STAGES

    for n in range(max_rounds):
        if prom.scrapes("rellax") >= scrapes:
            break
        for endpoint in ("/v1/score", "/v1/rerank"):
            for status_class in ("2xx", "4xx", "5xx"):
                metrics.request_duration.labels(endpoint, status_class).observe(0.002 * (n + 1))
                metrics.requests.labels(endpoint, status_class).inc()
            metrics.candidates.labels(endpoint=endpoint).observe(8)
            metrics.degraded.labels(endpoint=endpoint).inc()
        for stage in STAGES:
            metrics.stage_duration.labels(stage=stage).observe(0.001 * (n + 1))
        metrics.batch_size.observe(16)
        for strategy in ("rellax", "llmsrec", "cascade"):
            metrics.rerank_duration.labels(strategy=strategy).observe(0.003 * (n + 1))
        for model in ("rellax", "llmsrec", "din"):
            metrics.scored.labels(model=model).inc(8)
        metrics.errors.labels(reason="unknown_item").inc()
        metrics.cold_starts.inc()
        metrics.rate_limited.labels(key_id="0a1b2c3d").inc()
        metrics.queue_depth.set(n)
        metrics.inflight.set(n % 3 + 1)
        time.sleep(0.1)


def test_dashboard_queries_evaluate_on_the_metrics_contract(
    prometheus_bin, contract_exporter, queries
) -> None:
    """Prometheus accepts every query (syntax, vector matching) and finds series for it."""
    metrics, target = contract_exporter
    with Prometheus(prometheus_bin, scrape_config(target)) as prom:
        observe_contract(metrics, prom, scrapes=3)  # the counters move between scrapes
        assert prom.scrapes("rellax") >= 3, prom.log()[-2000:]
        evaluate_all(prom, queries, target)
        # A query naming a series the service does not export finds nothing: the check above bites.
        assert prom.query(instantiate('rellax_requests_count{instance=~"$instance"}', target)) == []


def _service_ready() -> str | None:
    """Why the real service cannot be started here yet, or None when it can."""
    for module, attrs in (
        ("service.main", ("create_app",)),
        ("rellax.bundle", ("Bundle",)),
        ("training.llm.tiny_bundle", ("make_tiny_bundle",)),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet"
        loaded = importlib.import_module(module)
        missing = [a for a in attrs if not hasattr(loaded, a)]
        if missing:
            return f"{module} lacks {missing}"
    return None


async def drive_load(
    base: str, items: list[int], prom: Prometheus, scrapes: int, max_seconds: float, max_requests: int
) -> dict[str, int]:
    """A short, bounded mix of everything a dashboard panel plots: scores and reranks of a user with
    history, cold users, unknown items (404 + errors_total), and requests larger than the queue
    (degraded DIN answers); two concurrent clients, until Prometheus has scraped the service
    `scrapes` times during the load (bounded in time and count). Returns status counts."""
    statuses: dict[str, int] = {}
    history = [
        {"item_id": i, "rating": 1 + i % 5, "timestamp": 880_000_000 + 60 * n}
        for n, i in enumerate(items[:20])
    ]
    cands, big = items[20:23], items[30:40]
    deadline, sent, start = time.monotonic() + max_seconds, 0, prom.scrapes("rellax")
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        r = await client.post("/v1/users/dash-user/events", json={"events": history})
        r.raise_for_status()

        async def one(n: int) -> None:
            calls = [
                ("/v1/score", {"user_id": "dash-user", "item_ids": cands}),
                ("/v1/rerank", {"user_id": "dash-user", "item_ids": cands, "top_k": 2}),
                ("/v1/score", {"user_id": f"dash-cold-{n}", "item_ids": cands}),
                ("/v1/score", {"user_id": "dash-user", "item_ids": [cands[0], 2_000_000_000]}),
                ("/v1/rerank", {"user_id": "dash-user", "item_ids": big}),
                ("/v1/rerank", {"user_id": "dash-user", "item_ids": big, "strategy": "cascade", "m": 2}),
            ]
            for path, body in calls:
                r = await client.post(path, json=body)
                statuses[f"{r.status_code}"] = statuses.get(f"{r.status_code}", 0) + 1

        while time.monotonic() < deadline and sent < max_requests:
            if await asyncio.to_thread(prom.scrapes, "rellax") >= start + scrapes:
                break
            await asyncio.gather(one(sent), one(sent + 1))
            sent = sum(statuses.values())
            await asyncio.sleep(0.1)
        # Enough load was sent: on a loaded machine Prometheus may still be behind, so wait for it.
        while (
            time.monotonic() < deadline and await asyncio.to_thread(prom.scrapes, "rellax") < start + scrapes
        ):
            await asyncio.sleep(0.25)
    return statuses


def test_dashboard_queries_return_series_from_the_running_service(prometheus_bin, redis_url, queries) -> None:
    """The real app (tiny bundle, real Redis, uvicorn on loopback) scraped by a real Prometheus."""
    if reason := _service_ready():
        pytest.skip(f"the real service cannot load a bundle yet: {reason} (model/bundle issue)")
    from service_support import make_settings, tiny_bundle, uvicorn_app

    from service.metrics import STAGES

    # Queue smaller than the 10-candidate request: that one is answered by DIN (degraded), the
    # 3-candidate ones by the model.
    # A rate limit the load outruns after its first bursts: the 429 panel gets a series too.
    settings = make_settings(
        redis_url, max_queue=8, overload_mode="degrade", rate_limit_rps=5.0, rate_limit_burst=12
    )
    items = sorted(tiny_bundle().items)
    assert len(items) >= 40
    with uvicorn_app(settings) as (_, base):
        target = base.removeprefix("http://")
        ready = httpx.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        with Prometheus(prometheus_bin, scrape_config(target)) as prom:
            statuses = asyncio.run(drive_load(base, items, prom, scrapes=3, max_seconds=60, max_requests=200))
            assert prom.scrapes("rellax") >= 3, prom.log()[-2000:]
            assert statuses.get("200", 0) > 0 and statuses.get("404", 0) > 0, statuses
            assert statuses.get("429", 0) > 0, statuses
            results = evaluate_all(prom, queries, target)
            stages = prom.query(
                instantiate(
                    'sum by (stage) (rellax_stage_duration_seconds_count{instance=~"$instance"})', target
                )
            )
    assert any(float(s["value"][1]) > 0 for r in results.values() for s in r)
    # The stacked "mean stage time" panel adds every stage but total: a stage outside the contract
    # (or one that contains others) makes it count time twice.
    seen = {s["metric"]["stage"] for s in stages}
    assert seen <= set(STAGES), (
        f"the service observes stage labels outside service.metrics.STAGES {STAGES}: "
        f"{sorted(seen - set(STAGES))}; report subr/crm/prompt separately or change the contract"
    )
