"""The ``refloop`` command line: thin over the library.

Each command builds its settings, calls one engine function and maps EngineError to a
one-line message (exit 1; configuration errors exit 2). No tracebacks for users.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click

from engine.cli.common import (
    LazyGroup,
    MainGroup,
    database_path,
    errors,
    load_routes,
    login_name,
    open_store,
    routes_option,
    state_option,
    store_override,
)
from engine.clock import isoformat, parse_iso
from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.config import Config
    from engine.routing.table import RouteTable

log = logging.getLogger("refloop")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(cls=MainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="refloop")
def main() -> None:
    """refloop: an HL7 v2 / FHIR integration engine for closed-loop referral tracking.

    Each command's --help has an example; docs/cli.md describes them all.

    Example: refloop run --routes routes.yaml --state state
    """


assert isinstance(main, MainGroup)


# -- run --------------------------------------------------------------------------


@main.command()
@routes_option
@state_option
@click.option("--log-level", default="info", show_default=True, help="debug, info, warning.")
def run(routes_path: str, state_dir: str, log_level: str) -> None:
    """Start the daemon: MLLP listeners, processing, HTTP (health, metrics).

    Processing (routes, tracker, outbox, timers) runs in a worker process this command
    starts and supervises (processing.workers: 0 keeps it in this process). SIGTERM or
    Ctrl-C drains in-flight messages, stops the worker and exits 0.

    Example: refloop run --routes routes.yaml --state state
    """
    import aiorun

    from engine.app import Engine

    setup_logging(log_level)
    os.umask(0o077)  # the database and anything else we write holds PHI
    store_url = store_override()
    with errors():
        cfg = load_config(routes_path)
        table = _compile_routes(cfg)
    # processing.workers 1 (the default): routes and tracker in a supervised worker process
    role = "listener" if cfg.processing.workers else "all"
    engine = Engine(cfg, Path(state_dir), table=table, store=store_url, role=role)

    async def start() -> None:
        await engine.start()
        ports = engine.ports()
        log.info("ready: %s", ", ".join(f"{k}={v}" for k, v in sorted(ports.items())))
        _install_reload(engine)

    async def shutdown(loop: Any) -> None:
        await engine.stop()

    try:
        aiorun.run(
            start(),
            use_uvloop=_have_uvloop(),
            stop_on_unhandled_errors=True,
            shutdown_callback=shutdown,
        )
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc.strerror or exc}") from None


def _have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _install_reload(engine: Any) -> None:
    """SIGHUP re-reads routes.yaml where the engine supports it."""
    import signal

    reload = getattr(engine, "reload", None)
    if reload is None:
        return
    import asyncio

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


def load_config(path: str) -> Config:
    """routes.yaml loaded; ConfigError lists every problem (engine.config, imported on use)."""
    from engine.config import load

    return load(path)


def _compile_routes(cfg: Config) -> RouteTable:
    """The routing sections compiled; ConfigError lists every problem."""
    from engine.routing.compile import compile_config

    return compile_config(cfg)


# -- send -------------------------------------------------------------------------


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", envvar="REFLOOP_MLLP_PORT", default=2575, show_default=True, type=int)
@click.option(
    "--raw",
    is_flag=True,
    help="Send each message's bytes as they are in the file "
    "(default: segment ends normalised to CR).",
)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for each ACK.")
@click.option(
    "--tls-ca", type=click.Path(exists=True, dir_okay=False), help="Use TLS, trusting this CA file."
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="Client certificate (PEM) for mutual TLS.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    help="Client key (PEM) for mutual TLS.",
)
def send(
    files: tuple[str, ...],
    host: str,
    port: int,
    raw: bool,
    timeout: float,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Send HL7 v2 files over MLLP and print each message's ACK code.

    Files may hold several messages, with any line endings, and FHS/BHS batches (each
    message is sent on its own). Exits 1 if any message was not answered AA or CA.

    Example: refloop send --port 2575 ../shared/corpus/hl7/fhir-converter/REF-I12-01.hl7
    """
    import asyncio

    from engine.hl7v2.client import MllpClient, normalise
    from engine.hl7v2.message import split_messages

    ssl_context = None
    if tls_ca or tls_cert:
        import ssl

        ssl_context = ssl.create_default_context(cafile=tls_ca)
        if tls_cert:
            ssl_context.load_cert_chain(tls_cert, tls_key)

    async def go() -> bool:
        ok = True
        client = await MllpClient.connect(host, port, timeout=timeout, ssl_context=ssl_context)
        try:
            for path in files:
                data = Path(path).read_bytes()
                batch = split_messages(data)
                messages = batch.messages or (data,)
                for n, message in enumerate(messages, 1):
                    result = await client.send(message if raw else normalise(message))
                    good = result.code in ("AA", "CA")
                    ok = ok and good
                    label = f"{path}#{n}" if len(messages) > 1 else path
                    text = f" {result.text}" if result.text and not good else ""
                    click.echo(f"{label}\t{result.control_id or '-'}\t{result.code or '--'}{text}")
                    if not result.code:
                        await client.close()
                        client = await MllpClient.connect(
                            host, port, timeout=timeout, ssl_context=ssl_context
                        )
        finally:
            await client.close()
        return ok

    with errors():
        ok = asyncio.run(go())
    if not ok:
        raise SystemExit(1)


