"""``refloop messages list --type`` and ``GET /api/messages?type=`` are one filter (the
store's message filter): the same pattern gives the same rows, through the executable and
the live daemon's API. ``*`` stands for any text, anywhere; every other character,
GLOB's ``?`` and ``[`` included, stands for itself."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import Daemon, hl7, refloop

# the types sent, in order: message ids 1..8
TYPES = [
    "SIU^S12",
    "SIU^S13",
    "ORM^O01",
    "ADT^A01",
    "SIU^S14",
    "ADT^A04",
    "SIU^S12",
    "MDM^T02",
]


def ids_of(*types: str) -> list[int]:
    """Expected ids, newest first, by hand from TYPES."""
    return [n for n in range(len(TYPES), 0, -1) if TYPES[n - 1] in types]


FILTERS = [
    ("SIU^*12", ids_of("SIU^S12")),  # a * inside the pattern (issue 13.11)
    ("SIU^S1*", ids_of("SIU^S12", "SIU^S13", "SIU^S14")),
    ("*^A0*", ids_of("ADT^A01", "ADT^A04")),
    ("*", list(range(len(TYPES), 0, -1))),
    ("ORM^O01", ids_of("ORM^O01")),
    ("ADT^A0?", []),  # ? is not a wildcard
    ("ADT^A0[14]", []),  # nor is [...]
    ("SIU", []),  # no * : the whole type
]


@pytest.fixture
def running(daemon: Daemon, tmp_path: Path) -> tuple[Daemon, str]:
    """The daemon with TYPES stored and an analyst's API token."""
    daemon.start()
    files = []
    for n, msg_type in enumerate(TYPES, 1):
        path = tmp_path / f"m{n}.hl7"
        path.write_bytes(hl7(f"CTL{n}", msg_type=msg_type, body=("PID|1||X1^^^MRN",)))
        files.append(str(path))
    sent = refloop("send", "--port", str(daemon.mllp), *files)
    assert sent.returncode == 0, sent.stderr.decode()
    added = refloop(
        "users", "add", "ana", "--role", "analyst", "--password-stdin", "--token",
        "--state", str(daemon.state_dir),
        stdin=b"a long enough password\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr.decode()
    token = added.stdout.decode().rsplit(": ", 1)[-1].strip()
    return daemon, token


def api_ids(daemon: Daemon, token: str, pattern: str) -> list[int]:
    query = urllib.parse.urlencode({"type": pattern, "limit": 500})
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.http}/api/messages?{query}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return [int(m["id"]) for m in json.load(response)["items"]]


def cli_ids(daemon: Daemon, pattern: str) -> list[int]:
    listed = refloop(
        "messages", "list", "--type", pattern, "--limit", "0", "--json",
        "--state", str(daemon.state_dir),
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr.decode()
    return [int(m["id"]) for m in json.loads(listed.stdout)]


def test_cli_and_api_give_the_same_rows_for_the_same_type_filter(
    running: tuple[Daemon, str],
) -> None:
    daemon, token = running
    assert cli_ids(daemon, "*") == list(range(len(TYPES), 0, -1))  # all stored, in order
    for pattern, expected in FILTERS:
        assert cli_ids(daemon, pattern) == expected, pattern
        assert api_ids(daemon, token, pattern) == expected, pattern
