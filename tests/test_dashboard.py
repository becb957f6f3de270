"""dashboards/online_train.json (the Grafana dashboard of --online-train): valid JSON with a Prometheus datasource
variable; every PromQL expression in it parses (a recursive-descent parser of the PromQL the dashboard may use,
below), and every metric it names is a series sglang_ext.online.metrics.OnlineMetrics exports (a counter as
NAME_total, a histogram as NAME_bucket / _sum / _count, a gauge as NAME), collected from a fresh process."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "online_train.json"

# -- a PromQL parser (syntax only) ---------------------------------------------------------------------------

AGGREGATIONS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "group", "topk", "bottomk", "quantile",
                "count_values"}
FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "histogram_quantile",
             "abs", "ceil", "floor", "round", "clamp", "clamp_min", "clamp_max", "sqrt", "exp", "ln", "log2",
             "log10", "time", "timestamp", "vector", "scalar", "label_replace", "label_join", "sort", "sort_desc",
             "absent", "absent_over_time", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
             "count_over_time", "last_over_time", "quantile_over_time", "predict_linear"}
BINARY = {"+", "-", "*", "/", "%", "^", "==", "!=", ">", "<", ">=", "<=", "and", "or", "unless"}
TOKEN = re.compile(r"""\s*(?:
    (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*|\$__rate_interval|\$__interval|\$__range)
  | (?P<number>\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|==|!=|>=|<=|[-+*/%^<>=(){}\[\],:])
)""", re.VERBOSE)


class PromQLError(ValueError):
    pass


def tokenize(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = TOKEN.match(expr, pos)
        if not m:
            raise PromQLError(f"cannot read {expr[pos:pos + 20]!r} at {pos}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class Parser:
    """expr := unary (binop ['bool'] unary)*;  unary := ['-' | '+'] postfix;
    postfix := primary ['[' duration [':' [duration]] ']'] ['offset' duration];
    primary := number | string | '(' expr ')' | aggregation | function '(' args ')' | selector."""

    def __init__(self, expr: str):
        self.expr, self.tokens, self.i = expr, tokenize(expr), 0
        self.metrics: list[str] = []

    def peek(self, k: int = 0):
        j = self.i + k
        return self.tokens[j] if j < len(self.tokens) else ("eof", "")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tk, tv = self.peek()
        if (value is not None and tv != value) or (kind is not None and tk != kind):
            raise PromQLError(f"expected {value or kind}, got {tv or 'the end'!r} in {self.expr!r}")
        self.i += 1
        return tv

    def parse(self) -> list[str]:
        self.expression()
        if self.peek()[0] != "eof":
            raise PromQLError(f"unexpected {self.peek()[1]!r} in {self.expr!r}")
        return self.metrics

    def expression(self) -> None:
        self.unary()
        while self.peek()[1] in BINARY:
            self.i += 1
            if self.peek()[1] == "bool":
                self.i += 1
            if self.peek()[1] in ("on", "ignoring"):
                self.i += 1
                self.label_list()
                if self.peek()[1] in ("group_left", "group_right"):
                    self.i += 1
                    if self.peek()[1] == "(":
                        self.label_list()
            self.unary()

    def unary(self) -> None:
        if self.peek()[1] in ("-", "+"):
            self.i += 1
        self.primary()
        if self.peek()[1] == "[":
            self.i += 1
            self.take(kind="duration")
            if self.peek()[1] == ":":
                self.i += 1
                if self.peek()[0] == "duration":
                    self.i += 1
            self.take("]")
        if self.peek()[1] == "offset":
            self.i += 1
            self.take(kind="duration")

    def primary(self) -> None:
        kind, value = self.peek()
        if kind in ("number", "string"):
            self.i += 1
        elif value == "(":
            self.i += 1
            self.expression()
            self.take(")")
        elif value == "{":
            self.matchers()
        elif kind == "ident" and value in AGGREGATIONS:
            self.i += 1
            if self.peek()[1] in ("by", "without"):
                self.i += 1
                self.label_list()
            self.arguments()
            if self.peek()[1] in ("by", "without"):
                self.i += 1
                self.label_list()
        elif kind == "ident" and self.peek(1)[1] == "(":
            if value not in FUNCTIONS:
                raise PromQLError(f"unknown function {value!r} in {self.expr!r}")
            self.i += 1
            self.arguments()
        elif kind == "ident":
            if value in BINARY or value in ("by", "without", "offset", "bool"):
                raise PromQLError(f"unexpected keyword {value!r} in {self.expr!r}")
            self.i += 1
            self.metrics.append(value)
            if self.peek()[1] == "{":
                self.matchers()
        else:
            raise PromQLError(f"unexpected {value or 'end'!r} in {self.expr!r}")

    def arguments(self) -> None:
        self.take("(")
        if self.peek()[1] != ")":
            self.expression()
            while self.peek()[1] == ",":
                self.i += 1
                self.expression()
        self.take(")")

    def label_list(self) -> None:
        self.take("(")
        while self.peek()[1] != ")":
            self.take(kind="ident")
            if self.peek()[1] != ",":
                break
            self.i += 1
        self.take(")")

    def matchers(self) -> None:
        self.take("{")
        while self.peek()[1] != "}":
            self.take(kind="ident")
            if self.peek()[1] not in ("=", "!=", "=~", "!~"):
                raise PromQLError(f"expected a label matcher operator in {self.expr!r}")
            self.i += 1
            self.take(kind="string")
            if self.peek()[1] != ",":
                break
            self.i += 1
        self.take("}")


def metric_names(expr: str) -> list[str]:
    """The metric names an expression selects (raises PromQLError when it does not parse)."""
    return Parser(expr).parse()


def test_promql_parser_accepts_and_rejects():
    assert metric_names('sum by (position) (rate(a:b_total{x=~"$m"}[$__rate_interval])) / sum(rate(c[5m]))') \
        == ["a:b_total", "c"]
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(h_bucket[1m])))") == ["h_bucket"]
    assert metric_names("changes(max(v)[1m:15s]) > 0") == ["v"]
    for bad in ("sum(rate(x[5m])", 'x{a="b"', "rate(x[5m]))", "x{a=b}", "frobnicate(x)", "x +", "sum by x (y)"):
        with pytest.raises(PromQLError):
            metric_names(bad)


# -- the dashboard -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_series()


def exported_series() -> set[str]:
    """Every series name OnlineMetrics exports, from a fresh process (prometheus_client's registry is global;
    multiprocess mode off)."""
    code = r"""
