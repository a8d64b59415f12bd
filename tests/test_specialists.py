"""The specialist directory: field rules, the all-or-nothing CSV import with errors by
line, what referrals teach it, the packet routing rule, and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from direct_pki import SPECIALIST, Pki, make_direct_pki

from engine.cli.main import main
from engine.clock import VirtualClock
from engine.errors import ConfigError
from engine.store import specialists as store
from engine.store.db import Database, open_database
from engine.tracking.specialists import (
    PacketRoute,
    import_csv,
    learn_from_referral,
    normalise_fax,
    npi_valid,
    packet_route,
    set_specialist,
    show_specialist,
)

T0 = 1_767_225_600.0
NPI_A, NPI_B, NPI_C = "1234567893", "9876543205", "1234567802"
HEADER = "npi,local_id,name,organisation,specialty,direct_address,fax,preferred_channel,certificate"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_direct_pki(tmp_path_factory.mktemp("dir-pki"))


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    database = open_database(store_url)
    yield database
    database.close()


def write(tmp: Path, *rows: str, header: str = HEADER) -> Path:
    path = tmp / "specialists.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("npi", "ok"),
    [
        (NPI_A, True),  # the CMS example
        (NPI_B, True),
        ("1234567890", False),  # wrong check digit
        ("123456789", False),
        ("12345678a3", False),
        ("", False),
    ],
)
def test_npi_check_digit(npi: str, ok: bool) -> None:
    assert npi_valid(npi) is ok


@pytest.mark.parametrize(
    ("text", "e164"),
    [
        ("+1 (555) 555-0100", "+15555550100"),
        ("555.555.0100", "+15555550100"),
        ("15555550100", "+15555550100"),
        ("+44 20 7946 0958", "+442079460958"),
        ("555-0100", ""),
        ("fax me", ""),
        ("+0123", ""),
    ],
)
def test_fax_numbers(text: str, e164: str) -> None:
    assert normalise_fax(text) == e164


def test_import_then_update(db: Database, tmp_path: Path, pki: Pki) -> None:
    clock = VirtualClock(T0)
    cert = pki.specialist.cert_path
    path = write(
        tmp_path,
        f"{NPI_A},,Dr Smith,Heart Group,cardiology,{SPECIALIST.upper()},,auto,{cert}",
        f"{NPI_B},L-7,Dr Fax,Skin Clinic,dermatology,,(555) 555-0100,fax,",
        f',L-9,Dr Inline,,,{SPECIALIST},,,"{pki.specialist.cert_path.read_text()}"',
    )
    summary = import_csv(db, path, clock)
    assert (summary.rows, summary.added, summary.updated) == (3, 3, 0)
    a = store.find(db.conn, npi=NPI_A)
    assert a is not None and a.direct_address == SPECIALIST and a.certificate.startswith("-----")
    b = store.find(db.conn, local_id="L-7")
    assert b is not None and b.fax == "+15555550100" and b.preferred_channel == "fax"
    shown = show_specialist(db, NPI_A)
    assert shown is not None and shown["certificate"]["not_after"].endswith("Z")
    # a second import updates by NPI, counts what changed
    path = write(tmp_path, f"{NPI_A},,Dr Smith,Heart Group West,cardiology,{SPECIALIST},,,{cert}")
    again = import_csv(db, path, clock)
    assert (again.added, again.updated) == (0, 1)
    assert len(store.listing(db.conn)) == 3


def test_bad_rows_are_reported_by_line_and_nothing_is_written(
    db: Database, tmp_path: Path, pki: Pki
) -> None:
    path = write(
        tmp_path,
        f"{NPI_A},,Dr Good,,,,+15555550100,,",  # line 2: fine
        "1234567890,,Dr Check,,,,,,",  # 3: bad NPI
        f"{NPI_B},,Dr Addr,,,not-an-address,,,",  # 4
        f"{NPI_C},,Dr Fax,,,,555-01,,",  # 5
        f",L-1,Dr Cert,,,other@direct.elsewhere.test,,,{pki.specialist.cert_path}",  # 6
        ",L-2,,,,,,,",  # 7: no name
        f"{NPI_A},,Dr Twice,,,,,,",  # 8: duplicate NPI
        ",L-3,Dr Pref,,,,,direct,",  # 9
        ",L-4,Dr File,,,x@direct.test,,,missing.pem",  # 10
    )
    with pytest.raises(ConfigError) as err:
        import_csv(db, path, VirtualClock(T0))
    lines = err.value.problems
    where = [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in lines]
    assert where == ["3", "4", "5", "6", "7", "8", "9", "10"], lines
    assert "not a valid NPI" in lines[0]
    assert "not issued for this direct_address" in lines[3]
    assert "same as line 2" in lines[5]
    assert "cannot read certificate file" in lines[7]
    assert store.listing(db.conn) == []  # never half an import


def test_unknown_column_and_empty_file(db: Database, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"specialists.csv:1: unknown column\(s\) email"):
        import_csv(db, write(tmp_path, header="npi,name,email"), VirtualClock(T0))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match=r"empty\.csv:1"):
        import_csv(db, tmp_path / "empty.csv", VirtualClock(T0))


def details(**kw: Any) -> dict[str, Any]:
    base = {
        "specialist_npi": NPI_A,
        "specialist_name": "Dr Smith",
        "specialist_direct_address": SPECIALIST,
        "specialist_fax": "",
        "specialty": "cardiology",
    }
    return {**base, **kw}


def test_referrals_fill_the_directory_but_never_overwrite_an_import(
    db: Database, tmp_path: Path
) -> None:
    with db.transaction() as conn:
        learn_from_referral(conn, details(specialist_fax="555 555 0199"), T0)
    row = store.find(db.conn, npi=NPI_A)
    assert row is not None and row.source == "referral" and row.fax == "+15555550199"
    import_csv(db, write(tmp_path, f"{NPI_A},,Dr Smith,,,,+15555550100,,"), VirtualClock(T0))
    with db.transaction() as conn:
        learn_from_referral(conn, details(specialist_fax="+15555550199", specialist_name="X"), T0)
    row = store.find(db.conn, npi=NPI_A)
    assert row is not None and (row.fax, row.name) == ("+15555550100", "Dr Smith")


@pytest.mark.parametrize(
    ("csv_row", "referral", "expected"),
    [
        ("{npi},,Dr S,,,{addr},+15555550100,,{cert}", {}, ("direct", SPECIALIST)),
        ("{npi},,Dr S,,,{addr},+15555550100,fax,{cert}", {}, ("fax", "+15555550100")),
        ("{npi},,Dr S,,,{addr},+15555550100,,", {}, ("fax", "+15555550100")),
        ("{npi},,Dr S,,,{addr},,,", {}, ("task", "")),
        (None, {"specialist_fax": "(555) 555-0111"}, ("fax", "+15555550111")),
        (None, {"specialist_npi": "", "specialist_direct_address": ""}, ("task", "")),
    ],
    ids=["direct", "prefers-fax", "no-cert-fax", "no-cert-no-fax", "referral-fax", "nothing"],
)
def test_packet_routing_rule(
    db: Database,
    tmp_path: Path,
    pki: Pki,
    csv_row: str | None,
    referral: dict[str, Any],
    expected: tuple[str, str],
) -> None:
    if csv_row is not None:
        row = csv_row.format(npi=NPI_A, addr=SPECIALIST, cert=pki.specialist.cert_path)
        import_csv(db, write(tmp_path, row), VirtualClock(T0))
    route = packet_route(db.conn, details(**referral))
    assert (route.channel, route.address) == expected
    if expected[0] == "direct":  # the fallback never picks Direct again
        assert packet_route(db.conn, details(**referral), without_direct=True).channel == "fax"


def test_a_fax_found_by_hand_routes_the_next_packet(db: Database) -> None:
    """The referral names the office (NPI) but no address: the packet needs a person. The
    coordinator who faxed it by hand records the number once (``specialists set``); the
    next referral to that office goes by fax, and a referral's own number never
    overwrites the operator's entry."""
    named = details(specialist_direct_address="")
    with db.transaction() as conn:
        learn_from_referral(conn, named, T0)
    assert packet_route(db.conn, named) == PacketRoute("task", "", "no-address")
    clock = VirtualClock(T0 + 60)
    entry = set_specialist(db, NPI_A, {"fax": "(555) 020-0107"}, clock, actor="user:casey")
    assert (entry["npi"], entry["fax"], entry["source"]) == (NPI_A, "+15550200107", "operator")
    assert entry["name"] == "Dr Smith"  # what the referral taught stays
    assert packet_route(db.conn, named) == PacketRoute("fax", "+15550200107", "fax")
    with db.transaction() as conn:
        learn_from_referral(conn, details(specialist_fax="+15555550199"), T0 + 120)
    assert packet_route(db.conn, named).address == "+15550200107"
    audit = db.conn.execute("SELECT actor FROM audit WHERE action = 'specialist-set'").fetchall()
    assert [tuple(r) for r in audit] == [("user:casey",)]


