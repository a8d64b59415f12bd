"""Issue 13.4, 13.5 and 13.10 end to end: the daemon (``refloop run`` with the shipped
routes) receives HL7 v2 over MLLP into a real database file, and the results are read
back with the ``refloop`` executable and /metrics.

* prior authorization: a REF^I12 (or ORM^O01) whose AUT segment names a payer but no
  authorization number opens the prior-auth item; with AUT-6 it is not required;
* placer numbers are scoped by the practice: two practices both sending order 10482 are
  two referrals, and each specialist booking lands on its own;
* an ADT for a patient with no open referral is counted and dropped, never parked; one
  for a patient with an open referral updates the contact details.

The ``ehr`` source answers ``ack_when: on-processed``, so each ACK arrives after the
message was routed and tracked: nothing here waits for time to pass.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import HOST, Daemon, peer, refloop, run, shipped_routes


def message(control: str, msg_type: str, facility: str, receiving: str, *body: str) -> bytes:
    """One HL7 v2.5.1 message from ``facility`` (MSH-4) to ``receiving`` (MSH-6)."""
    msh = (
        f"MSH|^~\\&|APP|{facility}|REFLOOP|{receiving}|20260105090000||{msg_type}|{control}|P|2.5.1"
    )
    return ("\r".join((msh, *body)) + "\r").encode()


def ref_i12(control: str, placer: str, *extra: str, mrn: str = "MRN1") -> bytes:
    return message(
        control,
        "REF^I12^REF_I12",
        "NORTHSIDE",
        "HUB",
        f"RF1|P^Pending^HL70283|R^Routine^HL70280|Med||O|{placer}^NORTH_EHR|20260105",
        *extra,
        f"PID|1||{mrn}^^^NORTHSIDE^MR||Doe^Jane||19700101|F",
        f"OBR|1|{placer}^NORTH_EHR||REFCARD^Cardiology referral^L",
    )


def orm_nw(control: str, facility: str, placer: str, *extra: str, mrn: str) -> bytes:
    """An ORM^O01 new order; ORC-2 carries the practice's EHR namespace (EI.2)."""
    ns = f"{facility[:5]}_EHR"
    return message(
        control,
        "ORM^O01^ORM_O01",
        facility,
        "HUB",
        f"PID|1||{mrn}^^^{facility}^MR||Roe^Sam||19650202|M|||||^PRN^CP^^^^^^^^^+15550100100",
        *extra,
        f"ORC|NW|{placer}^{ns}",
        f"OBR|1|{placer}^{ns}||REFCARD^Cardiology referral^L",
    )


def siu_s12(control: str, receiving: str, sch26: str, appointment: str, mrn: str) -> bytes:
    """The specialist's scheduling system books an appointment (SCH-26 = our placer)."""
    sch = ["SCH", appointment, appointment] + [""] * 8 + ["^^^20260120090000"]
    sch += [""] * 13 + ["Booked", sch26]
    return message(
        control,
        "SIU^S12^SIU_S12",
        "CARDIO",
        receiving,
        "|".join(sch),
        f"PID|1||{mrn}^^^X^MR||Roe^Sam",
        "RGS|1",
        "AIS|1||CONSULT^Consult|20260120090000",
    )


def adt(control: str, trigger: str, mrn: str, phone: str) -> bytes:
    return message(
        control,
        f"ADT^{trigger}^ADT_A01",
        "NORTHSIDE",
        "HUB",
        f"EVN|{trigger}|20260106090000",
        f"PID|1||{mrn}^^^NORTHSIDE^MR||Roe^Sam||19650202|M|||||^PRN^CP^^^^^^^^^{phone}",
    )


async def send_all(port: int, messages: list[bytes]) -> list[str]:
    """Send each message on one connection; the ACK codes (MSA-1), in order."""
    async with peer(port) as p:
        return [(await p.ask(m, timeout=20.0)).code for m in messages]


