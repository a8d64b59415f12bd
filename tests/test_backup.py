"""``refloop backup`` under load and ``refloop restore``: the drill of docs/operations.md.

The live daemon (``refloop run``) takes REF^I12 referrals on several connections while
``refloop backup`` copies its database; the copy holds every message ACKed before the
backup began, byte for byte, and its audit chain verifies. ``refloop restore`` refuses
while the daemon runs, restores once it is stopped, and the daemon starts on the result.
The checks themselves are tested by planting the faults they look for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, Daemon, Reply, hl7, mounted_tmpfs, peer, query, refloop, run

CONNECTIONS = 4


pytestmark = pytest.mark.sqlite_file("backup, restore and their lock copy and hold the SQLite file")


def referral(i: int) -> bytes:
    return hl7(
        f"BK-{i:05d}",
        msg_type="REF^I12^REF_I12",
        body=(
            f"PID|1||P{i}^^^MRN||DOE^JANE||19800101|F",
            f"RF1|P^Pending|R^Routine|||NEW|R{i}^EPIC",
            "PRD|RT|CARDIO^ANNA||||||1234567893",
        ),
    )


async def load(port: int, stop: asyncio.Event, acked: list[str]) -> None:
    """CONNECTIONS senders, each one message at a time, until ``stop``; ``acked`` gets
    each control id answered AA, in the order the answers came."""
    counter = iter(range(1_000_000))

    async def sender() -> None:
        async with peer(port) as p:
            while not stop.is_set():
                i = next(counter)
                await p.send(referral(i))
                raw = await p.recv(timeout=20.0)
                assert raw is not None
                reply = Reply.parse(raw)
                assert reply.code == "AA", reply.raw
                acked.append(reply.control_id)

    await asyncio.gather(*(sender() for _ in range(CONNECTIONS)))


async def backup_under_load(daemon: Daemon, dest: Path) -> tuple[list[str], list[str], str]:
    """(ACKed before the backup began, ACKed by the end, the backup's output)."""
    acked: list[str] = []
    stop = asyncio.Event()
    senders = asyncio.create_task(load(daemon.mllp, stop, acked))
    while len(acked) < 300:
        await asyncio.sleep(0.01)
    before = list(acked)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "backup", str(dest),
        "--state", str(daemon.state_dir), "--routes", str(daemon.routes),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    during = len(acked) - len(before)
    while len(acked) < len(before) + during + 100:  # the load goes on after the copy
        await asyncio.sleep(0.01)
    stop.set()
    await senders
    assert proc.returncode == 0, out.decode()
    return before, list(acked), out.decode()


def test_backup_under_load_then_restore(daemon: Daemon, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    daemon.start()
    before, acked, out = run(backup_under_load(daemon, backups), timeout=120)
    assert out.startswith("backup ok"), out
    (copy,) = backups.glob("refloop-*.db")
    assert copy.stat().st_mode & 0o777 == 0o600

    # the copy: every message ACKed before the backup began, exact bytes, chain ok
    stored = dict(
        query(copy, "SELECT control_id, raw FROM messages JOIN message_raw ON id = message_id")
    )
    missing = [cid for cid in before if cid not in stored]
    assert not missing, f"{len(missing)} ACKed messages not in the backup, e.g. {missing[:3]}"
    for cid, raw in stored.items():
        assert raw == referral(int(cid.split("-")[1])), cid
    (audit_rows,) = query(copy, "SELECT count(*) FROM audit")[0]
    assert audit_rows > 0  # the referrals were tracked: the chain has something to verify

    # restore refuses while the daemon runs on the state directory, and changes nothing
    refused = refloop("restore", str(copy), "--state", str(daemon.state_dir))
    assert refused.returncode == 1
    assert "refloop is running" in refused.stderr.decode()
    assert len(refused.stderr.decode().strip().splitlines()) == 1
    assert not list(daemon.state_dir.glob("*.pre-restore-*"))

    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()
    live = {r[0] for r in query(daemon.db, "SELECT control_id FROM messages")}
    assert set(acked) <= live

    restored = refloop("restore", str(copy), "--state", str(daemon.state_dir))
    assert restored.returncode == 0, restored.stderr.decode()
    assert "restore ok" in restored.stdout.decode()
    (kept,) = daemon.state_dir.glob("refloop.db.pre-restore-*")
    assert {r[0] for r in query(kept, "SELECT control_id FROM messages")} == live
    after = {r[0] for r in query(daemon.db, "SELECT control_id FROM messages")}
    assert after == set(stored)
    assert set(before) <= after
    verified = refloop("audit", "verify", "--state", str(daemon.state_dir))
    assert verified.returncode == 0, verified.stderr.decode()
    assert f"{audit_rows} rows" in verified.stdout.decode()

    # the daemon runs on the restored database; what the sender sends again is taken
    daemon.start()
    lost = sorted(set(acked) - after)
    resent = run(resend(daemon.mllp, lost[:50]))
    assert resent == ["AA"] * len(lost[:50])
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()
    assert query(daemon.db, "PRAGMA integrity_check") == [("ok",)]


async def resend(port: int, cids: list[str]) -> list[str]:
    codes = []
    async with peer(port) as p:
        for cid in cids:
            codes.append((await p.ask(referral(int(cid.split("-")[1])))).code)
    return codes


# -- the checks, on planted faults --------------------------------------------------------


@pytest.fixture(scope="module")
def good_backup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A backup of a daemon's database that tracked a few referrals."""
    tmp = tmp_path_factory.mktemp("good")
    daemon = Daemon(state_dir=tmp / "state", log_path=tmp / "daemon.log")
    try:
        daemon.start()
        run(resend(daemon.mllp, [f"BK-{i:05d}" for i in range(20)]))
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    finally:
        daemon.kill()
    done = refloop("backup", str(tmp / "good.db"), "--state", str(daemon.state_dir))
    assert done.returncode == 0, done.stderr.decode()
    return tmp / "good.db"


def planted(good: Path, tmp_path: Path, fault: str) -> Path:
    bad = tmp_path / f"{fault}.db"
    bad.write_bytes(good.read_bytes())
    if fault == "torn":  # a page of the inbox overwritten
        data = bytearray(bad.read_bytes())
        page = 4096
        (root,) = query(bad, "SELECT rootpage FROM sqlite_master WHERE name = 'message_raw'")[0]
        start = (root - 1) * page
        data[start : start + page] = b"\x5a" * page
        bad.write_bytes(bytes(data))
    elif fault == "audit":  # an audit row edited behind the triggers' back
        with contextlib.closing(sqlite3.connect(bad)) as conn, conn:
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit'"
            ).fetchall():
                conn.execute(f'DROP TRIGGER "{name}"')
            conn.execute("UPDATE audit SET actor = 'someone-else' WHERE id = 2")
    elif fault == "not-sqlite":
        bad.write_bytes(b"this is not a database\n" * 200)
    return bad


@pytest.mark.parametrize("fault", ["torn", "audit", "not-sqlite"])
def test_restore_refuses_a_source_that_fails_its_checks(
    good_backup: Path, tmp_path: Path, fault: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "refloop.db").write_bytes(good_backup.read_bytes())
    before = (state / "refloop.db").read_bytes()
    bad = planted(good_backup, tmp_path, fault)
    result = refloop("restore", str(bad), "--state", str(state))
    assert result.returncode == 1, result.stdout.decode()
    err = result.stderr.decode()
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    expected = {"torn": "integrity", "audit": "audit row 2", "not-sqlite": "cannot read"}[fault]
    assert expected in err
    assert (state / "refloop.db").read_bytes() == before
    assert not list(state.glob("*.pre-restore-*"))


def test_the_good_backup_restores(good_backup: Path, tmp_path: Path) -> None:
    """The control of the planted-fault test: the same steps on the unmodified copy."""
    state = tmp_path / "state"
    result = refloop("restore", str(good_backup), "--state", str(state))
    assert result.returncode == 0, result.stderr.decode()
    assert query(state / "refloop.db", "SELECT count(*) FROM messages") == [(20,)]


def test_backup_never_overwrites(good_backup: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "refloop.db").write_bytes(good_backup.read_bytes())
    dest = tmp_path / "exists.db"
    dest.write_bytes(b"keep me")
    result = refloop("backup", str(dest), "--state", str(state))
    assert result.returncode == 1
    assert "never overwrites" in result.stderr.decode()
    assert dest.read_bytes() == b"keep me"


def test_a_daemon_does_not_start_while_a_restore_holds_the_lock(tmp_path: Path) -> None:
    from engine.store.backup import exclusive

    state = tmp_path / "state"
    daemon = Daemon(state_dir=state, log_path=tmp_path / "daemon.log")
    with (
        exclusive(state / "refloop.db"),
        pytest.raises(AssertionError, match="did not become ready"),
    ):
        daemon.start(timeout=5.0)
    assert "a restore is replacing" in daemon.log_tail()


@pytest.mark.parametrize(
    ("options", "reason"),
    [("size=16k,mode=0700", "full"), ("ro,size=16k", "read-only")],
    ids=["full", "read-only"],
)
def test_backup_to_a_volume_that_takes_no_copy_is_one_line(
    good_backup: Path, tmp_path: Path, options: str, reason: str
) -> None:
    # the nightly unit's destination full or mounted read-only: one line, exit 1, and
    # no half-written file (nor its journal) left behind to fill the volume further
    state = tmp_path / "state"
    state.mkdir()
    (state / "refloop.db").write_bytes(good_backup.read_bytes())
    with mounted_tmpfs(tmp_path / "dest", options) as dest:
        result = refloop("backup", f"{dest}/", "--state", str(state))
        err = result.stderr.decode()
        left = sorted(p.name for p in dest.iterdir())
    assert result.returncode == 1, result.stdout.decode()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("Error: cannot write the copy "), err
    assert reason in err, err
    assert left == []


def test_backup_to_an_empty_destination_is_refused(good_backup: Path, tmp_path: Path) -> None:
    # DEST "" (an unset variable in quotes) must not drop a PHI copy in the current folder
    state = tmp_path / "state"
    state.mkdir()
    (state / "refloop.db").write_bytes(good_backup.read_bytes())
    here = tmp_path / "cwd"
    here.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "backup",
            "",
            "--state",
            str(state),
            "--routes",
            str(REPO / "routes.yaml"),
        ],
        cwd=here,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr.decode()
    assert list(here.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "reason"),
    [("size=16k,mode=0700", "full"), ("ro,size=16k", "read-only")],
    ids=["full", "read-only"],
)
def test_restore_into_a_volume_that_takes_nothing_is_one_line(
    good_backup: Path, tmp_path: Path, options: str, reason: str
) -> None:
    # an empty state volume too small or mounted read-only: one line, exit 1, and no
    # empty refloop.db left for a daemon to start on (or a later restore to "keep")
    with mounted_tmpfs(tmp_path / "state", options) as state:
        result = refloop("restore", str(good_backup), "--state", str(state))
        err = result.stderr.decode()
        left = sorted(p.name for p in state.iterdir())
    assert result.returncode == 1, result.stdout.decode()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert reason in err, err
    assert "refloop.db" not in left, left
