"""The deployment files (docker/) against the code, without a container engine: commands the
CLI knows, variables the settings read, metrics and labels the code exports, the image's
contents; and against the real tools where .ci/setup installed them (docker-compose, promtool,
redis-server)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
import yaml

from indexer.config import load_settings
from indexer.constants import DEFAULT_METRICS_PORT, DEFAULT_SHUTDOWN_GRACE_S
from indexer.devservers import throwaway_redis
from tests.deployment import (
    COMPOSE,
    DASHBOARDS,
    DOCKER,
    ENV_EXAMPLE,
    PROMETHEUS,
    REPO,
    RUNBOOK,
    TEST_SECRETS,
    MissingVariable,
    alert_rules,
    anchors,
    cli_problem,
    compose_problems,
    compose_variables,
    dashboard_exprs,
    dashboards,
    env_file,
    exported_metrics,
    filled_env,
    indexer_services,
    load_compose,
    metric_problems,
    tool,
)
from tests.observe import until

pytestmark = pytest.mark.timeout(60)


# --- compose against the CLI and the settings ---


def test_every_command_compose_runs_parses_with_the_real_cli():
    compose = load_compose()
    services = indexer_services(compose)
    assert set(services) == {"migrate", "ingester", "indexer", "compare", "cli"}
    assert compose_problems(compose) == []
    commands = {name: s["command"] for name, s in services.items()}
    assert commands["indexer"] == ["run"]
    assert commands["compare"] == ["compare", "--every", "300", "--min-coverage", "99"]
    assert commands["ingester"] == ["ingest", "jetstream"]


@pytest.mark.parametrize(
    ("service", "change", "reported"),
    [
        ("indexer", {"command": ["runn"]}, "indexer: indexer runn: no command 'runn' in indexer"),
        ("compare", {"command": ["compare", "--evry", "300"]}, "No such option: --evry"),
        ("compare", {"command": ["compare", "--every", "soon"]}, "'--every'"),
        ("compare", {"command": ["compare", "--min-coverage", "120"]}, "'--min-coverage'"),
        ("cli", {"command": ["dlq", "purge"]}, "no command 'purge' in dlq"),
        ("ingester", {"command": ["ingest"]}, "ingest needs a command"),
        ("indexer", {"environment": {"INDEXER_BACTH_SIZE": "100"}},
         "indexer: INDEXER_BACTH_SIZE is not a setting the indexer reads"),
    ],
)  # fmt: skip
def test_a_planted_mistake_is_reported(service, change, reported):
    compose = load_compose()
    compose["services"][service] |= change
    problems = compose_problems(compose)
    assert len(problems) == 1 and reported in problems[0], problems


def test_the_image_health_check_and_entrypoint_are_cli_commands():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    [entrypoint] = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, flags=re.MULTILINE)
    [health] = re.findall(r"^HEALTHCHECK .*CMD (\[.+\])$", dockerfile, flags=re.MULTILINE)
    [cmd] = re.findall(r"^CMD (.+)$", dockerfile, flags=re.MULTILINE)
    assert json.loads(entrypoint) == ["indexer"]
    assert json.loads(health)[0] == "indexer"
    assert cli_problem(json.loads(health)[1:]) is None
    assert json.loads(health)[1:] == ["check"]
    assert cli_problem(json.loads(cmd)) is None
    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_the_settings_each_service_gets_are_valid_and_consistent():
    """Each service's environment builds the settings without error; the URLs point at the
    compose services with their credentials; no replica is given a fixed consumer name."""
    compose = load_compose()
    services = compose["services"]
    pg = services["postgres"]["environment"]
    for name, service in indexer_services(compose).items():
        settings = load_settings(service.get("environment", {}))
        redis_url = urlsplit(settings.redis_url)
        assert (redis_url.hostname, redis_url.port) == ("redis", 6379), name
        assert redis_url.password == TEST_SECRETS["REDIS_PASSWORD"], name
        if name == "ingester":  # it never touches PostgreSQL: no database password
            assert "DATABASE_URL" not in service["environment"]
            continue
        db = urlsplit(settings.database_url)
        assert db.hostname in services and db.path == f"/{pg['POSTGRES_DB']}", name
        assert (db.username, db.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"]), name
    replicas = services["indexer"]
    assert "INDEXER_CONSUMER" not in replicas["environment"] and "hostname" not in replicas
    assert "container_name" not in replicas
    assert load_settings(replicas["environment"]).consumer == socket.gethostname()
    assert int(replicas["deploy"]["replicas"]) > 1
    bulk = load_compose(env=filled_env() | {"INDEXER_BULK_BACKFILL": "true"})
    assert load_settings(bulk["services"]["indexer"]["environment"]).bulk_backfill is True


def test_stop_grace_outlasts_the_replicas_own_grace():
    services = load_compose()["services"]
    for name in ("indexer", "ingester"):
        grace = services[name]["stop_grace_period"]
        seconds = int(grace.removesuffix("s"))
        assert seconds > DEFAULT_SHUTDOWN_GRACE_S, (name, grace)


def test_the_pending_alert_leaves_room_for_what_the_replicas_hold_by_default():
    """`IndexerPendingGrowing` fires above a number of pending entries: the replicas of the
    compose file, with their default settings, hold up to two batches per worker in hand (one
    in flight, one read into its lane) without anything being wrong."""
    compose = load_compose()
    replicas = compose["services"]["indexer"]
    settings = load_settings(replicas.get("environment", {}))
    in_hand = int(replicas["deploy"]["replicas"]) * 2 * settings.concurrency * settings.batch_size
    (rule,) = [r for r in alert_rules() if r["alert"] == "IndexerPendingGrowing"]
    threshold = int(re.search(r"indexer_stream_pending\) > (\d+)", rule["expr"]).group(1))
    assert threshold >= 2 * in_hand, (threshold, in_hand)
    assert f"{in_hand:,} by" in " ".join(rule["annotations"]["description"].split())
    assert f"past {threshold:,}" in rule["annotations"]["description"]


def test_postgres_gets_its_connections_and_cache_from_the_env_file():
    def options(env: dict[str, str]) -> dict[str, str]:
        command = load_compose(env=env)["services"]["postgres"]["command"]
        assert command[0] == "postgres" and command[1::2] == ["-c"] * (len(command) // 2)
        return dict(c.split("=", 1) for c in command[2::2])

    expected = {"max_connections": "200", "shared_buffers": "1GB"}
    assert options(filled_env()) == expected
    unset = ("POSTGRES_MAX_CONNECTIONS", "POSTGRES_SHARED_BUFFERS")
    assert options({k: v for k, v in filled_env().items() if k not in unset}) == expected
    chosen = filled_env() | {"POSTGRES_MAX_CONNECTIONS": "50", "POSTGRES_SHARED_BUFFERS": "6GB"}
    assert options(chosen) == {"max_connections": "50", "shared_buffers": "6GB"}


def test_redis_keeps_every_entry():
    command = load_compose()["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--requirepass"] == TEST_SECRETS["REDIS_PASSWORD"]


def test_no_secret_is_written_in_the_files():
    """Passwords reach the containers only through ${VAR:?...} from docker/.env, which git
    ignores; .env.example leaves them empty and names every variable compose reads."""
    text = COMPOSE.read_text()
    for line in text.splitlines():
        if re.match(r"\s*[A-Z_]*PASSWORD\s*:", line):
            assert re.search(r":\s*\$\{[A-Z_]+PASSWORD:\?[^}]+\}\s*$", line), line
    for url in re.findall(r"[a-z]+://[^\s\"']+", text):
        if "@" in url:
            userinfo = urlsplit(url).netloc.rsplit("@", 1)[0]
            assert re.fullmatch(r"[a-z]*:\$\{[A-Z_]+:\?[^}]+\}", userinfo), url
    example = env_file(ENV_EXAMPLE)
    assert {k: example[k] for k in TEST_SECRETS} == dict.fromkeys(TEST_SECRETS, "")
    assert compose_variables(text) <= set(example), compose_variables(text) - set(example)
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert ignored.returncode == 0
    for secret in TEST_SECRETS:
        with pytest.raises(MissingVariable, match=secret):
            load_compose(env=example | TEST_SECRETS | {secret: ""})


def test_files_the_services_mount_exist_and_prometheus_scrapes_the_services():
    compose = load_compose()
    services = compose["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), (name, volume)
    build = services["indexer"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert (PROMETHEUS / config["rule_files"][0]).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    [dns] = jobs["indexer"]["dns_sd_configs"]
    assert dns["names"] == ["indexer"] and dns["port"] == DEFAULT_METRICS_PORT
    for job in ("ingester", "compare"):
        [target] = jobs[job]["static_configs"][0]["targets"]
        assert target == f"{job}:{DEFAULT_METRICS_PORT}"
        assert "METRICS_PORT" not in services[job]["environment"]
    assert "/etc/prometheus:ro" in services["prometheus"]["volumes"][0]
    grafana = services["grafana"]["volumes"]
    datasources = yaml.safe_load(
        (DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    provider = yaml.safe_load(
        (DOCKER / "grafana/provisioning/dashboards/firehose-indexer.yml").read_text()
    )["providers"][0]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]
    for dashboard in dashboards().values():
        used = {p["datasource"]["uid"] for p in dashboard["panels"]}
        used |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
        assert used == {datasources[0]["uid"]}
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))


@pytest.mark.skipif(tool("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_accepts_the_file(tmp_path):
    filled = tmp_path / "filled.env"
    filled.write_text("".join(f"{k}={v}\n" for k, v in filled_env().items()))
    args = ["docker-compose", "--project-directory", str(DOCKER), "-f", str(COMPOSE)]
    ok = subprocess.run([*args, "--env-file", str(filled), "config", "-q"],
                        capture_output=True, text=True)  # fmt: skip
    assert (ok.returncode, ok.stderr) == (0, "")
    normalized = subprocess.run([*args, "--env-file", str(filled), "config"],
                                capture_output=True, text=True, check=True)  # fmt: skip
    services = yaml.safe_load(normalized.stdout)["services"]
    assert services["indexer"]["deploy"]["replicas"] == 3
    assert services["cli"]["profiles"] == ["tools"]
    missing = subprocess.run([*args, "--env-file", str(ENV_EXAMPLE), "config", "-q"],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode != 0 and "set " in missing.stderr and "PASSWORD" in missing.stderr


# --- metrics of the alerts and the dashboard ---


def test_every_metric_the_alerts_and_dashboard_use_is_exported():
    exported = exported_metrics()
    exprs = [rule["expr"] for rule in alert_rules()]
    for dashboard in dashboards().values():
        exprs += dashboard_exprs(dashboard)
    assert len(exprs) > 30
    assert metric_problems(exprs, exported) == []
    # the contract's metrics are among them
    for name in ("indexer_stream_lag", "indexer_event_lag_seconds", "indexer_db_pool_waiting",
                 "indexer_coverage_ratio", "ingester_connected", "indexer_dlq_length"):  # fmt: skip
        assert any(name in e for e in exprs), name


@pytest.mark.parametrize(
    ("expr", "reported"),
    [
        ("max(indexer_stream_lags) > 1", "indexer_stream_lags is not exported"),
        ("rate(indexer_events[5m])", "indexer_events is not exported"),
        ("indexer_batch_duration_seconds > 1", "indexer_batch_duration_seconds is not exported"),
        ('indexer_stream_lag{streams="firehose_live"}', "has no label 'streams'"),
        ("sum by (colection) (rate(indexer_events_total[5m]))", "the label 'colection'"),
        ("ingester_connected_total", "ingester_connected_total is not exported"),
    ],
)
def test_an_unknown_metric_or_label_is_reported(expr, reported):
    problems = metric_problems([expr])
    assert len(problems) == 1 and reported in problems[0], problems


def test_every_alert_has_a_runbook_section_a_severity_and_a_unit_test():
    rules = alert_rules()
    assert len(rules) >= 13
    sections = anchors(RUNBOOK.read_text())
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor in sections, rule["alert"]
        assert rule["alert"] in tested, rule["alert"]


# --- promtool ---

needs_promtool = pytest.mark.skipif(tool("promtool") is None, reason="promtool is not installed")


def _promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules_and_their_tests_pass():
    rules = _promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout
    tests = _promtool("test", "rules", "alerts_test.yml")
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout


# Each change makes one rule wrong in a way an operator would regret; the unit tests must see it.
RULE_MUTATIONS = {
    "lag alerts count the backfill stream": ('{stream!~".*backfill.*"}', ""),
    "pending alert without its growth": ("(delta(indexer_stream_pending[15m])) > 0",
                                         "(delta(indexer_stream_pending[15m])) > -1e9"),
    "stuck alert on an old but moving backlog": (
        "(delta(indexer_stream_oldest_pending_seconds[10m])) > 500",
        "(delta(indexer_stream_oldest_pending_seconds[10m])) > -1e9"),
    "event age from the stalest replica": ("min(indexer_event_lag_seconds) > 120",
                                           "max(indexer_event_lag_seconds) > 120"),
    "dead letters that are old": ("max by (stream) (delta(indexer_dlq_length[15m])) > 0",
                                  "max by (stream) (indexer_dlq_length) > 0"),
    "pool busy without waiters": ("indexer_db_pool_waiting > 0", "indexer_db_pool_waiting >= 0"),
    "coverage at 95%": ("< 0.99", "< 0.95"),
    "never-connected ingester": ("absent(ingester_connected == 1)", "ingester_connected == 0"),
    "a clean scale-down as a lost replica": ("max(indexer_stream_consumers) >",
                                             "max(indexer_stream_consumers) + 1 >"),
    "flapping backpressure": ("avg_over_time(ingester_backpressure[15m]) > 0.5",
                              "max_over_time(ingester_backpressure[15m]) > 0.5"),
}  # fmt: skip


@needs_promtool
@pytest.mark.parametrize("mutation", sorted(RULE_MUTATIONS))
def test_the_rule_unit_tests_catch_a_wrong_rule(tmp_path, mutation):
    before, after = RULE_MUTATIONS[mutation]
    rules = (PROMETHEUS / "alerts.yml").read_text()
    assert before in rules
    (tmp_path / "alerts.yml").write_text(rules.replace(before, after))
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    assert _promtool("check", "rules", "alerts.yml", cwd=tmp_path).returncode == 0
    result = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr, mutation


# --- the image ---


def _dockerignore_allows(path: str) -> bool:
    allowed = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line == "*":
            allowed = False
        elif line.startswith("!") and path.rstrip("/") == line[1:].rstrip("/"):
            allowed = True
    return allowed


def test_the_image_gets_a_working_package_from_what_it_copies(tmp_path):
    """A wheel built from exactly the files the Dockerfile copies (and .dockerignore lets
    through) holds the migrations, plugins and data, and imports and finds its migrations."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+) (\S+)$", dockerfile, flags=re.MULTILINE)
    context = tmp_path / "context"
    context.mkdir()
    for sources, _ in copies:
        for source in sources.split():
            assert _dockerignore_allows(source), source
            src = REPO / source
            if src.is_dir():
                shutil.copytree(src, context / source,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
            else:
                shutil.copy(src, context / source)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "out"),
         str(context)], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "out").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sql = sorted(p.name for p in (REPO / "sql").glob("*.sql"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("indexer/sql/")) == sql
    assert "plugins/__init__.py" in names and "indexer/data/zstd_dictionary" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import indexer, indexer.cli, plugins; from indexer.migrate import load_migrations; "
        "print(indexer.__file__); print(len(load_migrations())); print(sorted(plugins.registry()))"
    )
    ran = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(site)},
                         cwd=site, capture_output=True, text=True, check=True)  # fmt: skip
    where, count, plugins = ran.stdout.splitlines()
    assert where.startswith(str(site)) and int(count) == len(sql)
    assert "app.bsky.feed.like" in plugins


