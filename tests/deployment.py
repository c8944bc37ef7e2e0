"""Checks of the deployment files (docker/, docs/operations.md) against the code: commands parsed
by the real CLI, variables the settings read, metrics and labels the code exports.

Each check returns the problems it finds as lines, so that a test can assert there are none and
another can plant a mistake and assert it is reported.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer.main
import yaml
from prometheus_client.metrics import MetricWrapperBase

from indexer.cli import app
from indexer.config import ENVIRONMENT_VARIABLES
from indexer.ingester import IngesterMetrics
from indexer.metrics import BackfillMetrics, CoverageMetrics, Metrics

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
PROMETHEUS = DOCKER / "prometheus"
DASHBOARDS = DOCKER / "grafana" / "dashboards"
RUNBOOK = REPO / "docs" / "operations.md"

# Values for the secrets .env.example leaves empty (compose refuses to start without them).
TEST_SECRETS = {
    "POSTGRES_PASSWORD": "pgsecret1",
    "REDIS_PASSWORD": "redissecret1",
    "GRAFANA_ADMIN_PASSWORD": "grafanasecret1",
}


def tool(name: str) -> str | None:
    """The path of a tool from the Debian packages .ci/setup installs, or None."""
    return shutil.which(name)


# --- the CLI ---


def cli_problem(args: list[str]) -> str | None:
    """Why `indexer ARGS` would not parse with the real CLI (unknown command or option, a bad
    value), or None when it parses. Nothing runs: each level only builds its context."""
    if args and args[-1] == "--help":
        args = args[:-1]  # help of whatever precedes it
        if not args:
            return None
    command: Any = typer.main.get_command(app)
    name, parent, rest = "indexer", None, list(args)
    while True:
        try:
            ctx = command.make_context(name, list(rest), parent=parent)
        except Exception as exc:  # the CLI library's usage errors, whatever their class
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            return f"indexer {' '.join(args)}: {message or f'{name} needs a command'}"
        if not hasattr(command, "get_command"):
            return None
        at = _subcommand_at(command, rest)
        if at is None:
            return (
                None
                if getattr(command, "invoke_without_command", False)
                else (f"indexer {' '.join(args)}: {name} needs a command")
            )
        sub = command.get_command(ctx, rest[at])
        if sub is None:
            return f"indexer {' '.join(args)}: no command {rest[at]!r} in {name}"
        command, name, parent, rest = sub, rest[at], ctx, rest[at + 1 :]


def _subcommand_at(group: Any, args: list[str]) -> int | None:
    """Where the subcommand's name is in a group's arguments (after the group's own options)."""
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("-"):
            return i
        option = next((p for p in group.params if token.split("=", 1)[0] in p.opts), None)
        takes_value = option is not None and not option.is_flag and "=" not in token
        i += 2 if takes_value else 1
    return None


def command_signature(args: list[str]) -> str:
    """`dlq retry --all` for ["dlq", "retry", "--all"]: the subcommands and the options given,
    without values, as tests name what they exercise."""
    command: Any = typer.main.get_command(app)
    path, rest = [], list(args)
    while hasattr(command, "get_command") and (at := _subcommand_at(command, rest)) is not None:
        ctx = command.make_context(command.name or "indexer", list(rest))
        path.append(rest[at])
        command, rest = command.get_command(ctx, rest[at]), rest[at + 1 :]
    options = sorted({a.split("=", 1)[0] for a in args if a.startswith("--")})
    return " ".join(path + options)


# --- compose ---

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$\$")


def env_file(path: Path) -> dict[str, str]:
    """A compose .env file: NAME=value lines, # comments."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def filled_env() -> dict[str, str]:
    """.env.example with the secrets filled in, as an operator's docker/.env would be."""
    return env_file(ENV_EXAMPLE) | TEST_SECRETS


class MissingVariable(ValueError):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR:?error}, $$), applied to
    every string of a loaded compose file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op and op.endswith("-") and unset:
            return arg
        if op and op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _VARIABLE.sub(one, value)


def compose_variables(text: str) -> set[str]:
    return {m.group(1) for m in _VARIABLE.finditer(text) if m.group(1)}


