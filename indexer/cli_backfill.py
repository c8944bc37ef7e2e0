"""`indexer backfill`: whole repos into the backfill stream (see indexer/backfill.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from indexer import gcpolicy
from indexer.cli_support import fail, run, state, with_redis
from indexer.constants import BACKFILL_PAGE

log = logging.getLogger("indexer")

backfill_app = typer.Typer(
    help="Whole repos (getRepo CARs) into the backfill stream; replicas read the live one first.",
)

FromRelay = Annotated[
    bool, typer.Option(help="Fetch repos from RELAY_URL instead of each account's PDS.")
]


@backfill_app.callback(invoke_without_command=True)
def backfill_options(
    ctx: typer.Context,
    from_file: Annotated[
        Path | None, typer.Option(help="Backfill the DIDs in this file, one per line.")
    ] = None,
    from_relay: FromRelay = False,
) -> None:
    """Repos named with `repo DID...` or `--from-file F`, or every repo a relay lists (`all`)."""
    if ctx.invoked_subcommand is not None:
        return
    if from_file is None:
        typer.echo(ctx.get_help(), err=True)
        fail("give `repo DID...`, `--from-file F` or `all`", 2)
    try:
        lines = from_file.read_text().splitlines()
    except OSError as exc:
        fail(f"cannot read {from_file}: {exc.strerror}", 1)
    dids = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    _backfill_dids(dids, from_relay)


@backfill_app.command("repo")
def backfill_repo(
    dids: Annotated[list[str], typer.Argument(help="DIDs of the repos.")],
    from_relay: FromRelay = False,
) -> None:
    """Backfill these repos now, whatever was backfilled before; exit 1 if any failed."""
    _backfill_dids(dids, from_relay)


@backfill_app.command("all")
def backfill_all(
    from_relay: FromRelay = False,
    page_size: Annotated[
        int, typer.Option(min=1, max=1000, help="Repos per listRepos page.")
    ] = BACKFILL_PAGE,
) -> None:
    """Every repo RELAY_URL lists, skipping those already backfilled at that rev; resumable."""
    from indexer.backfill_run import Plan, backfill

    gcpolicy.tune()
    result = run(backfill(state.settings, Plan(None, from_relay, page_size)))
    _report_backfill(result)
    if result.complete:
        typer.echo("every listed repo is finished; the next run starts from the first page")


@backfill_app.command("failed")
def backfill_failed(
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines on stdout.")] = False,
) -> None:
    """Repos whose backfill failed, with the reason (`backfill repo DID` tries one again)."""
    from indexer.backfill import backfill_stream, failed_repos

    stream = backfill_stream(state.settings)
    failed = run(with_redis(lambda r: failed_repos(r, stream)))
    for did, detail in failed.items():
        line = json.dumps({"did": did} | detail) if json_out else f"{did}  {detail['reason']}"
        typer.echo(line)
    if not json_out:
        typer.echo(f"{len(failed)} failed repo(s) in {stream}", err=True)


def _backfill_dids(dids: list[str], from_relay: bool) -> None:
    from indexer.backfill_run import Plan, backfill

    bad = [d for d in dids if not d.startswith(("did:plc:", "did:web:"))]
    if bad or not dids:
        fail(f"not a did:plc or did:web: {bad[0]!r}" if bad else "no DID given", 2)
    gcpolicy.tune()
    result = run(backfill(state.settings, Plan(dids, from_relay)))
    _report_backfill(result)
    if result.progress.failed:
        raise typer.Exit(1)


def _report_backfill(result: Any) -> None:
    note = "; stopped by a signal, the repos in hand were finished" if result.stopped else ""
    typer.echo(f"{result.progress.line()} into {result.stream}{note}")
    if result.progress.failed:
        typer.echo("see `indexer backfill failed` for the reasons", err=True)


async def repair_missing(dids: list[str]) -> None:
    """Backfill the repos `compare` found records missing from (the gap found is closed)."""
    from indexer.backfill_run import Plan, backfill

    log.info("repair: backfilling %d repo(s) with missing records", len(dids))
    result = await backfill(state.settings, Plan(dids), standalone=False)
    log.info("repair: %s", result.progress.line())