def test_set_checks_what_it_writes(db: Database) -> None:
    clock = VirtualClock(T0)
    with pytest.raises(ConfigError, match="fax: not a fax number"):
        set_specialist(db, NPI_B, {"name": "Dr Fax", "fax": "12"}, clock)
    with pytest.raises(ConfigError, match="name: is required"):
        set_specialist(db, NPI_B, {"fax": "+15555550100"}, clock)  # not on file: a name
    with pytest.raises(ConfigError, match="cannot set certificate"):
        set_specialist(db, NPI_B, {"certificate": "x"}, clock)
    assert store.find(db.conn, npi=NPI_B) is None  # nothing was written
    added = set_specialist(db, "ortho-7", {"name": "Bone Clinic", "fax": "5555550100"}, clock)
    assert (added["npi"], added["local_id"], added["fax"]) == ("", "ortho-7", "+15555550100")


@pytest.mark.store
def test_cli_set(tmp_path: Path) -> None:
    state = tmp_path / "state"
    routes = tmp_path / "routes.yaml"
    routes.write_text("version: 1\n")
    common = ["--state", str(state), "--routes", str(routes)]
    runner = CliRunner()
    done = runner.invoke(
        main, ["specialists", "set", *common, NPI_B, "--name", "Dr Fax", "--fax", "555-555-0100"]
    )
    assert done.exit_code == 0, done.output
    assert done.output == f"{NPI_B}: Dr Fax (fax +15555550100)\n"
    bad = runner.invoke(main, ["specialists", "set", *common, NPI_B, "--fax", "12"])
    assert bad.exit_code == 2
    assert "fax: not a fax number" in bad.output