def load_compose(text: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker/compose.yaml (or `text`), anchors merged and variables substituted."""
    raw = yaml.safe_load(COMPOSE.read_text() if text is None else text)
    return interpolate(raw, filled_env() if env is None else env)  # type: ignore[no-any-return]


def indexer_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the indexer image (built from docker/Dockerfile)."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


def compose_problems(compose: dict[str, Any]) -> list[str]:
    """Commands the CLI does not know and variables the settings do not read, per service."""
    problems = []
    known = set(ENVIRONMENT_VARIABLES)
    for name, service in indexer_services(compose).items():
        command = service.get("command", ["run"])
        if isinstance(command, str):
            command = command.split()
        if (problem := cli_problem([str(a) for a in command])) is not None:
            problems.append(f"{name}: {problem}")
        for variable in service.get("environment", {}):
            if variable not in known:
                problems.append(f"{name}: {variable} is not a setting the indexer reads")
    return problems


# --- metrics ---


@dataclass
class Exported:
    """The metrics the code exports: sample name -> label names (without job and instance)."""

    samples: dict[str, frozenset[str]] = field(default_factory=dict)

    def labels_of(self, name: str) -> frozenset[str] | None:
        return self.samples.get(name)


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
# Labels Prometheus adds to every scraped series, and `up`, which it writes itself.
TARGET_LABELS = frozenset({"job", "instance"})
PROMETHEUS_SERIES = {"up": frozenset()}


def exported_metrics() -> Exported:
    """Every sample name the replica, compare, backfill and ingester registries expose, with
    each one's label names: built from the same classes the processes use."""
    found = Exported(dict(PROMETHEUS_SERIES))
    for holder in (Metrics(), CoverageMetrics(), BackfillMetrics(), IngesterMetrics("jetstream")):
        for wrapper in vars(holder).values():
            if not isinstance(wrapper, MetricWrapperBase):
                continue
            # prometheus_client keeps a metric's label names here; a labelled metric without
            # children has no samples to read them from.
            labels = frozenset(getattr(wrapper, "_labelnames", ()))
            for family in wrapper.describe():
                for suffix in _SUFFIXES[family.type]:
                    extra = {"le"} if suffix == "_bucket" else set()
                    found.samples[family.name + suffix] = labels | extra
    return found


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "inf", "nan", "atan2"}  # fmt: skip
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_NAME = re.compile(r"(?<![\w.$\"])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"")


def promql_names(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """The metric names of a PromQL expression with the labels their selectors match on, and
    the labels of its by/without/on/ignoring/group_* clauses."""
    used: dict[str, set[str]] = {}
    for m in _SELECTOR.finditer(expr):
        if m.group(1):
            used.setdefault(m.group(1), set()).update(_MATCHER.findall(m.group(2)))
    rest = _SELECTOR.sub(" ", expr)
    clauses = {label.strip() for body in _CLAUSE.findall(rest) for label in body.split(",")}
    rest = _CLAUSE.sub(" ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # ranges and subqueries, [5m], [$__rate_interval]
    rest = _STRING.sub(" ", rest)
    rest = re.sub(r"\b\d[\w.]*", " ", rest)  # numbers, 1e3, 0.99
    for name in _NAME.findall(rest):
        if name.lower() not in _KEYWORDS:
            used.setdefault(name, set())
    return used, clauses - {""}


def promql_problems(expr: str, exported: Exported) -> list[str]:
    """Metric names and label names in a PromQL expression that nothing exports."""
    problems = []
    used, clause_labels = promql_names(expr)
    all_labels: set[str] = set(TARGET_LABELS)
    for name, labels in used.items():
        known = exported.labels_of(name)
        if known is None:
            problems.append(f"{name} is not exported")
            continue
        all_labels |= known
        for label in sorted(labels - known - TARGET_LABELS):
            problems.append(f"{name} has no label {label!r}")
    for label in sorted(clause_labels - all_labels):
        problems.append(f"no metric of `{expr}` has the label {label!r}")
    return problems


def alert_rules(text: str | None = None) -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text() if text is None else text)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every query of a dashboard, rows' nested panels included."""
    exprs = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in inner.get("targets", []) if t.get("expr")]
    return exprs


def dashboards() -> dict[str, dict[str, Any]]:
    import json

    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def metric_problems(exprs: Iterable[str], exported: Exported | None = None) -> list[str]:
    exported = exported or exported_metrics()
    return [f"{expr!r}: {p}" for expr in exprs for p in promql_problems(expr, exported)]


# --- markdown ---


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+)$", markdown, flags=re.MULTILINE)}


def shell_blocks(markdown: str) -> list[str]:
    """The lines of the ```sh blocks, continuations joined, comments and prompts dropped."""
    lines = []
    for block in re.findall(r"^\s*```sh\n(.*?)^\s*```", markdown, flags=re.MULTILINE | re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def runbook_commands(markdown: str | None = None) -> list[list[str]]:
    """The `indexer ...` commands the runbook shows, as argument lists (without `indexer`)."""
    import shlex

    text = RUNBOOK.read_text() if markdown is None else markdown
    commands = []
    for line in shell_blocks(text):
        words = shlex.split(line, comments=True)
        if words and words[0] == "indexer":
            commands.append(words[1:])
    return commands


def environ_with(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), **extra}
