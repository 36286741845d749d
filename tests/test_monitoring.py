"""The dashboard and the alert rules in deploy/: every metric they name is on a live server's /metrics, the rules
pass promtool's checks and unit tests, and the search-quality metrics measure what they claim."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env
from tests.test_index_care import load

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "memory-service.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
# Metric names are the identifiers that start with the service's prefixes; `up` is Prometheus's own.
_METRIC = re.compile(r"\b((?:memory|grpc_server)_[a-z0-9_]+)\b")


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def _rules() -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _promtool() -> str:
    """promtool's path; in CI (CI set) its absence fails, since .ci/run installs it; elsewhere the test skips."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed; .ci/run installs it (Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get install prometheus); CI installs it and runs this test")
    return path


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_unit_tests_fire_and_resolve_every_alert() -> None:
    result = subprocess.run(
        [_promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, check=False, cwd=ALERTS.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's query, with Grafana's variables filled in, as a recording rule that promtool parses."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$job", ".*")}
        for i, expr in enumerate(e.replace("$instance", ".*") for e in _dashboard_exprs() if "label_values" not in e)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_prometheus_scrapes_the_service_and_loads_the_rules(tmp_path: Path) -> None:
    """The monitoring profile's config, with the container paths its volumes mount mapped back to the repository's
    files, passes `promtool check config` (which loads the rule files), and scrapes the service's metrics port."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    prometheus = compose["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    mounts = dict(reversed(v.removesuffix(":ro").split(":")) for v in prometheus["volumes"])
    config = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    assert [mounts[f] for f in config["rule_files"]] == ["./deploy/prometheus/alerts.yml"]
    config["rule_files"] = [str(ROOT / mounts[f]) for f in config["rule_files"]]
    (target,) = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    host, port = target.split(":")
    assert host in compose and f"127.0.0.1:{port}:{port}" in compose[host]["ports"]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([_promtool(), "check", "config", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_every_alert_is_tested_firing_and_resolved_and_has_a_runbook() -> None:
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    operations = OPERATIONS.read_text()
    for rule in _rules():
        name = rule["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"{name} is never tested firing"
        firing_at = min(_minutes(c["eval_time"]) for c in mine if c.get("exp_alerts"))
        assert any(not c.get("exp_alerts") and _minutes(c["eval_time"]) > firing_at for c in mine), (
            f"{name} is never tested resolving after it fired"
        )
        annotations = rule["annotations"]
        assert isinstance(annotations, dict) and annotations.get("runbook") and annotations.get("summary"), name
        assert f"### {name}" in operations, f"docs/operations.md has no runbook entry for {name}"


def _minutes(text: str) -> int:
    hours, _, rest = text.rpartition("h")
    return int(hours or 0) * 60 + int(rest.rstrip("m") or 0)


def test_dashboard_panels_are_described_and_distinct() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["description"] and panel["targets"], panel["title"]
            assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


@pytest.fixture
async def busy_server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(
        test_env(
            database_url,
            VECTOR_INDEX="ivfflat",
            EXACT_SEARCH_MAX_ROWS="500",
            SEARCH_RECALL_SAMPLE="1",
            SEARCH_RECALL_BUDGET="1",
        )
    )
    yield running
    await stop_server(running)


async def _scrape(server: RunningServer) -> str:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())


async def test_every_metric_the_dashboard_and_rules_name_is_on_the_live_endpoint(
    busy_server: RunningServer, database_url: str
) -> None:
    """Read from the running server's /metrics, not from a list in the code: a renamed metric breaks this."""
    server = busy_server
    await load(database_url, 1000, seed=11)
    await server.server.runtime.index.maintain(force=True)
    await server.memory.Store(
        memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value="a live metric"))
    )
    await server.memory.Search(memory_pb2.SearchRequest(query="live metric", top_k=5))
    body = await _scrape(server)
    exposed = {sample.name for family in text_string_to_metric_families(body) for sample in family.samples}
    named = {
        name for expr in [*_dashboard_exprs(), *(str(r["expr"]) for r in _rules())] for name in _METRIC.findall(expr)
    }
    assert len(named) > 30
    missing = sorted(named - exposed)
    assert not missing, f"named in deploy/ but not on /metrics: {missing}"


