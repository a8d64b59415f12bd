"""``refloop referrals list`` and ``GET /api/referrals`` are one filter (the store's
referral filter, engine.store.referral_filter): the same specialty or status gives the
same referrals through the executable and the live daemon's API."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

from helpers import Daemon, refloop, wait_rows
from ui_rig import ref_i12

# placer -> OBR-4 code sent; the shipped tables map REFCARD to one specialty
SENT = {"F-1": "REFCARD", "F-2": "REFDERM", "F-3": "REFCARD", "F-4": "REFGI"}
# placer -> PID-3 .. PID-8 (MRN, name, birth date)
PATIENTS = {
    "F-1": "MA1^^^CLINIC^MR||Müller^Åsa||19700102|F",
    "F-2": "MA2^^^CLINIC^MR||Muller^Bo||19810506|M",
    "F-3": "MA3^^^CLINIC^MR||Smith^Jane||19700102|F",
    "F-4": "MA4^^^CLINIC^MR||Okafor^Ify||19991231|F",
}


def cli_referrals(daemon: Daemon, *args: str) -> list[dict[str, object]]:
    out = refloop("referrals", "list", "--json", "--limit", "0", *args,
                  "--state", str(daemon.state_dir))  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    rows: list[dict[str, object]] = json.loads(out.stdout)
    return rows


def api_ids(daemon: Daemon, token: str, **params: str) -> set[int]:
    query = urllib.parse.urlencode({**params, "limit": 500})
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.http}/api/referrals?{query}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return {int(r["id"]) for r in json.load(response)["items"]}


def test_cli_and_api_select_the_same_referrals(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    files = []
    for n, (placer, code) in enumerate(SENT.items(), 1):
        path = tmp_path / f"r{n}.hl7"
        path.write_bytes(ref_i12(placer, f"FLT{n}", specialty=code, pid=PATIENTS[placer]))
        files.append(str(path))
    sent = refloop("send", "--port", str(daemon.mllp), *files)
    assert sent.returncode == 0, sent.stderr.decode()
    wait_rows(daemon.db, "SELECT 1 WHERE (SELECT count(*) FROM referrals) = 4")
    added = refloop(
        "users", "add", "casey", "--role", "coordinator", "--password-stdin", "--token",
        "--state", str(daemon.state_dir), stdin=b"a long enough password\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr.decode()
    token = added.stdout.decode().rsplit(": ", 1)[-1].strip()

    every = {str(r["placer_number"]): r for r in cli_referrals(daemon)}
    assert set(every) == set(SENT)
    cardiology = str(every["F-1"]["specialty"])
    assert cardiology and every["F-3"]["specialty"] == cardiology
    expected = {int(str(every[p]["id"])) for p in ("F-1", "F-3")}  # the two REFCARD ones

    # the code as sent (OBR-4.1), or the specialty the shipped specialty_category table
    # derives from it (REFCARD: Cardiology), in any case (failed before: "cardiology"
    # found nothing, the filter compared the code only)
    for spelled in (cardiology, cardiology.lower(), "Cardiology", "cardiology", "CARDIOLOGY"):
        by_cli = {int(str(r["id"])) for r in cli_referrals(daemon, "--specialty", spelled)}
        assert by_cli == expected, spelled
        assert api_ids(daemon, token, specialty=spelled) == expected, spelled
    assert cli_referrals(daemon, "--specialty", "cardio") == []  # whole, not a prefix
    assert api_ids(daemon, token, specialty="Dermatology") == {int(str(every["F-2"]["id"]))}
    opened = {int(str(r["id"])) for r in cli_referrals(daemon, "--status", "open")}
    assert (
        opened
        == api_ids(daemon, token, status="open")
        == {int(str(r["id"])) for r in every.values()}
    )

    # the search box: the same words find the same referrals through both
    ids = {p: int(str(r["id"])) for p, r in every.items()}
    for q, placers in (
        ("F-3", {"F-3"}),  # placer number
        ("MA4", {"F-4"}),  # MRN
        ("mul", {"F-1", "F-2"}),  # family name prefix, accents ignored
        ("MÜLLER åsa", {"F-1"}),
        ("1970-01-02", {"F-1", "F-3"}),  # birth date
        ("01/02/1970 smith", {"F-3"}),
    ):
        want = {ids[p] for p in placers}
        assert {int(str(r["id"])) for r in cli_referrals(daemon, "--q", q)} == want, q
        assert api_ids(daemon, token, q=q) == want, q
    (shown,) = cli_referrals(daemon, "--q", "MA1")
    assert (shown["patient_name"], shown["patient_birth_date"], shown["patient_mrn"]) == (
        "Müller, Åsa",
        "1970-01-02",
        "MA1",
    )
    shown_text = refloop(
        "referrals", "show", str(ids["F-1"]), "--state", str(daemon.state_dir)
    )  # fmt: skip
    assert shown_text.returncode == 0, shown_text.stderr.decode()
    text = shown_text.stdout.decode()
    assert "patient name: Müller, Åsa" in text and "patient mrn: MA1" in text