# --- the Redis health check, on a real redis-server ---


async def _healthcheck(test: list[str], port: int, password: str | None) -> int:
    """Run a compose CMD-SHELL health check against a local server (host and port added)."""
    assert test[0] == "CMD-SHELL"
    command = test[1].replace("redis-cli", f"redis-cli -h 127.0.0.1 -p {port}")
    env = {"PATH": "/usr/bin:/bin"} | ({"REDISCLI_AUTH": password} if password else {})
    proc = await asyncio.create_subprocess_shell(command, env=env,
                                                 stdout=asyncio.subprocess.DEVNULL,
                                                 stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
    return await proc.wait()


async def test_redis_is_healthy_only_once_its_aof_is_loaded(tmp_path):
    """Replicas wait for Redis to be healthy: its health check must fail while the AOF loads,
    pass once loaded, and use the password given to the container."""
    redis_service = load_compose()["services"]["redis"]
    test = redis_service["healthcheck"]["test"]
    with throwaway_redis(tmp_path, options={"appendonly": "yes"}) as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            filler = [b"x" * 200] * 5000
            for start in range(0, 20_000, 5000):
                pipe = client.pipeline(transaction=False)
                for n, value in enumerate(filler):
                    pipe.xadd("filler", {"v": value}, id=f"{start + n + 1}-0")
                await pipe.execute()
        finally:
            await client.aclose()

        async def healthy() -> bool:
            return await _healthcheck(test, server.port, None) == 0

        assert await healthy()
        server.stop()
        server.options["key-load-delay"] = "100"  # microseconds per entry: a slow disk
        server.start(loaded=False)  # answers LOADING for about 3 s
        assert not await healthy()
        await until(healthy, within_s=30, step_s=0.1)
        client = aioredis.Redis.from_url(server.url)
        try:
            assert await client.xlen("filler") == 20_000
            await client.config_set("requirepass", TEST_SECRETS["REDIS_PASSWORD"])
        finally:
            await client.aclose()
        assert await _healthcheck(test, server.port, TEST_SECRETS["REDIS_PASSWORD"]) == 0
        assert await _healthcheck(test, server.port, "wrong") != 0
        assert redis_service["environment"]["REDISCLI_AUTH"] == TEST_SECRETS["REDIS_PASSWORD"]


def test_dashboard_files_are_valid_json():
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files
    for path in files:
        doc = json.loads(path.read_text())
        assert doc["uid"] and doc["title"] and len(doc["panels"]) >= 11