async def test_sampled_recall_matches_an_independent_exact_search(
    busy_server: RunningServer, database_url: str
) -> None:
    """With every index search sampled, memory_search_recall's mean is the recall of what callers got: checked
    against the true nearest computed here with a plain SQL exact scan."""
    server = busy_server
    await load(database_url, 3000, seed=12)
    await server.server.runtime.index.maintain(force=True)
    runtime = server.server.runtime
    assert runtime.index.state.usable
    registry = server.server.metrics.registry
    rng = np.random.default_rng(5)
    conn = await asyncpg.connect(database_url)
    expected: list[float] = []
    try:
        rows = await conn.fetch("SELECT embedding::text FROM memory.memories ORDER BY md5(id::text) LIMIT 24")
        vectors = [np.array(json.loads(row[0]), dtype=np.float32) for row in rows]
        for first, second in zip(vectors[::2], vectors[1::2], strict=True):
            # Midway between two memories, often of two topics: their nearest lie in several lists, of which one
            # probe reads one, so some of these searches get less than full recall.
            query = first + second + rng.normal(0, 0.02, first.shape).astype(np.float32)
            response = await server.memory.Search(
                memory_pb2.SearchRequest(
                    query_embedding=query.tolist(), mode=memory_pb2.SEARCH_MODE_VECTOR, top_k=10, probes=1
                )
            )
            assert not response.exact and response.plan.startswith("ivfflat")
            literal = "[" + ",".join(repr(float(x)) for x in query) + "]"
            truth = await conn.fetch(
                "SELECT id FROM (SELECT id, embedding <=> $1::vector AS d FROM memory.memories OFFSET 0) s "
                "ORDER BY d, id LIMIT 10",
                literal,
            )
            got = {hit.memory.id for hit in response.hits}
            expected.append(len(got & {r[0] for r in truth}) / len(truth))
    finally:
        await conn.close()
    for _ in range(200):
        if registry.get_sample_value("memory_search_recall_count", {"filtered": "false"}) == len(expected):
            break
        await asyncio.sleep(0.05)
    assert min(expected) < 1  # the estimate has something to estimate
    count = registry.get_sample_value("memory_search_recall_count", {"filtered": "false"})
    total = registry.get_sample_value("memory_search_recall_sum", {"filtered": "false"})
    assert count == len(expected)
    assert total == pytest.approx(sum(expected))
    assert _index_searches(registry, "vector") == len(expected)
    assert registry.get_sample_value("memory_index_usable") == 1
    assert registry.get_sample_value("memory_index_rows_at_build") == pytest.approx(3000, rel=0.05)
    assert registry.get_sample_value("memory_index_calibrated_timestamp_seconds") > 0


def _index_searches(registry: CollectorRegistry, mode: str) -> float:
    return sum(
        registry.get_sample_value("memory_searches_total", {"mode": mode, "plan": plan}) or 0
        for plan in ("index", "iterative_index")
    )


async def test_recall_checks_rest_to_keep_to_their_budget(database_url: str) -> None:
    """Every search drawn, but the checks may take 0.1% of a connection's time: after the first check the worker
    rests 999 times as long as it took (a second or more), so the searches that follow are not drawn."""
    running = await start_server(
        test_env(database_url, EXACT_SEARCH_MAX_ROWS="500", SEARCH_RECALL_SAMPLE="1", SEARCH_RECALL_BUDGET="0.001")
    )
    try:
        await load(database_url, 1000, seed=14)
        await running.server.runtime.index.maintain(force=True)
        registry = running.server.metrics.registry

        def checked() -> float:
            return registry.get_sample_value("memory_search_recall_count", {"filtered": "false"}) or 0

        request = memory_pb2.SearchRequest(query="topic words", mode=memory_pb2.SEARCH_MODE_VECTOR)
        await running.memory.Search(request)
        for _ in range(200):
            if checked():
                break
            await asyncio.sleep(0.01)
        for _ in range(20):
            await running.memory.Search(request)
        assert _index_searches(registry, "vector") == 21
        assert checked() == 1
    finally:
        await stop_server(running)


async def test_recall_sampling_off_runs_nothing(database_url: str) -> None:
    running = await start_server(test_env(database_url, EXACT_SEARCH_MAX_ROWS="500", SEARCH_RECALL_SAMPLE="0"))
    try:
        await load(database_url, 1000, seed=13)
        await running.server.runtime.index.maintain(force=True)
        for _ in range(5):
            await running.memory.Search(
                memory_pb2.SearchRequest(query="topic words", mode=memory_pb2.SEARCH_MODE_VECTOR)
            )
        await asyncio.sleep(0.2)
        registry = running.server.metrics.registry
        assert _index_searches(registry, "vector") == 5
        assert registry.get_sample_value("memory_search_recall_count", {"filtered": "false"}) == 0
    finally:
        await stop_server(running)