# -- messages ---------------------------------------------------------------------


@main.group()
def messages() -> None:
    """Look at stored inbox messages.

    Example: refloop messages list --status error --limit 20
    """


def _open_inbox(state_dir: str, routes_path: str) -> Any:
    from engine.store import Inbox

    return Inbox(open_store(state_dir, routes_path))


def _time_arg(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_iso(value)
    except ValueError:
        raise click.BadParameter(f"not an ISO date or time: {value!r}") from None


@messages.command("list")
@state_option
@routes_option
@click.option("--since", help="Received at or after (ISO date or time, UTC).")
@click.option("--type", "message_type", help="Message type, e.g. ORM^O01 or SIU^S1*.")
@click.option(
    "--status", type=click.Choice(["received", "routed", "filtered", "error", "rejected"])
)
@click.option("--limit", default=50, show_default=True, help="Rows to show; 0 = all.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def messages_list(
    state_dir: str,
    routes_path: str,
    since: str | None,
    message_type: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List inbox messages, newest first (metadata only; no message content).

    Example: refloop messages list --type 'SIU^S1*' --status error --limit 20
    """
    after = _time_arg(since)  # a usage error before anything is opened
    with errors():
        inbox = _open_inbox(state_dir, routes_path)
        rows = list(inbox.list(since=after, message_type=message_type, status=status, limit=limit))
    items = [
        {
            "id": r.id,
            "received_at": isoformat(r.received_at),
            "source": r.source,
            "peer": r.peer,
            "control_id": r.control_id,
            "type": r.message_type,
            "version": r.version,
            "status": r.status,
            "ack_code": r.ack_code,
            "error": r.error,
            "duplicates": r.duplicates,
            "flags": r.flags,
            "route": r.route,
            "pruned_at": None if r.pruned_at is None else isoformat(r.pruned_at),
        }
        for r in rows
    ]
    if as_json:
        click.echo(json.dumps(items, indent=1))
        return
    click.echo(
        f"{'ID':>7}  {'RECEIVED (UTC)':<24} {'SOURCE':<10} {'TYPE':<9} "
        f"{'CONTROL ID':<22} {'STATUS':<9} ACK  NOTE"
    )
    for i in items:
        note = i["error"] or i["route"] or i["flags"]
        if i["duplicates"]:
            note = f"{note} (+{i['duplicates']} duplicate)".strip()
        if i["pruned_at"]:
            note = f"{note} (bytes pruned)".strip()
        click.echo(
            f"{i['id']:>7}  {i['received_at'][:23]:<24} {i['source'][:10]:<10} "
            f"{i['type'][:9] or '-':<9} {i['control_id'][:22] or '-':<22} {i['status']:<9} "
            f"{i['ack_code'] or '--':<4} {note}"
        )


@messages.command("show")
@click.argument("message_id", type=int)
@state_option
@routes_option
@click.option("--raw", is_flag=True, help="Write the exact stored bytes to stdout.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: metadata and segments.")
def messages_show(
    message_id: int, state_dir: str, routes_path: str, raw: bool, as_json: bool
) -> None:
    """Show one stored message: its metadata and its segments, one per line.

    A message whose bytes retention pruned shows its metadata only (and --raw fails).

    Example: refloop messages show 42 --raw > message.hl7
    """
    if raw and as_json:
        raise click.UsageError("--raw and --json do not go together")
    with errors():
        inbox = _open_inbox(state_dir, routes_path)
        row = inbox.get(message_id)
    if row is None:
        raise click.ClickException(f"no message with id {message_id}")
    pruned = (
        f"pruned {isoformat(row.pruned_at)} under the retention policy"
        if row.pruned_at is not None
        else ""
    )
    if raw:
        if pruned:
            raise click.ClickException(f"message {message_id}: its bytes were {pruned}")
        sys.stdout.buffer.write(row.raw)
        sys.stdout.buffer.flush()
        return
    text = row.raw.decode(row.charset or "latin-1", errors="replace")
    segments = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]
    if as_json:
        item = {
            "id": row.id,
            "received_at": isoformat(row.received_at),
            "source": row.source,
            "peer": row.peer,
            "sending_app": row.sending_app,
            "sending_facility": row.sending_facility,
            "control_id": row.control_id,
            "type": row.message_type,
            "version": row.version,
            "charset": row.charset,
            "status": row.status,
            "error": row.error,
            "route": row.route,
            "ack_code": row.ack_code,
            "duplicates": row.duplicates,
            "flags": row.flags,
            "bytes": len(row.raw),
            "segments": segments,
        }
        click.echo(json.dumps(item, indent=1, ensure_ascii=False))
        return
    for key, value in (
        ("id", row.id),
        ("received", isoformat(row.received_at)),
        ("source", f"{row.source} from {row.peer}"),
        ("sender", f"{row.sending_app} / {row.sending_facility}"),
        # rejected before MSH-10 was read (an empty MSH-9): none, and why
        ("control id", row.control_id or f"- (not read: {row.error or 'no MSH-10'})"),
        ("type", row.message_type),
        ("version", row.version),
        ("charset", row.charset),
        ("status", row.status + (f" ({row.error})" if row.error else "")),
        ("route", row.route or "-"),
        ("ack", row.ack_code or "-"),
        ("duplicates", row.duplicates),
        ("flags", row.flags or "-"),
        ("bytes", pruned or len(row.raw)),
        ("sha256", row.sha256.hex() or "-"),
    ):
        click.echo(f"{key:>11}: {value}")
    if pruned:
        return  # the metadata is all there is (refloop messages show --help)
    click.echo("")
    for seg in segments:
        click.echo(seg)


# -- routes -----------------------------------------------------------------------


@main.group("routes")
def routes_group() -> None:
    """Check routes.yaml, try messages against it, or make the running daemon reload it.

    Example: refloop routes test message.hl7
    """


@routes_group.command("check")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@routes_option
def routes_check(path: str | None, routes_path: str) -> None:
    """Validate a routes.yaml; print every problem as file:line key.path: message.

    Exits 0 when the file is valid, 2 when it is not.

    Example: refloop routes check routes.yaml
    """
    target = path or routes_path
    with errors():
        cfg = load_config(target)
        _compile_routes(cfg)
    click.echo(f"{target}: ok ({len(cfg.sources)} source(s))")


@routes_group.command("test")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@routes_option
@click.option(
    "--source",
    help="Pretend the messages came from this source (default: the first MLLP source, "
    "and for FHIR JSON the first FHIR source).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON array, one object per message.")
def routes_test(file: str, routes_path: str, source: str | None, as_json: bool) -> None:
    """Show what the routes would do with each message of FILE; store and send nothing.

    FILE holds HL7 v2 messages (one or many, LF or CR line ends, FHS/BHS batches) or
    FHIR JSON (a resource, a Bundle, an array); - reads stdin. For each message: the
    decision, the matching routes, their extracted fields, the events and the actions.
    Exits 1 if any message would end in error.

    Example: refloop routes test ../shared/corpus/hl7/fhir-converter/REF-I12-01.hl7
    """
    from engine.routing.trial import read_samples, text_lines, try_samples

    with errors():
        cfg = load_config(routes_path)
        table = _compile_routes(cfg)
        data = click.open_file(file, "rb").read()
        samples = read_samples(data)
    if source is not None:  # as POST /api/routes/test: an unknown source is an error
        from engine.ingest.status import configured_sources

        known = [s.name for s in configured_sources(cfg)]
        if source not in known:
            raise click.BadParameter(
                f"no source {source!r} in {routes_path} (sources: {', '.join(known) or '-'})",
                param_hint="'--source'",
            )
    mllp = source or (cfg.sources[0].name if cfg.sources else "test")
    fhir = source or (cfg.fhir_sources[0].name if cfg.fhir_sources else mllp)
    results = try_samples(table, samples, mllp, fhir)
    if as_json:
        click.echo(json.dumps(results, indent=1, ensure_ascii=False))
    else:
        for result in results:
            for text in text_lines(result):
                click.echo(text)
        skipped = len(samples) - len(results)
        if skipped:
            click.echo(f"({skipped} more message(s) not tried)")
    if any(r["status"] == "error" for r in results):
        raise SystemExit(1)


@routes_group.command("reload")
@routes_option
@click.option(
    "--url",
    help="The daemon's admin URL (default: from the http section of --routes, "
    "http://HOST:PORT/admin/reload).",
)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait.")
def routes_reload(routes_path: str, url: str | None, timeout: float) -> None:
    """Ask the running daemon to re-read routes.yaml (as SIGHUP does).

    The daemon validates the file first; if it is invalid the running routes stay, the
    problems are printed and the exit status is 2. The admin endpoint answers loopback
    clients only.

    Example: refloop routes reload --url http://127.0.0.1:8575/admin/reload
    """
    import httpx

    token = ""
    if url is None:
        with errors():
            cfg = load_config(routes_path)
        host = cfg.http.host if cfg.http.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        url = f"http://{host}:{cfg.http.port}/admin/reload"
        token = cfg.http.admin_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code == 200:
        click.echo("reloaded")
        return
    if response.status_code == 422:
        for line in body.get("problems", []):
            click.echo(line, err=True)
        click.echo("routes.yaml is invalid; the daemon keeps its running routes", err=True)
        raise SystemExit(2)
    raise click.ClickException(f"{url}: HTTP {response.status_code} {body.get('status', '')}")


# -- replay -----------------------------------------------------------------------


@main.command()
@routes_option
@state_option
@click.option("--id", "ids", multiple=True, type=int, help="A message id (repeatable).")
@click.option("--since", help="Received at or after (ISO date or time, UTC).")
@click.option("--until", help="Received before (ISO date or time, UTC).")
@click.option("--type", "message_type", help="Message type, e.g. ORM^O01 or SIU^S1*.")
@click.option("--source", help="Source name from routes.yaml.")
@click.option("--status", type=click.Choice(["routed", "filtered", "error"]))
@click.option("--route", help="Only messages the named route decided.")
@click.option("--dry-run", is_flag=True, help="Show old and new decisions; change nothing.")
@click.option(
    "--resend", is_flag=True, help="Queue send/forward rows again (unchanged decisions too)."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message, one a line.")
def replay(
    routes_path: str,
    state_dir: str,
    ids: tuple[int, ...],
    since: str | None,
    until: str | None,
    message_type: str | None,
    source: str | None,
    status: str | None,
    route: str | None,
    dry_run: bool,
    resend: bool,
    as_json: bool,
) -> None:
    """Re-run stored inbox messages through the current routes.yaml.

    With --dry-run, print each message's old and new decision and write nothing (the
    database is opened read-only). Otherwise re-apply the messages whose decision changed,
    each in its own transaction; the tracker never gets the same event twice and
    send/forward side effects are not repeated unless --resend. Safe while the daemon runs.
    Who replayed is recorded with each re-applied decision.

    Example: refloop replay --type 'SIU^S1*' --since 2026-01-01 --dry-run
    """
    from engine.routing.replay import ReplayFilter, ReplayItem
    from engine.routing.replay import replay as run_replay

    flt = ReplayFilter(
        ids=ids,
        since=_time_arg(since),
        until=_time_arg(until),
        message_type=message_type,
        source=source,
        status=status,
        route=route,
    )

    def line(item: ReplayItem) -> str:
        if as_json:
            return json.dumps(item.as_dict(), sort_keys=True)
        old = f"{item.old.status}:{item.old.route or '-'}"
        if item.skipped:
            return f"{item.message_id:>7}  {item.message_type:<9} {old}  skipped ({item.skipped})"
        assert item.new is not None
        new = f"{item.new.status}:{item.new.route or '-'}"
        events = ",".join(item.new.events) or item.new.reason
        mark = "applied" if item.applied else ("changed" if item.changed else "same")
        return f"{item.message_id:>7}  {item.message_type:<9} {old} -> {new}  {mark}  {events}"

    with errors():
        cfg = load_routes(routes_path)
        db_path = database_path(state_dir, cfg)
        bar_wanted = sys.stdout.isatty() and not as_json
        lines: list[str] = []
        with ExitStack() as stack:
            bars: list[Any] = []

            def progress(item: ReplayItem, total: int) -> None:
                if not bar_wanted:
                    click.echo(line(item))
                    return
                lines.append(line(item))
                if not bars:
                    bars.append(
                        stack.enter_context(click.progressbar(length=total, label="replaying"))
                    )
                bars[0].update(1)

            summary = run_replay(
                db_path,
                cfg,
                flt,
                dry_run=dry_run,
                resend=resend,
                user=login_name(),
                progress=progress,
            )
        for text in lines:
            click.echo(text)
    verb = "would change" if dry_run else "re-applied"
    count = summary.changed if dry_run else summary.applied
    click.echo(
        f"{summary.selected} selected, {count} {verb}, {summary.skipped} skipped",
        err=as_json,
    )


# -- simulate ---------------------------------------------------------------------


@main.command()
@click.argument("scenario", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The whole result as JSON.")
@click.option(
    "--scale",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Multiply a generated practice's volume (e.g. 0.1 for a quick look).",
)
@click.option("--summary", is_flag=True, help="Totals only, no per-referral timelines.")
@click.option(
    "--keep",
    type=click.Path(file_okay=False),
    help="Keep the simulated state (database, routes.yaml) in this folder.",
)
@click.option(
    "--baseline", is_flag=True, help="refloop's automation off: only a coordinator task at 14 days."
)
@click.option(
    "--compare", is_flag=True, help="Run refloop and the baseline on the same seed; side by side."
)
@click.option("--markdown", is_flag=True, help="With --compare: the table as Markdown.")
def simulate(
    scenario: str,
    as_json: bool,
    scale: float,
    summary: bool,
    keep: str | None,
    baseline: bool,
    compare: bool,
    markdown: bool,
) -> None:
    """Run a scenario through the real engine on a virtual clock; print what happened.

    Months of a practice in seconds: the real routes, store, MLLP listener and webhooks,
    with patients, specialists and channel outcomes played from the scenario. Same
    scenario and seed, byte-identical output. Scenarios: docs/scenarios/.

    Example: refloop simulate docs/scenarios/practice-800.yaml --summary
    (--compare --markdown prints docs/simulator.md's table)
    """
    from engine.sim import simulate as sim

    if markdown and not compare:
        raise click.UsageError("--markdown goes with --compare")
    if compare and (baseline or keep):
        raise click.UsageError("--compare runs both: drop --baseline and --keep")
    with errors():
        loaded = sim.load_scenario(scenario, scale=scale)
        folder = Path(keep) if keep else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        result = sim.simulate(loaded, folder, baseline=baseline)
        if compare:
            base = sim.simulate(loaded, None, baseline=True)
    if compare:
        _print_compare(sim, result, base, as_json=as_json, markdown=markdown)
        return
    if as_json:
        click.echo(sim.to_json(result), nl=False)
    else:
        click.echo(sim.render_text(result, timelines=not summary), nl=False)


def _print_compare(
    sim: Any, result: dict[str, Any], base: dict[str, Any], *, as_json: bool, markdown: bool
) -> None:
    from engine.sim.report import compare_table

    if as_json:
        click.echo(sim.to_json({"refloop": result, "baseline": base}), nl=False)
    else:
        click.echo(compare_table(result, base, markdown=markdown), nl=False)


# -- command groups defined beside the modules they drive ---------------------------
# Loaded when a command of theirs runs (or its --help is asked), not at start: they import
# the store, the tracker and, through them, the channel SDKs, which `refloop --version`
# and `refloop --help` do not need (bench/cli.py measures the start).


LAZY_GROUPS: Final[dict[str, LazyGroup]] = {
    group.name: group
    for group in (
        LazyGroup("audit", "Check and export the hash-chained audit log.",
                  lambda: importlib.import_module("engine.cli.tracker")),
        LazyGroup("backup",
                  "Copy the database to DEST, safely while the daemon runs, and verify the copy.",
                  lambda: importlib.import_module("engine.cli.backup")),
        LazyGroup("restore",
                  "Replace the database with the backup SRC (the daemon must be stopped).",
                  lambda: importlib.import_module("engine.cli.backup")),
        LazyGroup("cluster",
                  "Several nodes on one store: nodes, leases, processing lag, outbox in flight.",
                  lambda: importlib.import_module("engine.cli.cluster")),
        LazyGroup("outbox", "Outbound messages: see what is queued, sent or dead; retry or cancel.",
                  lambda: importlib.import_module("engine.cli.outbox")),
        LazyGroup("parked", "Events that matched no referral.",
                  lambda: importlib.import_module("engine.cli.tracker")),
        LazyGroup("prune", "Prune PHI past its retention period now (routes.yaml ``retention:``).",
                  lambda: importlib.import_module("engine.cli.prune")),
        LazyGroup("referrals", "List, inspect, close and link referrals.",
                  lambda: importlib.import_module("engine.cli.tracker")),
        LazyGroup("report", "Quality reports from the referral store.",
                  lambda: importlib.import_module("engine.cli.report")),
        LazyGroup("sources",
                  "MLLP, FHIR and Direct sources: connections, traffic today, last error.",
                  lambda: importlib.import_module("engine.cli.sources")),
        LazyGroup("specialists",
                  "The specialist directory: Direct addresses, certificates, fax numbers.",
                  lambda: importlib.import_module("engine.cli.specialists")),
        LazyGroup("store", "The database: copy a SQLite installation into PostgreSQL.",
                  lambda: importlib.import_module("engine.cli.store")),
        LazyGroup("tasks", "Coordinator tasks of the built-in queue: list, done, assign, snooze.",
                  lambda: importlib.import_module("engine.cli.tasks")),
        LazyGroup("timers", "Pending escalation timers.",
                  lambda: importlib.import_module("engine.cli.timers")),
        LazyGroup("users", "Dashboard and API users: coordinator, analyst, admin.",
                  lambda: importlib.import_module("engine.cli.users")),
    )
}  # fmt: skip
main.lazy = LAZY_GROUPS


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="refloop")
