"""deploy/prometheus/alerts.yaml and deploy/grafana/prefork-proxy.json, held to issue 11's names.

Both files only work if every metric and label they name is one the proxy
exports, spelt the same.  ``metric_names.METRICS`` (tests/metric_names.py) is
that contract, copied from issue 11 (the names are fixed there so dashboards
can rely on them); tests/integration/test_metrics_names.py holds the proxy's
real /metrics to it.  The tests read every PromQL expression in
both files with a small lexer (enough for the PromQL these files use) and check
each metric name, each label matcher and each ``by (...)`` label against it.

promtool (Debian's ``prometheus`` package ships it) checks the rules and runs
their unit tests, deploy/prometheus/tests.yaml, and parses every dashboard
expression (each written into a throw-away rule file); without promtool those
three tests skip and say why.  yamllint comes with the test extra.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from metric_names import METRICS

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "prefork-proxy.json"
YAMLLINT_CONFIG = ROOT / ".yamllint.yaml"

#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
#: Grafana's built-in variables, replaced by a plausible value before promtool parses.
GRAFANA_BUILTINS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "offset", "bool", "inf", "nan"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"(?<![\w$.:])([a-zA-Z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_IDENT = re.compile(r"(?<![\w$.:])([a-zA-Z_:][\w:]*)(\s*\()?")


def base_metric(name: str) -> str:
    """``name`` without a histogram's ``_bucket``/``_sum``/``_count`` suffix."""
    for suffix in ("_bucket", "_sum", "_count"):
        stem = name[:-len(suffix)]
        if name.endswith(suffix) and METRICS.get(stem, ("",))[0] == "histogram":
            return stem
    return name


def metric_names(expr: str) -> List[str]:
    """The metric names in a PromQL expression (functions, keywords and labels left out)."""
    text = re.sub(r"\{[^{}]*\}", " ", _STRING.sub('""', expr))  # label matchers, strings
    text = re.sub(r"\[[^\]]*\]", " ", text)                      # range and subquery
    text = _GROUPING.sub(" ", text)                              # by (...), on (...)
    return [name for name, call in _IDENT.findall(text)
            if not call and name.lower() not in _KEYWORDS]


def grouping_labels(expr: str) -> Set[str]:
    """Every label named in a ``by``/``without``/``on``/``ignoring``/``group_*`` clause."""
    return {label.strip() for _, labels in _GROUPING.findall(_STRING.sub('""', expr))
            for label in labels.split(",") if label.strip()}


def matchers(expr: str) -> Iterator[Tuple[str, str, str, str]]:
    """``(metric, label, operator, value)`` for each label matcher of each selector."""
    for metric, body in _SELECTOR.findall(expr):
        for label, operator, value in _MATCHER.findall(body):
            yield metric, label, operator, value


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with the test extra (yamllint)")
    return yaml.safe_load(path.read_text())