@pytest.mark.store
def test_cli_import_list_show(tmp_path: Path, pki: Pki) -> None:
    state = tmp_path / "state"
    routes = tmp_path / "routes.yaml"  # names no store file: the default, refloop.db
    routes.write_text("version: 1\n")
    path = write(
        tmp_path,
        f"{NPI_A},,Dr Smith,Heart Group,cardiology,{SPECIALIST},,,{pki.specialist.cert_path}",
        f"{NPI_B},,Dr Fax,,dermatology,,+15555550100,,",
    )
    runner = CliRunner()
    common = ["--state", str(state), "--routes", str(routes)]
    done = runner.invoke(main, ["specialists", "import", *common, str(path)])
    assert done.exit_code == 0, done.output
    assert "2 row(s): 2 added" in done.output
    listed = runner.invoke(main, ["specialists", "list", *common, "--json"])
    rows = json.loads(listed.output)
    assert [(r["npi"], r["has_certificate"]) for r in rows] == [(NPI_B, False), (NPI_A, True)]
    text = runner.invoke(main, ["specialists", "list", *common])
    assert "direct" in text.output and "fax" in text.output
    shown = runner.invoke(main, ["specialists", "show", *common, SPECIALIST, "--json"])
    assert json.loads(shown.output)["npi"] == NPI_A
    missing = runner.invoke(main, ["specialists", "show", *common, "0000000000"])
    assert missing.exit_code == 1
    bad = write(tmp_path, "1234567890,,Dr Bad,,,,,,")
    refused = runner.invoke(main, ["specialists", "import", *common, str(bad)])
    assert refused.exit_code == 2
    assert "specialists.csv:2: npi: not a valid NPI" in refused.output
