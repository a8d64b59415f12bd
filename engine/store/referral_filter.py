"""The one referral filter: ``refloop referrals list`` (engine.store.referrals) and the
worklist behind ``GET /api/referrals`` and the dashboard (engine.store.worklist) select
referrals with the same SQL, so the same filter gives the same referrals everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.store.referral_search import overdue_sql, q_clause


@dataclass(frozen=True, slots=True)
class ReferralFilter:
    """Which referrals; every condition given must hold. Times are epoch seconds (UTC).

    ``specialist`` and ``referring`` match the provider's name or organisation
    (case-insensitive substring) or its NPI exactly. ``q`` is the search box
    (engine.store.referral_search.q_clause). ``overdue`` needs ``now`` and the target
    days by priority (``targets``)."""

    status: str | None = None
    open_only: bool = False  # every status but closed
    specialty: str | None = None  # the code or its category; case-insensitive, whole
    specialist: str | None = None
    referring: str | None = None
    opened_before: float | None = None
    prior_auth: str | None = None  # the prior-auth item's status
    q: str = ""
    overdue: bool | None = None
    now: float = 0.0
    targets: tuple[tuple[str, float], ...] = ()


def where(flt: ReferralFilter) -> tuple[str, list[Any]]:
    """`` WHERE …`` (or "") and its arguments for ``flt`` over the ``referrals`` table."""
    clauses: list[str] = []
    args: list[Any] = []
    if flt.status:
        clauses.append("status = ?")
        args.append(flt.status)
    if flt.open_only:
        clauses.append("status != 'closed'")  # the partial indexes' own condition
    if flt.specialty:
        # the code as sent (OBR-4.1) or the specialty routes.yaml derived from it
        # (``specialty_category``: REFCARD -> Cardiology); referrals_specialty_nocase and
        # referrals_category_nocase serve the two sides
        clauses.append("(specialty = ? COLLATE NOCASE OR specialty_category = ? COLLATE NOCASE)")
        args.extend((flt.specialty, flt.specialty))
    for party, value in (("specialist", flt.specialist), ("referring", flt.referring)):
        if value:
            clauses.append(
                f"(instr(lower({party}_name), lower(?)) > 0 OR {party}_npi = ? "
                f"OR instr(lower({party}_organisation), lower(?)) > 0)"
            )
            args.extend((value, value, value))
    if flt.opened_before is not None:
        clauses.append("+opened_at < ?")  # a filter, not the index to walk (sorts walk one)
        args.append(flt.opened_before)
    if flt.prior_auth:
        clauses.append("id IN (SELECT referral_id FROM prior_auth WHERE status = ?)")
        args.append(flt.prior_auth)
    if flt.q:
        clause, q_args = q_clause(flt.q)
        if clause:
            clauses.append(clause)
            args.extend(q_args)
    if flt.overdue is not None:
        late = overdue_sql(flt.now, dict(flt.targets))
        clauses.append(late if flt.overdue else f"NOT {late}")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args