def alert_rules() -> List[Dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> Dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs() -> List[Tuple[str, str]]:
    """``(where, expr)`` for every query of the dashboard, panels and variables."""
    board = dashboard()
    found = [(f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
             for panel in all_panels(board["panels"]) for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            found.append((f"variable {variable['name']}", inner.group(1) if inner else query))
    return found


def every_expr() -> List[Tuple[str, str]]:
    rules = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    return rules + dashboard_exprs()


def check_expr(where: str, expr: str) -> List[str]:
    """What is wrong with ``expr`` against ``METRICS`` (empty: nothing)."""
    problems = []
    names = [base_metric(name) for name in metric_names(expr)]
    if not names:
        problems.append(f"{where}: no metric name found in {expr!r}")
    known: Set[str] = set(TARGET_LABELS)
    for name in names:
        if name not in METRICS:
            problems.append(f"{where}: {name!r} is not one of issue 11's metrics")
            continue
        kind, labels, _ = METRICS[name]
        known |= labels | ({"le"} if kind == "histogram" else set())
    for metric, label, operator, value in matchers(expr):
        stem = base_metric(metric)
        if stem not in METRICS:
            continue  # reported above
        kind, labels, values = METRICS[stem]
        allowed = labels | TARGET_LABELS | ({"le"} if kind == "histogram" else set())
        if label not in allowed:
            problems.append(f"{where}: {metric} has no label {label!r}")
        elif label in values and "$" not in value:
            wanted = set(value.split("|")) if operator in ("=~", "!~") else {value}
            if wanted - values[label]:
                problems.append(f"{where}: {metric}{{{label}}} is never "
                                f"{sorted(wanted - values[label])}")
    for label in grouping_labels(expr) - known:
        problems.append(f"{where}: groups by {label!r}, a label none of {names} has")
    return problems


# --- the lexer itself, on expressions whose answer is known --------------------------------


def test_the_lexer_finds_metric_names_and_only_them():
    expr = ('histogram_quantile(0.99, sum by (le, listener) (rate('
            'prefork_proxy_session_duration_seconds_bucket{job=~"$job", listener="a b"}'
            '[$__rate_interval]))) > 1e3 and on (job) up offset 10m')
    assert [base_metric(n) for n in metric_names(expr)] == [
        "prefork_proxy_session_duration_seconds", "up"]
    assert grouping_labels(expr) == {"le", "listener", "job"}
    assert list(matchers(expr))[1] == (
        "prefork_proxy_session_duration_seconds_bucket", "listener", "=", "a b")


def test_the_check_catches_a_misspelt_name_label_or_value():
    assert check_expr("ok", 'sum by (listener) (prefork_proxy_backend_up{backend="x"})') == []
    assert "not one of issue 11's metrics" in check_expr("x", "prefork_proxy_backends_up")[0]
    assert "no label 'reason'" in check_expr("x", 'prefork_proxy_backend_up{reason="x"}')[0]
    assert "is never ['refuse']" in check_expr(
        "x", 'prefork_proxy_backend_connect_errors_total{reason=~"refuse|timeout"}')[0]
    assert "groups by 'backend'" in check_expr(
        "x", "sum by (backend) (prefork_proxy_connections_total)")[0]


# --- both files against the list ---------------------------------------------------------


def test_every_expression_uses_only_issue_11_metrics_labels_and_values():
    exprs = every_expr()
    assert len(exprs) > 25  # the files were read, not skipped
    problems = [problem for where, expr in exprs for problem in check_expr(where, expr)]
    assert problems == []


def test_the_alerts_cover_what_issue_11_asks_for():
    used = {rule["alert"]: {base_metric(n) for n in metric_names(rule["expr"])}
            for rule in alert_rules()}
    wanted = {"PreforkProxyBackendDown": "prefork_proxy_backend_up",
              "PreforkProxyNoHealthyBackend": "prefork_proxy_backend_up",
              "PreforkProxyWorkerRestarts": "prefork_proxy_worker_restarts_total",
              "PreforkProxyReloadFailed": "prefork_proxy_reloads_total",
              "PreforkProxyBackendConnectErrors": "prefork_proxy_backend_connect_errors_total"}
    for alert, metric in wanted.items():
        assert metric in used.get(alert, set()), alert
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert "$labels.instance" in rule["annotations"]["description"], rule["alert"]


def test_the_dashboard_has_unique_ids_and_the_templated_prometheus_datasource():
    board = dashboard()
    panels = list(all_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "listener"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
            # Every query is scoped by the templates (job; listener where it has one).
            assert 'job=~"$job"' in target["expr"], panel["title"]
            names = {base_metric(n) for n in metric_names(target["expr"])}
            if any("listener" in METRICS[n][1] for n in names if n in METRICS):
                assert 'listener=~"$listener"' in target["expr"], panel["title"]
    # Each panel sits on the 24-column grid and no two overlap.
    cells: Set[Tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']!r} overlaps another panel"
        cells |= mine


def test_the_dashboard_shows_every_issue_11_metric():
    shown = {base_metric(n) for _, expr in dashboard_exprs() for n in metric_names(expr)}
    missing = {name for name in METRICS if name.startswith("prefork_proxy_")} - shown
    assert missing == set()


def test_alerts_and_rule_tests_pass_yamllint_strict():
    pytest.importorskip("yamllint", reason="yamllint comes with the test extra")
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "--format", "parsable",
         "--config-file", str(YAMLLINT_CONFIG), str(ALERTS), str(RULE_TESTS)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


# --- promtool ----------------------------------------------------------------------------


def promtool() -> str:
    path: Optional[str] = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus); "
                    "the rules are then only linted and checked against the metric list")
    return path


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def test_promtool_check_rules():
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests():
    """Backend down fires only past its ``for``; a reload failure fires on the increase."""
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_parses_every_dashboard_expression(tmp_path):
    """Each query, Grafana variables replaced by a value, as a recording rule promtool parses."""
    rules = []
    for index, (_where, expr) in enumerate(dashboard_exprs()):
        for variable, value in GRAFANA_BUILTINS.items():
            expr = expr.replace(variable, value)
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)  # $job, $listener: regex matchers
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