from prometheus_client import REGISTRY
from sglang_ext.online.metrics import OnlineMetrics
OnlineMetrics({"model_name": "m"})
suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
for family in REGISTRY.collect():
    if family.name.startswith("sglang:"):
        for suffix in suffixes[family.type]:
            print(family.name + suffix)
"""
    env = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    return set(out.split())


def dashboard_queries(board: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if "expr" in t)
            walk(p.get("panels", []))
    walk(board["panels"])
    exprs.extend(a["expr"] for a in board.get("annotations", {}).get("list", []) if "expr" in a)
    return exprs


def used_metrics(board: dict) -> dict[str, str]:
    """metric name -> a query of `board` that selects it."""
    used: dict[str, str] = {}
    for expr in dashboard_queries(board):
        for name in metric_names(expr):
            used[name] = expr
    # the model variable's label_values(metric, label) is Grafana's, not PromQL: its metric too
    for v in board["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\S+), (\w+)\)", v.get("definition", ""))
        if m:
            used[m.group(1)] = v["definition"]
    return used


def test_the_check_catches_a_metric_not_registered(exported):
    board = json.loads(DASHBOARD.read_text())
    target = next(p for p in board["panels"] if p["type"] != "row")["targets"][0]
    for wrong in ("sglang:online_train_trainer_steps_total",      # a gauge named as a counter
                  "sglang:online_train_swaps",                   # a counter without _total
                  "sglang:online_train_no_such_metric"):
        target["expr"] = f"sum(rate({wrong}[5m]))"
        assert wrong in used_metrics(board) and wrong not in exported


def test_dashboard_names_only_registered_metrics(exported):
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in board["panels"]:                         # every panel queries through the datasource variable
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
    assert "sglang:online_train_accept_length_bucket" in exported and "sglang:online_train_swaps_total" in exported
    used = used_metrics(board)
    assert len(used) >= 30, sorted(used)
    unknown = {name: expr for name, expr in used.items() if name not in exported}
    assert not unknown, f"the dashboard queries series that OnlineMetrics does not export: {unknown}"
    # what the issue asks the dashboard to show
    for needed in ("accepted_tokens_total", "proposed_drafts_total", "accept_length_bucket", "version_accept_length",
                   "swaps_total", "rejected_swaps_total", "rollbacks_total", "trainer_up", "trainer_restarts_total",
                   "trainer_hung_total", "trainer_steps", "trainer_loss", "trainer_tokens_per_second",
                   "replay_bytes", "replay_dropped_records_total", "persisted_bytes_total", "queue_bytes",
                   "queue_dropped_records_total"):
        assert "sglang:online_train_" + needed in used, needed
