"""``refloop cluster``: the nodes sharing this store, the singleton lease, what is in
flight (docs/scale-out.md)."""

from __future__ import annotations

import json
import time

import click

from engine.cli.common import errors, load_routes, open_store, routes_option, state_option


def register(main: click.Group) -> None:
    """Add the ``cluster`` group (defined below) to ``main``."""
    main.add_command(cluster)


@click.group("cluster")
def cluster() -> None:
    """Several nodes on one store: nodes, leases, processing lag, outbox in flight.

    Example: refloop cluster status
    """


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s"


@cluster.command("status")
@state_option
@routes_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def cluster_status_cmd(state_dir: str, routes_path: str, as_json: bool) -> None:
    """Nodes (alive, stale or stopped by heartbeat age), leases (holder, expires in),
    processing lag and outbox rows in flight per node. Reads the database only.

    A node is stale when its heartbeat is older than store.lease_seconds.

    Example: refloop cluster status --json
    """
    from engine.cluster import cluster_status

    cfg = load_routes(routes_path)
    with errors():
        db = open_store(state_dir, routes_path)
        try:
            status = cluster_status(db.conn, time.time(), cfg.store.lease_seconds)
        finally:
            db.close()
    if as_json:
        click.echo(json.dumps(status, indent=1))
        return
    click.echo(
        f"{'NODE':<28} {'STATE':<8} {'HEARTBEAT':>9}  {'VERSION':<8} {'CONFIG':<12} ADDRESSES"
    )
    for n in status["nodes"]:
        click.echo(
            f"{n['node_id'][:28]:<28} {n['state']:<8} {_secs(n['heartbeat_age_seconds']):>9}  "
            f"{n['version'][:8]:<8} {n['config'] or '-':<12} {' '.join(n['addresses']) or '-'}"
        )
    if not status["nodes"]:
        click.echo("(no node has started on this store yet)")
    if status["config_drift"]:
        click.echo("warning: alive nodes run different routes.yaml (CONFIG differs)")
    click.echo("")
    click.echo(f"{'LEASE':<12} {'HOLDER':<28} {'EXPIRES IN':>10} {'TOKEN':>6}")
    for lease in status["leases"]:
        holder = lease["holder"] or f"(none; last {lease['last_holder']})"
        click.echo(
            f"{lease['name']:<12} {holder[:28]:<28} "
            f"{_secs(max(0.0, lease['expires_in_seconds'])):>10} {lease['token']:>6}"
        )
    p = status["processing"]
    click.echo("")
    click.echo(
        f"processing lag: {p['lag_messages']} message(s) waiting, "
        f"oldest {_secs(p['oldest_waiting_seconds'])}"
    )
    flight = status["outbox_in_flight"]
    click.echo(
        "outbox in flight: "
        + (", ".join(f"{f['node_id']} {f['rows']}" for f in flight) if flight else "none")
    )
