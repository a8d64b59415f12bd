"""The CLI is consistent, command by command, as docs/cli.md promises: the tree of the
installed ``refloop`` executable is walked and every command checked:

- every ``list``/``show``/``status`` command accepts ``--json``;
- every command's and group's ``--help`` has an ``Example:``, and ``refloop --help``
  lists every group;
- every command that takes ``--json`` is run against a real database (a referral sent
  over MLLP to a real engine first) and each time in its output is ISO 8601 UTC ending
  in ``Z`` (a key ending in ``_at``, ``due``, and any ISO date-time string);
- the JSON API's list operations keep the same rule.

Each checker is a plain function with a self-test that plants the fault it looks for.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import yaml
from helpers import drop_pg_schema, make_pg_schema, run
from ui_rig import ref_i12, ui_config, ui_engine

from engine.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
EXECUTABLE = Path(sys.executable).parent / "refloop"
# PostgreSQL runs here on every machine of this project (trust auth, database test):
# `store copy --json` copies into a fresh schema there
PG_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
JSON_REQUIRED = ("list", "show", "status")
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?Z$")
ISO_ANY = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([+-]\d{2}:?\d{2}|Z)?$")
TIME_KEYS = ("due",)
# FILE arguments and options the --json commands need to run at all
EXTRA_ARGS: dict[str, list[str]] = {
    "refloop replay": ["--dry-run"],
    "refloop report closure": ["--from", "2026-01-01", "--to", "2026-12-31"],
    "refloop simulate": ["docs/scenarios/hand-picked.yaml", "--summary"],
    "refloop specialists set": [
        "1234567893",
        "--name",
        "Cardiology Associates",
        "--fax",
        "5550200107",
    ],
}


# -- the checkers ---------------------------------------------------------------------


def commands(group: click.Group, prefix: str = "refloop") -> Iterator[tuple[str, click.Command]]:
    """Every command and group under ``group`` (lazy groups loaded), depth first."""
    ctx = click.Context(group)
    names = group.list_commands(ctx)
    for name in names:
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        path = f"{prefix} {name}"
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, path)


def option_names(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in getattr(p, "opts", [])}


def shape_problems(group: click.Group) -> list[str]:
    """list/show/status commands without --json; commands and groups without an
    ``Example:`` in their help (a group's help may point at its commands' examples)."""
    out: list[str] = []
    for path, cmd in commands(group):
        if isinstance(cmd, click.Group):
            continue
        if path.rsplit(" ", 1)[-1] in JSON_REQUIRED and "--json" not in option_names(cmd):
            out.append(f"{path}: no --json")
        if "Example:" not in (cmd.help or ""):
            out.append(f"{path}: --help has no Example:")
    return out


def time_problems(value: Any, where: str = "$") -> list[str]:
    """Times that are not ISO 8601 UTC with a Z: under a key ending in ``_at`` (or
    :data:`TIME_KEYS`) anything but null/"" or such a string; anywhere, a string that is
    an ISO date-time with another zone or none."""
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}"
            timed = (str(key).endswith("_at") or key in TIME_KEYS) and item not in (None, "")
            if timed and not (isinstance(item, str) and ISO_Z.match(item)):
                out.append(f"{here}: {item!r} is not ISO 8601 UTC with Z")
                continue
            out.extend(time_problems(item, here))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.extend(time_problems(item, f"{where}[{i}]"))
    elif isinstance(value, str) and ISO_ANY.match(value) and not ISO_Z.match(value):
        out.append(f"{where}: {value!r} is not ISO 8601 UTC with Z")  # a time of day
    return out


def json_documents(text: str) -> list[Any]:
    """One JSON document, or one per line (``--json`` of replay and audit export)."""
    try:
        return [json.loads(text)]
    except ValueError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- the checkers check themselves ------------------------------------------------------


def test_the_shape_checker_finds_a_missing_json_and_example() -> None:
    @click.group()
    def fake() -> None:
        """A group."""

    @fake.command("list")
    def listing() -> None:
        """Lists things (and no example)."""

    @fake.command("show")
    @click.option("--json", "as_json", is_flag=True)
    def show(as_json: bool) -> None:
        """Shows a thing.

        Example: fake show --json
        """

    assert shape_problems(fake) == [
        "refloop list: no --json",
        "refloop list: --help has no Example:",
    ]


@pytest.mark.parametrize(
    ("planted", "found"),
    [
        pytest.param({"received_at": 1764806400.0}, "$.received_at", id="epoch-number"),
        pytest.param({"items": [{"due": "2026-12-04T10:00:00+00:00"}]}, "$.items[0].due",
                     id="offset-not-Z"),
        pytest.param({"a": {"opened_at": "2026-12-04 10:00:00"}}, "$.a.opened_at", id="no-zone"),
        pytest.param({"note": ["2026-12-04T10:00:00"]}, "$.note[0]", id="bare-string"),
    ],
)  # fmt: skip
def test_the_time_checker_finds_a_planted_time(planted: Any, found: str) -> None:
    problems = time_problems(planted)
    assert len(problems) == 1 and problems[0].startswith(found), problems


def test_the_time_checker_passes_good_times() -> None:
    good = {
        "received_at": "2026-12-04T10:00:00.123456Z",
        "closed_at": None,
        "needed_by": "2026-12-31",
        "rows": [{"due": "2026-12-04T10:00:00Z", "name": "T 10:00"}],
    }
    assert time_problems(good) == []


# -- the real executable ------------------------------------------------------------------


def test_the_executable_is_this_click_tree() -> None:
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "refloop"]
    assert script.value == "engine.cli.main:main"
    assert EXECUTABLE.exists(), EXECUTABLE


def test_every_list_and_show_command_has_json_and_every_help_an_example() -> None:
    assert shape_problems(main) == []


def test_refloop_help_lists_every_group_with_an_example() -> None:
    result = subprocess.run(
        [str(EXECUTABLE), "--help"], capture_output=True, timeout=60, check=True
    )
    listing = result.stdout.decode()
    groups = [p for p, c in commands(main) if isinstance(c, click.Group)]
    assert len(groups) >= 10, groups
    for path in groups:
        name = path.split()[1]
        assert re.search(rf"^\s+{re.escape(name)}\s", listing, re.MULTILINE), f"{name} not listed"
        help_text = subprocess.run(
            [str(EXECUTABLE), *path.split()[1:], "--help"],
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout.decode()
        assert "Example:" in help_text, f"{path} --help has no Example:"


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A database the real engine wrote: two referrals over MLLP (timers, audit rows,
    specialists from the referral), one message no route wants."""
    tmp = tmp_path_factory.mktemp("cli-json")

    async def fill() -> None:
        async with ui_engine(tmp) as rig:
            await rig.send(ref_i12("REF-JSON-1", "js-1"), ref_i12("REF-JSON-2", "js-2"))
            await rig.wait_referral("REF-JSON-1")
            await rig.wait_referral("REF-JSON-2")

    run(fill(), timeout=60)
    routes = tmp / "routes.yaml"
    routes.write_text(yaml.safe_dump(ui_config(), sort_keys=False), encoding="utf-8")
    sample = tmp / "sample.hl7"
    sample.write_bytes(ref_i12("REF-JSON-3", "js-3").replace(b"\r", b"\n"))
    return {"state": tmp / "state", "routes": routes, "sample": sample}