def cli_json(*args: str) -> Any:
    result = refloop(*args, "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


@pytest.fixture
def started(daemon: Daemon, tmp_path: Path) -> Daemon:
    daemon.routes = shipped_routes(tmp_path / "routes.yaml")
    daemon.start()
    return daemon


def referrals(d: Daemon) -> list[dict[str, Any]]:
    return list(
        cli_json(
            "referrals",
            "list",
            "--limit",
            "0",
            "--state",
            str(d.state_dir),
            "--routes",
            str(d.routes),
        )
    )


def show(d: Daemon, placer: str, facility: str) -> dict[str, Any]:
    (rid,) = [
        r["id"]
        for r in referrals(d)
        if r["placer_number"] == placer and r["sending_facility"] == facility
    ]
    shown: dict[str, Any] = cli_json(
        "referrals", "show", str(rid), "--state", str(d.state_dir), "--routes", str(d.routes)
    )
    return shown


def parked(d: Daemon) -> list[dict[str, Any]]:
    return list(cli_json("parked", "list", "--state", str(d.state_dir), "--routes", str(d.routes)))


def metric(d: Daemon, name: str) -> float:
    """One sample of /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://{HOST}:{d.http}/metrics", timeout=5.0) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# HL7 v2.5.1 §11.6.2 AUT: 1 plan, 2 payer company, 3 company name, 4/5 effective and
# expiration dates, 6 authorization identifier (EI)
AUT_NO_NUMBER = "AUT|PPO^Gold plan|ACME^Acme Health|Acme Health|20260101|20260601"
AUT_WITH_NUMBER = AUT_NO_NUMBER + "|PA-77810"


def test_aut_without_a_number_opens_prior_auth(started: Daemon) -> None:
    acks = run(
        send_all(
            started.mllp,
            [
                ref_i12("PA-1", "P-100", AUT_NO_NUMBER),
                ref_i12("PA-2", "P-200", AUT_WITH_NUMBER),
                orm_nw(
                    "PA-3",
                    "NORTHSIDE",
                    "P-300",
                    "IN1|1|PPO^Gold plan|ACME",
                    AUT_NO_NUMBER,
                    mrn="M3",
                ),
                ref_i12("PA-4", "P-400"),
            ],
        )
    )
    assert acks == ["AA"] * 4
    required = show(started, "P-100", "NORTHSIDE")
    assert required["prior_auth"]["status"] == "required"
    # the patient branch keeps running: the nudges are scheduled as for any referral
    assert required["status"] == "open"
    assert "first-nudge" in {t["kind"] for t in required["timers"]}
    assert show(started, "P-200", "NORTHSIDE")["prior_auth"] is None
    assert show(started, "P-300", "NORTHSIDE")["prior_auth"]["status"] == "required"
    assert show(started, "P-400", "NORTHSIDE")["prior_auth"] is None
    queue = cli_json(
        "referrals",
        "list",
        "--prior-auth",
        "required",
        "--state",
        str(started.state_dir),
        "--routes",
        str(started.routes),
    )
    assert sorted(r["placer_number"] for r in queue) == ["P-100", "P-300"]


def test_same_placer_number_from_two_practices_is_two_referrals(started: Daemon) -> None:
    acks = run(
        send_all(
            started.mllp,
            [
                orm_nw("N-1", "NORTHSIDE", "10482", mrn="N1"),
                orm_nw("S-1", "SOUTHSIDE", "10482", mrn="S1"),
                orm_nw("N-2", "NORTHSIDE", "20777", mrn="N2"),
                # the scheduler sends to the hub (MSH-6) and names the practice by the
                # placer number's assigning authority (SCH-26.2)
                siu_s12("B-1", "HUB", "10482^NORTH_EHR", "APT-N", "N1"),
                # ... or with no authority, addressed to the practice (MSH-6)
                siu_s12("B-2", "SOUTHSIDE", "10482", "APT-S", "S1"),
                # one practice's own number, no authority: unambiguous, still matches
                siu_s12("B-3", "HUB", "20777", "APT-N2", "N2"),
            ],
        )
    )
    assert acks == ["AA"] * 6
    assert parked(started) == []
    north, south = show(started, "10482", "NORTHSIDE"), show(started, "10482", "SOUTHSIDE")
    assert north["id"] != south["id"]
    assert [a["appointment_id"] for a in north["appointments"]] == ["APT-N"]
    assert [a["appointment_id"] for a in south["appointments"]] == ["APT-S"]
    assert north["status"] == south["status"] == "patient-booked"
    other = show(started, "20777", "NORTHSIDE")
    assert [a["appointment_id"] for a in other["appointments"]] == ["APT-N2"]


def test_booking_naming_a_practice_whose_referral_has_not_arrived_is_parked(
    started: Daemon,
) -> None:
    acks = run(
        send_all(
            started.mllp,
            [
                orm_nw("N-1", "NORTHSIDE", "10482", mrn="N1"),
                siu_s12("B-1", "HUB", "10482^SOUTH_EHR", "APT-S", "S1"),
                orm_nw("S-1", "SOUTHSIDE", "10482", mrn="S1"),
            ],
        )
    )
    assert acks == ["AA"] * 3
    # parked on arrival, then linked to South's referral when it was created
    assert show(started, "10482", "NORTHSIDE")["appointments"] == []
    south = show(started, "10482", "SOUTHSIDE")
    assert [a["appointment_id"] for a in south["appointments"]] == ["APT-S"]
    assert parked(started) == []


def test_adt_for_patients_without_a_referral_is_counted_not_parked(started: Daemon) -> None:
    unknown = [
        adt(f"ADT-{n}", "A04" if n % 2 else "A08", f"NOBODY{n}", "+15550109999") for n in range(200)
    ]
    known = [
        orm_nw("K-1", "NORTHSIDE", "30001", mrn="K1"),
        adt("ADT-K1", "A08", "K1", "+15550100199"),
    ]
    acks = run(send_all(started.mllp, unknown + known))
    assert acks == ["AA"] * 202
    assert parked(started) == []
    assert metric(started, 'refloop_unrelated_events_total{kind="contact-updated"}') == 200.0
    referral = show(started, "30001", "NORTHSIDE")
    assert referral["details"]["patient_phone"] == "+15550100199"
    assert [e["kind"] for e in referral["timeline"]] == ["referral-created", "contact-updated"]
