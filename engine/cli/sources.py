"""``refloop sources``: each source's figures, as the dashboard's Sources page shows them."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from engine.cli.common import errors, load_routes, open_store, routes_option, state_option
from engine.config import Config


def register(main: click.Group) -> None:
    """Add the ``sources`` group (defined below) to ``main``."""
    main.add_command(sources)


@click.group("sources")
def sources() -> None:
    """MLLP, FHIR and Direct sources: connections, traffic today, last error.

    Example: refloop sources status
    """


def metrics_url(cfg: Config) -> str:
    """The daemon's ``/metrics`` from routes.yaml's ``http`` section (a wildcard bind
    address is reached on loopback)."""
    host = cfg.http.host if cfg.http.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.http.port}/metrics"


def read_live(url: str, timeout: float) -> dict[str, dict[str, Any]] | None:
    """The daemon's live figures from its ``/metrics``; None when it does not answer."""
    import httpx

    from engine.ingest.status import exposition_samples, live_from_samples

    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return live_from_samples(exposition_samples(response.text))


@sources.command("status")
@state_option
@routes_option
@click.option(
    "--metrics-url",
    "metrics_url_",
    help="The daemon's metrics (default: from the http section of --routes, "
    "http://HOST:PORT/metrics).",
)
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for the daemon.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, as GET /api/sources.")
def sources_status(
    state_dir: str, routes_path: str, metrics_url_: str | None, timeout: float, as_json: bool
) -> None:
    """Per source: open connections, last message, messages today (UTC) by status, last error.

    Counts, last message and failed messages come from the database (read-only); open
    connections and the newest framing, connection or poll problem come from the running
    daemon's /metrics. When the daemon does not answer, those are left out (a note on
    stderr says so) and the exit status is still 0.

    Example: refloop sources status --json
    """
    from engine.ingest.status import source_status

    cfg = load_routes(routes_path)
    url = metrics_url_ or metrics_url(cfg)
    live = read_live(url, timeout) if cfg.http.enabled else None
    with errors():
        db = open_store(state_dir, routes_path)
        try:
            items = source_status(db.conn, cfg, time.time(), live)
        finally:
            db.close()
    if live is None:
        why = f"no daemon answered at {url}" if cfg.http.enabled else "routes.yaml disables http"
        click.echo(f"note: {why}; live figures left out", err=True)
    if as_json:
        click.echo(json.dumps(items, indent=1))
        return
    click.echo(
        f"{'SOURCE':<12} {'KIND':<6} {'CONN':>4}  {'LAST MESSAGE (UTC)':<19}  {'TODAY':>6} "
        f"{'ROUTED':>6} {'FILTER':>6} {'ERROR':>6} {'REJECT':>6}  LAST ERROR"
    )
    for s in items:
        conn = "-" if s["connections_open"] is None else str(s["connections_open"])
        last = (s["last_message_at"] or "-")[:19].replace("T", " ")
        today = s["today"]
        error = (
            f"{s['last_error_at'][:19].replace('T', ' ')} {s['last_error']}"
            if s["last_error"]
            else "-"
        )
        click.echo(
            f"{s['name'][:12]:<12} {s['kind']:<6} {conn:>4}  {last:<19}  {s['today_total']:>6} "
            f"{today['routed']:>6} {today['filtered']:>6} {today['error']:>6} "
            f"{today['rejected']:>6}  {error}"
        )