def _json_commands() -> list[str]:
    return [
        p
        for p, c in commands(main)
        if not isinstance(c, click.Group) and "--json" in option_names(c)
    ]


def _first(out: Any, key: str) -> str:
    items = out["items"] if isinstance(out, dict) and "items" in out else out
    return str(items[0][key])


def _args(path: str, state: dict[str, Path]) -> list[str]:
    words = path.split()[1:]
    common = ["--state", str(state["state"]), "--routes", str(state["routes"])]
    if path in ("refloop routes test",):
        return [*words, str(state["sample"]), "--routes", str(state["routes"])]
    if path == "refloop simulate":
        return [*words, *EXTRA_ARGS[path]]
    if path.endswith(" show"):
        group = words[0]
        listing = subprocess.run(
            [str(EXECUTABLE), group, "list", "--json", *common],
            capture_output=True,
            timeout=120,
            check=True,
        )
        rows = json.loads(listing.stdout)
        assert rows, f"{group} list is empty: nothing to show"
        key = "npi" if group == "specialists" else "id"
        words = [*words, str(rows[0][key] if isinstance(rows, list) else _first(rows, key))]
    return [*words, *EXTRA_ARGS.get(path, []), *common]


@pytest.mark.parametrize("path", _json_commands())
def test_json_output_times_are_utc_with_z(path: str, state: dict[str, Path]) -> None:
    schema = ""
    if path == "refloop store copy":  # into a fresh schema of the machine's PostgreSQL
        url, schema = make_pg_schema(PG_SERVER)
        args = ["store", "copy", "--from", str(state["state"] / "refloop.db"), "--to", url]
    else:
        args = _args(path, state)
    try:
        result = subprocess.run(
            [str(EXECUTABLE), *args, "--json"], capture_output=True, timeout=180, cwd=ROOT
        )
    finally:
        if schema:
            drop_pg_schema(PG_SERVER, schema)
    assert result.returncode == 0, result.stderr.decode()
    documents = json_documents(result.stdout.decode())
    assert documents, f"{path} --json printed nothing"
    problems = [p for doc in documents for p in time_problems(doc)]
    assert not problems, f"{path} --json: {problems[:5]}"


@pytest.mark.store
def test_api_list_times_are_utc_with_z(tmp_path: Path) -> None:
    """Every GET operation without path parameters, as the admin token sees it."""

    async def body() -> list[str]:
        async with ui_engine(tmp_path) as rig:
            await rig.send(ref_i12("REF-API-1", "api-1"))
            rid = await rig.wait_referral("REF-API-1")
            problems: list[str] = []
            async with httpx.AsyncClient(base_url=rig.base, headers=rig.bearer("config")) as http:
                doc = (await http.get("/api/openapi.json")).json()
                paths = [
                    p
                    for p, ops in doc["paths"].items()
                    if "get" in ops and "{" not in p and p != "/api/openapi.json"
                ]
                paths += [f"/api/referrals/{rid}", "/api/messages/1"]
                for path in paths:
                    params = (
                        {"start": "2026-01-01", "end": "2026-12-31"} if "report" in path else {}
                    )
                    r = await http.get(path, params=params)
                    assert r.status_code == 200, (path, r.text)
                    if r.headers["Content-Type"].startswith("application/json"):
                        problems += [f"{path} {p}" for p in time_problems(r.json())]
            return problems

    assert run(body(), timeout=60) == []
