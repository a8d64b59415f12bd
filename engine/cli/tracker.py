"""The referral commands: ``refloop referrals`` (list, show, close, link, auth),
``refloop parked`` (list) and ``refloop audit`` (verify, export).

Each group is defined here at module level with the shared options of engine.cli.common;
engine.cli.main imports this module and adds them (:func:`register`), so imports only
run downward.

Commands that only read open the database read-only (safe while the daemon runs); the
operator actions (close, link, auth) write in one short transaction each, through the
tracker's operator actions (engine.tracking.actions).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from engine.cli.common import (
    errors,
    login_name,
    open_referral_store,
    routes_option,
    state_option,
)
from engine.clock import WallClock, isoformat, parse_iso
from engine.store import audit as audit_store
from engine.store.referral_search import SORTS
from engine.tracking import states
from engine.tracking.views import find_referrals, list_parked, show_referral


def register(main: click.Group) -> None:
    """Add the ``referrals``, ``parked`` and ``audit`` groups to ``main``."""
    for group in (referrals, parked, audit):
        main.add_command(group)


def actor_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--actor",
        default=None,
        help="Who is acting, for the audit log (default: your login name).",
    )(f)


# -- referrals ----------------------------------------------------------------------


@click.group("referrals")
def referrals() -> None:
    """List, inspect, close and link referrals.

    Example: refloop referrals list --status open
    """


@referrals.command("list")
@state_option
@routes_option
@click.option(
    "--q",
    "q",
    default="",
    help="Search: placer or filler number, MRN, start of the patient's family or given name, "
    "birth date, specialty, specialist (every word must match).",
)
@click.option("--status", type=click.Choice(states.OVERALL_STATUSES))
@click.option(
    "--open-days-over", type=click.FloatRange(min=0), help="Not closed, opened over N days ago."
)
@click.option(
    "--specialty",
    help="Specialty: the code as sent (REFCARD) or the one derived from it (cardiology); "
    "whole, case-insensitive.",
)
@click.option(
    "--prior-auth",
    type=click.Choice(["required", "pending", "approved", "denied"]),
    help="Only referrals whose prior-auth work item has this status.",
)
@click.option(
    "--sort",
    type=click.Choice([*SORTS, *(f"-{s}" for s in SORTS)]),
    default="-id",
    show_default=True,
    help="Sort key; a leading - sorts descending (-id: newest first).",
)
@click.option("--after", type=click.IntRange(min=1), help="The page after this referral id.")
@click.option("--limit", default=50, show_default=True, help="Rows to show; 0 = all.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def referrals_list(
    state_dir: str,
    routes_path: str,
    q: str,
    status: str | None,
    open_days_over: float | None,
    specialty: str | None,
    prior_auth: str | None,
    sort: str,
    after: int | None,
    limit: int,
    as_json: bool,
) -> None:
    """List or find referrals, newest first; a last line says which of how many are shown.

    Example: refloop referrals list --q "smith 1970-01-01" --status open
    """
    with errors():
        db = open_referral_store(state_dir, routes_path, readonly=True)
        try:
            page = find_referrals(
                db,
                q=q,
                status=status,
                specialty=specialty,
                open_days_over=open_days_over,
                prior_auth=prior_auth,
                sort=sort,
                after=after,
                limit=limit,
                now=WallClock().now(),
            )
        finally:
            db.close()
    items = page["items"]
    if as_json:
        click.echo(json.dumps(items, indent=1))
        return
    click.echo(
        f"{'ID':>7}  {'PLACER':<16} {'PATIENT':<22} {'BORN':<10} {'MRN':<12} {'STATUS':<21} "
        f"{'SPECIALTY':<16} {'OPENED (UTC)':<11} CLOSED"
    )
    for i in items:
        click.echo(
            f"{i['id']:>7}  {i['placer_number'][:16]:<16} {i['patient_name'][:22]:<22} "
            f"{i['patient_birth_date'] or '-':<10} {i['patient_mrn'][:12] or '-':<12} "
            f"{i['status']:<21} {i['specialty'][:16]:<16} {i['opened_at'][:10]:<11} "
            f"{i['close_reason'] or '-'}"
        )
    if not page["total"]:
        click.echo("no referrals match")
        return
    more = f"; next page: --after {page['next_after']}" if page["next_after"] else ""
    click.echo(f"showing {page['first']}-{page['last']} of {page['total']}{more}")


@referrals.command("show")
@click.argument("referral_id", type=int)
@state_option
@routes_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def referrals_show(referral_id: int, state_dir: str, routes_path: str, as_json: bool) -> None:
    """Show one referral: keys, statuses, prior auth, timers, outbox and its timeline.

    Example: refloop referrals show 42 --json
    """
    with errors():
        db = open_referral_store(state_dir, routes_path, readonly=True)
        try:
            item = show_referral(db, referral_id)
        finally:
            db.close()
    if item is None:
        raise click.ClickException(f"no referral with id {referral_id}")
    if as_json:
        click.echo(json.dumps(item, indent=1))
        return
    for key in (
        "id",
        "sending_facility",
        "placer_number",
        "filler_numbers",
        "patient_name",
        "patient_birth_date",
        "patient_mrn",
        "status",
        "patient_status",
        "specialist_status",
        "close_reason",
        "specialty",
        "priority",
        "opened_at",
        "closed_at",
    ):
        value = item[key]
        if isinstance(value, list):
            value = ", ".join(value)
        click.echo(f"{key.replace('_', ' '):>18}: {value if value not in (None, '') else '-'}")
    auth = item["prior_auth"]
    if auth is not None:
        held = " (packet held)" if auth["packet_held"] else ""
        click.echo(f"{'prior auth':>18}: {auth['status']}{held}")
    for t in item["timers"]:
        click.echo(f"{'timer':>18}: {t['kind']} #{t['attempt']} due {t['due']}")
    for o in item["outbox"]:
        click.echo(f"{'outbox':>18}: {o['template']} via {o['channel']} ({o['status']})")
    click.echo("")
    click.echo("timeline:")
    for e in item["timeline"]:
        source = f"message {e['message_id']}" if e["message_id"] else e["actor"]
        effects = f"  [{', '.join(e['effects'])}]" if e["effects"] else ""
        mark = "" if e["changed"] else "  (no change)"
        click.echo(
            f"  {e['recorded_at'][:19]}  {e['kind']:<24} {source:<16} -> {e['status']}"
            f"{mark}{effects}"
        )


@referrals.command("close")
@click.argument("referral_id", type=int)
@click.option("--reason", required=True, type=click.Choice(states.CLOSE_PRECEDENCE))
@click.option("--note", default="", help="Kept with the referral; never in the audit log.")
@actor_option
@state_option
@routes_option
def referrals_close(
    referral_id: int,
    reason: states.CloseReason,
    note: str,
    actor: str | None,
    state_dir: str,
    routes_path: str,
) -> None:
    """Close a referral by hand; its timers and queued outbound work stop.

    Example: refloop referrals close 42 --reason other --note "patient moved away"
    """
    from engine.tracking.tracker import Tracker  # prometheus: only for a command that writes

    with errors():
        db = open_referral_store(state_dir, routes_path, readonly=False)
        try:
            result = Tracker(db, WallClock()).close(
                referral_id, reason, note, actor=f"operator:{actor or login_name()}"
            )
        finally:
            db.close()
    click.echo(f"referral {referral_id}: {result.status} ({result.outcome})")


@referrals.command("link")
@click.argument("parked_id", type=int)
@click.argument("referral_id", type=int)
@actor_option
@state_option
@routes_option
def referrals_link(
    parked_id: int, referral_id: int, actor: str | None, state_dir: str, routes_path: str
) -> None:
    """Apply a parked event to a referral (see refloop parked list).

    Example: refloop referrals link 7 42
    """
    from engine.tracking.tracker import Tracker  # prometheus: only for a command that writes

    with errors():
        db = open_referral_store(state_dir, routes_path, readonly=False)
        try:
            result = Tracker(db, WallClock()).link(
                parked_id, referral_id, actor=f"operator:{actor or login_name()}"
            )
        finally:
            db.close()
    click.echo(f"parked {parked_id} -> referral {referral_id}: {result.status}")


@referrals.command("auth")
@click.argument("referral_id", type=int)
@click.option("--outcome", required=True, type=click.Choice(["pending", "approved", "denied"]))
@click.option("--number", "auth_number", default="", help="The payer's authorization number.")
@actor_option
@state_option
@routes_option
def referrals_auth(
    referral_id: int,
    outcome: str,
    auth_number: str,
    actor: str | None,
    state_dir: str,
    routes_path: str,
) -> None:
    """Record a prior-authorization outcome; an approval releases a held packet.

    Example: refloop referrals auth 42 --outcome approved --number PA-123
    """
    from engine.tracking.tracker import Tracker  # prometheus: only for a command that writes

    with errors():
        db = open_referral_store(state_dir, routes_path, readonly=False)
        try:
            result = Tracker(db, WallClock()).decide_auth(
                referral_id,
                outcome,
                actor=f"operator:{actor or login_name()}",
                auth_number=auth_number,
            )
        finally:
            db.close()
    done = f" [{', '.join(result.effects)}]" if result.effects else ""
    click.echo(f"referral {referral_id}: prior auth {outcome} ({result.outcome}){done}")


# -- parked -------------------------------------------------------------------------


@click.group("parked")
def parked() -> None:
    """Events that matched no referral.

    Example: refloop parked list
    """


@parked.command("list")
@state_option
@routes_option
@click.option("--all", "include_linked", is_flag=True, help="Include linked events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def parked_list(state_dir: str, routes_path: str, include_linked: bool, as_json: bool) -> None:
    """List parked events (ids and keys only), oldest first.

    Example: refloop parked list --json
    """
    with errors():
        db = open_referral_store(state_dir, routes_path, readonly=True)
        try:
            items = list_parked(db, include_linked=include_linked)
        finally:
            db.close()
    if as_json:
        click.echo(json.dumps(items, indent=1))
        return
    click.echo(
        f"{'ID':>6}  {'MESSAGE':>7}  {'KIND':<24} {'WHY':<16} {'PLACER':<16} {'FILLER':<16} STATUS"
    )
    for p in items:
        status = p["status"] if p["referral_id"] is None else f"linked to {p['referral_id']}"
        click.echo(
            f"{p['id']:>6}  {p['message_id'] or '-':>7}  {p['kind']:<24} {p['why']:<16} "
            f"{p['placer_number'][:16] or '-':<16} "
            f"{','.join(p['filler_numbers'])[:16] or '-':<16} {status}"
        )


# -- audit --------------------------------------------------------------------------


@click.group("audit")
def audit() -> None:
    """Check and export the hash-chained audit log.

    Example: refloop audit verify
    """


@audit.command("verify")
@state_option
@routes_option
def audit_verify(state_dir: str, routes_path: str) -> None:
    """Walk the audit log's hash chain; exit 1 naming the first bad row.

    Example: refloop audit verify --routes /etc/refloop/routes.yaml --state /var/lib/refloop
    """
    with errors():
        db = open_referral_store(state_dir, routes_path, readonly=True)
        try:
            result = audit_store.verify(db.conn)
        finally:
            db.close()
    if not result.ok:
        raise click.ClickException(f"audit row {result.bad_row}: {result.problem}")
    click.echo(f"audit log ok: {result.rows} rows")


@audit.command("export")
@state_option
@routes_option
@click.option("--since", help="Rows at or after (ISO date or time, UTC).")
@click.option("--jsonl", is_flag=True, help="One JSON object per line (default: a JSON array).")
def audit_export(state_dir: str, routes_path: str, since: str | None, jsonl: bool) -> None:
    """Write audit rows (with their hashes) as JSON.

    Example: refloop audit export --since 2026-01-01 --jsonl > audit.jsonl
    """
    since_iso = None
    if since is not None:
        try:
            since_iso = isoformat(parse_iso(since))
        except ValueError:
            raise click.BadParameter(f"not an ISO date or time: {since!r}") from None
    with errors():
        db = open_referral_store(state_dir, routes_path, readonly=True)
        try:
            rows = (r.as_dict() for r in audit_store.rows(db.conn, since=since_iso))
            if jsonl:
                for r in rows:  # streamed: the log can be large
                    click.echo(json.dumps(r, sort_keys=True, ensure_ascii=False))
            else:
                click.echo(json.dumps(list(rows), indent=1, ensure_ascii=False))
        finally:
            db.close()
