"""Shared test helpers: ports, HL7 builders, a raw MLLP peer, ACK reading, an in-process
engine, the daemon as a subprocess, and TLS certificates made at run time.

Every wait here is bounded (:data:`WAIT` unless told otherwise) and waits for an event
(a frame, a close, readiness), never for time to pass. Everything opened is closed
(``filterwarnings = error`` turns a leaked socket into a failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from engine.app import Engine
from engine.clock import Clock, WallClock
from engine.config import Config, loads
from engine.hl7v2.mllp import Framer, frame

T = TypeVar("T")

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus" / "hl7"
WAIT = 5.0  # seconds: the bound on any single wait for the server
RUN = (sys.executable, "-m", "engine.cli", "run")
# the installed `refloop` executable (its own directory first on sys.path, not the cwd's)
REFLOOP_RUN = (str(Path(sys.executable).parent / "refloop"), "run")


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run one async test body on a fresh event loop, bounded by ``timeout``."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for subprocesses, which
    cannot report a port-0 bind back to us as cheaply)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------
# Building HL7 messages


def hl7(
    control_id: str,
    *,
    msg_type: str = "ADT^A01",
    fs: str = "|",
    enc: str = "^~\\&",
    version: str = "2.5.1",
    msh15: str = "",
    msh16: str = "",
    msh18: str = "",
    sending_app: str = "TESTAPP",
    sending_facility: str = "TESTFAC",
    body: tuple[str, ...] = ("PID|1||12345^^^MRN||DOE^JANE||19800101|F",),
    end: str = "\r",
    codec: str = "ascii",
) -> bytes:
    """One message. ``body`` segments are written with ``|`` and ``^`` and translated to
    ``fs`` and ``enc``; ``end`` terminates every segment."""
    cs = enc[0]
    msh = [
        "MSH",
        enc,
        sending_app,
        sending_facility,
        "REFLOOP",
        "CLINIC",
        "20260101120000",
        "",
        msg_type.replace("^", cs),
        control_id,
        "P",
        version,
        "",
        "",
        msh15,
        msh16,
        "",
        msh18,
    ]
    while msh[-1] == "" and len(msh) > 12:
        msh.pop()
    segments = [fs.join(msh)]
    for seg in body:
        segments.append(seg.replace("|", "\0").replace("^", cs).replace("\0", fs))
    return "".join(s + end for s in segments).encode(codec)


# ---------------------------------------------------------------------------
# Reading replies (independently of engine.hl7v2.ack and engine.hl7v2.client)


@dataclass(frozen=True)
class Reply:
    """One ACK: its segments as field lists numbered like the standard."""

    raw: bytes
    segments: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(cls, raw: bytes) -> Reply:
        text = raw.decode("utf-8", errors="replace")
        if len(text) < 4 or not text.startswith("MSH"):
            raise AssertionError(f"not an HL7 message: {raw[:60]!r}")
        fs = text[3]
        segs: list[tuple[str, ...]] = []
        for line in text.split("\r"):
            if not line:
                continue
            parts = line.split(fs)
            segs.append(("MSH", fs, *parts[1:]) if parts[0] == "MSH" else tuple(parts))
        return cls(raw, tuple(segs))

    def segment(self, name: str) -> tuple[str, ...]:
        for seg in self.segments:
            if seg[0] == name:
                return seg
        raise AssertionError(f"no {name} segment in {self.raw!r}")

    def field(self, name: str, n: int) -> str:
        seg = self.segment(name)
        return seg[n] if n < len(seg) else ""

    def has(self, name: str) -> bool:
        return any(seg[0] == name for seg in self.segments)

    @property
    def code(self) -> str:  # MSA-1
        return self.field("MSA", 1)

    @property
    def control_id(self) -> str:  # MSA-2
        return self.field("MSA", 2)

    @property
    def component_sep(self) -> str:
        return self.field("MSH", 2)[:1]


def batch_acks(raw: bytes) -> tuple[str, list[Reply]]:
    """Split a reply batch (BHS ... BTS) into (header segment, its ACKs)."""
    text = raw.decode("utf-8", errors="replace")
    lines = [line for line in text.split("\r") if line]
    if not lines or lines[0][:3] not in ("BHS", "FHS"):
        raise AssertionError(f"not a batch: {raw[:60]!r}")
    acks: list[list[str]] = []
    for line in lines[1:]:
        if line.startswith("MSH"):
            acks.append([line])
        elif line[:3] in ("BTS", "FTS"):
            continue
        else:
            acks[-1].append(line)
    return lines[0], [Reply.parse(("\r".join(a) + "\r").encode()) for a in acks]


# ---------------------------------------------------------------------------
# A raw MLLP peer


class Peer:
    """A test MLLP peer: writes whatever bytes it is told to and reads frames back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.framer = Framer(1 << 30)
        self.frames: deque[bytes] = deque()
        self.eof = False

    @classmethod
    async def connect(
        cls, port: int, *, ssl_context: ssl.SSLContext | None = None, timeout: float = WAIT
    ) -> Peer:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, ssl=ssl_context), timeout
        )
        return cls(reader, writer)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, payload: bytes) -> None:
        await self.write(frame(payload))

    async def recv(self, timeout: float = WAIT) -> bytes | None:
        """The next frame, or None once the server has closed the connection. Silence
        for ``timeout`` seconds raises TimeoutError (a failed test, never a hang)."""
        while not self.frames:
            if self.eof:
                return None
            try:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                data = b""
            if not data:
                self.eof = True
                continue
            self.frames.extend(self.framer.feed(data))
        return self.frames.popleft()

    async def ask(self, payload: bytes, timeout: float = WAIT) -> Reply:
        """Send one message and read its ACK."""
        await self.send(payload)
        reply = await self.recv(timeout)
        assert reply is not None, "connection closed instead of an ACK"
        return Reply.parse(reply)

    async def closed_by_server(self, timeout: float = WAIT) -> bool:
        """Wait until the server closes the connection (True) or sends a frame (False)."""
        return await self.recv(timeout) is None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)


@contextlib.asynccontextmanager
async def peer(port: int, *, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Peer]:
    p = await Peer.connect(port, ssl_context=ssl_context)
    try:
        yield p
    finally:
        await p.close()


# ---------------------------------------------------------------------------
# The engine in this process


def config(*, http: bool = False, synchronous: str = "full", **source: Any) -> Config:
    """A config with one MLLP source ``ehr`` on port 0; keyword arguments override the
    source's settings (``max_frame_bytes=1024``, ``tls={...}``)."""
    doc = {
        "version": 1,
        "store": {"file": "refloop.db", "synchronous": synchronous},
        "http": {"host": HOST, "port": 0} if http else {"enabled": False},
        "sources": {"ehr": {"type": "mllp", "host": HOST, "port": 0, **source}},
    }
    return loads(yaml.safe_dump(doc, sort_keys=False), file="test-routes.yaml", env={})


@contextlib.asynccontextmanager
async def running_engine(
    state_dir: Path, *, clock: Clock | None = None, synchronous: str = "full", **source: Any
) -> AsyncIterator[Engine]:
    """An engine started on 127.0.0.1 port 0 with a fresh SQLite file in ``state_dir``;
    keyword arguments are the ``ehr`` source's settings."""
    engine = Engine(
        config(synchronous=synchronous, **source),
        state_dir,
        clock=clock or WallClock(),
        drain_seconds=2.0,
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def mllp_port(engine: Engine) -> int:
    return engine.ports()["ehr"]


def query(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the store directly, as an operator's sqlite3 shell would (or psql, when the
    test's file stands for a PostgreSQL schema: :func:`routed`)."""
    url = routed(db)
    if url:
        with contextlib.closing(_pg_conn(url)) as conn:
            return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql, args).fetchall()


def wait_rows(db: Path, sql: str, args: tuple[Any, ...] = (), timeout: float = 20.0) -> list[Any]:
    """Poll the database until ``sql`` returns rows (waits on the row, not a time)."""
    from engine.store.db import DatabaseError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = query(db, sql, args)
        except DatabaseError:  # the table is not there yet
            rows = []
        if rows:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"no rows for {sql!r} within {timeout}s")


def move_time_back(db: Path, seconds: float) -> None:
    """Everything stored moves ``seconds`` into the past, as if the daemon (stopped) had
    been down that long: the referrals' opening, their timers, outbox rows and tasks; the
    timers due meanwhile fire when it restarts."""
    url = routed(db)
    opened: Any = _pg_conn(url) if url else sqlite3.connect(db)
    with contextlib.closing(opened) as conn:
        back = (seconds,)
        conn.execute("BEGIN")
        conn.execute("UPDATE timers SET due = due - ?1, created_at = created_at - ?1", back)
        conn.execute("UPDATE referrals SET opened_at = opened_at - ?1", back)
        conn.execute(
            "UPDATE outbox SET due = due - ?1, created_at = created_at - ?1, "
            "updated_at = updated_at - ?1, sent_at = sent_at - ?1",
            back,
        )
        conn.execute("UPDATE tasks SET created_at = created_at - ?1, due_at = due_at - ?1", back)
        conn.execute("COMMIT")


# ---------------------------------------------------------------------------
# PostgreSQL: a schema per test (REFLOOP_TEST_STORE)


def make_pg_schema(base_url: str) -> tuple[str, str]:
    """A fresh schema on the server at ``base_url``; returns (a URL whose connections use
    it through ``search_path``, its name)."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base_url else "?"
    url = f"{base_url}{sep}options=-csearch_path%3D{schema}&application_name={schema}"
    return url, schema


# Most tests only need "a fresh, empty store". Migrating a schema from scratch costs about
# 0.6 s of DDL on the server and dropping it 0.3 s, about a second a test; a database
# cloned from a template migrated once per test session (CREATE DATABASE ... TEMPLATE)
# costs about 0.1 s and drops in 0.05 s. ``make_pg_store`` gives such a clone (schema
# ``public``); ``make_pg_schema`` stays for the tests about schemas themselves (two
# schemas in one database, an unmigrated schema, a migration from an older version).

_TEMPLATE: dict[str, str] = {}  # base URL -> this session's migrated template database


def _db_url(base_url: str, name: str) -> str:
    """``base_url`` on database ``name`` (its query kept), named ``name`` in
    pg_stat_activity."""
    import urllib.parse

    parts = urllib.parse.urlsplit(base_url)
    query = "&".join(q for q in (parts.query, f"application_name={name}") if q)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}", query=query))


def _pg_template(base_url: str) -> str:
    """The template database for ``base_url``, made and migrated by this code on first use,
    dropped when the session ends."""
    import atexit

    import psycopg

    from engine.store.db import open_database

    if base_url not in _TEMPLATE:
        name = f"t_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        atexit.register(drop_pg_store, base_url, name)
        open_database(_db_url(base_url, name)).close()
        _TEMPLATE[base_url] = name
    return _TEMPLATE[base_url]


def make_pg_store(base_url: str, *, migrated: bool = True) -> tuple[str, str]:
    """A fresh, migrated, empty store on the server at ``base_url``: a database cloned from
    this session's template (``migrated=False``: a database with no tables at all, what a
    test of "no database yet" or of a migration from an older version needs); returns
    (its URL, its name)."""
    import psycopg

    source = f"TEMPLATE {_pg_template(base_url)} STRATEGY FILE_COPY" if migrated else ""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        for attempt in range(50):  # the template's last backend may still be exiting
            try:
                conn.execute(f"CREATE DATABASE {name} {source}")
                break
            except psycopg.errors.ObjectInUse:
                if attempt == 49:
                    raise
                time.sleep(0.1)
    return _db_url(base_url, name), name


def drop_pg_store(base_url: str, name: str) -> None:
    """Drop a database ``make_pg_store`` made (connections left open are ended)."""
    import psycopg

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def drop_pg_schema(base_url: str, schema: str) -> None:
    """Drop a test's schema and all in it (connections the test left open are ended)."""
    import psycopg

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND application_name = %s",
            (schema,),
        )
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# The whole suite on PostgreSQL. With REFLOOP_TEST_STORE set, conftest's autouse fixture
# turns routing on for each test not marked ``sqlite_file``: every SQLite file the test
# names that does not exist yet stands for a fresh PostgreSQL schema of its own (made on
# first use, dropped at teardown). The engine (``StoreConfig.location``), the test's own
# ``open_database(path)``, the daemon (``refloop run --store``), the CLI (a routes.yaml
# copy naming ``store.url``) and :func:`query` all find the same schema by the path.
# A file that exists (made before the test, by a module fixture or copied) stays a file.

TEST_STORE = os.environ.get("REFLOOP_TEST_STORE", "")


@dataclass
class _Routing:
    on: bool = False
    schemas: dict[str, tuple[str, str]] = field(default_factory=dict)  # file -> (url, database)
    empty: bool = False  # the test is marked ``empty_store``: its stores start with no tables
    files: list[Path] = field(default_factory=list)  # routes.yaml copies made for the CLI


ROUTING = _Routing()


def _key(path: str | os.PathLike[str]) -> str:
    from engine.store.db import sqlite_path

    return str(Path(os.path.abspath(sqlite_path(path))))


def routed(path: str | os.PathLike[str]) -> str:
    """The PostgreSQL URL standing for SQLite file ``path`` in this test, "" if none (a
    ``postgresql://`` URL stands for itself)."""
    text = str(path)
    if text.startswith(("postgresql://", "postgres://")):
        return text
    if not ROUTING.on:
        return ""
    found = ROUTING.schemas.get(_key(text))
    return found[0] if found else ""


def store_for(path: str | os.PathLike[str]) -> str:
    """Where a store the test names by file ``path`` is: ``path`` itself (SQLite, or a
    file that already exists), or (routing on) its PostgreSQL schema's URL."""
    text = str(path)
    if not ROUTING.on or text.startswith(("postgresql://", "postgres://", "sqlite://")):
        return text  # a URL says which store it means
    key = _key(text)
    if key not in ROUTING.schemas:
        if Path(key).exists():
            return text
        ROUTING.schemas[key] = make_pg_store(TEST_STORE, migrated=not ROUTING.empty)
    return ROUTING.schemas[key][0]


def stop_routing() -> None:
    """Routing off; the schemas and routes.yaml copies the test made are removed."""
    ROUTING.on = False
    ROUTING.empty = False
    for _url, name in ROUTING.schemas.values():
        drop_pg_store(TEST_STORE, name)
    ROUTING.schemas.clear()
    for path in ROUTING.files:
        path.unlink(missing_ok=True)
    ROUTING.files.clear()


def store_conn(db: Path) -> Any:
    """A connection to the store of file ``db`` (its PostgreSQL schema when routed) that
    speaks the store's SQLite-spelled SQL, in autocommit: the operator's shell. Close it."""
    url = routed(db)
    return _pg_conn(url) if url else sqlite3.connect(db, isolation_level=None)


def _pg_conn(url: str) -> Any:
    """A connection to ``url`` that speaks the store's SQLite-spelled SQL."""
    import psycopg
    from psycopg import ClientCursor

    from engine.store.pg import PgConn, _configure

    raw = psycopg.connect(url, autocommit=True, cursor_factory=ClientCursor)
    _configure(raw)
    return PgConn(raw)


def _routes_doc(routes: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(routes.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_section(routes: Path) -> dict[str, Any]:
    store = _routes_doc(routes).get("store")
    return store if isinstance(store, dict) else {}


def _loads(routes: Path) -> bool:
    from engine.config import load
    from engine.errors import EngineError

    try:
        load(str(routes))
    except (EngineError, OSError, ValueError):
        return False
    return True


def cli_args(*args: str) -> tuple[str, ...]:
    """``refloop`` arguments with the store routed: ``run`` gets ``--store``; another
    command naming ``--state`` gets a copy of its routes.yaml with ``store.url``."""
    if not ROUTING.on or "--state" not in args or "--store" in args:
        return args
    argv = list(args)
    state = Path(argv[argv.index("--state") + 1])
    if not state.is_absolute():
        state = REPO / state
    routes = REPO / "routes.yaml"
    if "--routes" in argv:
        routes = Path(argv[argv.index("--routes") + 1])
        routes = routes if routes.is_absolute() else REPO / routes
    data = _routes_doc(routes)
    store = _store_section(routes)
    if not data or store.get("url") or not _loads(routes):
        return args  # the command's own routes.yaml, with its name, in its error message
    url = store_for(state / str(store.get("file", "refloop.db")))
    if not url.startswith("postgresql://"):
        return args
    if argv[0] == "run":
        return (*argv, "--store", url)
    data["store"] = {**store, "url": url}
    copy = Path(tempfile.gettempdir()) / f"refloop-pg-routes-{uuid.uuid4().hex[:12]}.yaml"
    copy.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    ROUTING.files.append(copy)
    if "--routes" in argv:
        argv[argv.index("--routes") + 1] = str(copy)
    else:
        argv += ["--routes", str(copy)]
    return tuple(argv)


# ---------------------------------------------------------------------------
# The daemon as a subprocess


@dataclass
class Daemon:
    """``refloop run`` in a subprocess on free ports, logging to a file."""

    state_dir: Path
    log_path: Path
    routes: Path = REPO / "routes.yaml"
    mllp: int = 0
    http: int = 0
    store: str = ""  # refloop run --store (a postgresql:// URL or a file); "" = none
    cwd: Path = REPO  # the directory it is started in
    run: tuple[str, ...] = RUN  # the command up to ``run`` (or the executable: REFLOOP_RUN)
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def db(self) -> Path:
        return self.state_dir / "refloop.db"

    def start(self, timeout: float = 20.0, *, worker: bool = True) -> None:
        """Start and wait until /readyz answers 200 and (``worker``) the processing
        worker is up; a port lost to a race is retried. A test that kills the daemon
        from its own peer while the daemon starts passes ``worker=False``."""
        if ROUTING.on and not self.store and not _store_section(self.routes).get("url"):
            url = store_for(self.db)
            self.store = url if url.startswith("postgresql://") else ""
        for _attempt in range(3):
            self.mllp, self.http = free_port(), free_port()
            env = {
                k: v
                for k, v in os.environ.items()
                if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "REFLOOP_ROUTES", "REFLOOP_STATE")
            }
            env.update(REFLOOP_MLLP_PORT=str(self.mllp), REFLOOP_HTTP_PORT=str(self.http))
            self._log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [
                    *self.run,
                    "--routes",
                    str(self.routes),
                    "--state",
                    str(self.state_dir),
                    *(["--store", self.store] if self.store else []),
                ],
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
            )
            if self._wait_ready(timeout):
                if worker:
                    self.wait_worker(max(timeout, 60.0))
                return
            self.kill()
        raise AssertionError(f"daemon did not become ready; log:\n{self.log_tail()}")

    def worker_pid(self) -> int:
        """The pid of this daemon's processing worker (its child running
        ``engine.worker``, read from /proc), 0 if none."""
        assert self.proc is not None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"engine.worker" in cmdline:
                return int(entry)
        return 0

    def wait_worker(self, timeout: float = 60.0) -> None:
        """Wait until /readyz says the processing worker is up (docs/architecture.md,
        "Processes": readiness does not wait for it, a test that expects its messages
        processed does); at once when processing runs in the daemon."""
        deadline = time.monotonic() + timeout
        url = f"http://{HOST}:{self.http}/readyz"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if json.loads(resp.read()).get("worker", "up") == "up":
                        return
            except urllib.error.HTTPError as exc:
                exc.close()
            except (OSError, ValueError):
                pass
            time.sleep(0.05)  # polling, bounded by the deadline
        raise AssertionError(f"the processing worker did not come up; log:\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        url = f"http://{HOST}:{self.http}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return True
            except urllib.error.HTTPError as exc:
                exc.close()
            except OSError:
                pass
            time.sleep(0.02)  # polling for readiness, bounded by the deadline
        return False

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._close_log()

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(WAIT)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def refloop(
    *args: str, timeout: float = 30.0, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a ``refloop`` CLI command in a subprocess from the repo root (``stdin``: its
    standard input; none by default)."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *cli_args(*args)],
        cwd=REPO,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------------------
# TLS certificates, made at run time


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1, and client certificates by name."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # name -> (cert, key)

    def client_context(
        self, client: str | None = None, *, max_version: ssl.TLSVersion | None = None
    ) -> ssl.SSLContext:
        """A TLS client context trusting our CA, presenting ``client``'s certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if max_version is not None:
            ctx.maximum_version = max_version
        if client is not None:
            cert, key = self.clients[client]
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


def make_pki(directory: Path) -> Pki:
    """Trusted CA issuing the server cert and clients ``good-client`` and
    ``other-client``; an untrusted CA issuing ``rogue`` (whose CN is ``good-client``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(
        stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> tuple[Path, Path]:
        cert_path = directory / f"{stem}.pem"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    def ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def leaf(
        cn: str,
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        *,
        server: bool,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_cert, issuer_key = issuer
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256()), key

    directory.mkdir(parents=True, exist_ok=True)
    trusted = ca("refloop test CA")
    rogue_ca = ca("rogue CA")
    ca_path, _ = write("ca", *trusted)
    server_cert, server_key = write("server", *leaf("refloop-server", trusted, server=True))
    clients = {
        "good-client": write("good-client", *leaf("good-client", trusted, server=False)),
        "other-client": write("other-client", *leaf("other-client", trusted, server=False)),
        "rogue": write("rogue", *leaf("good-client", rogue_ca, server=False)),
    }
    return Pki(directory, ca_path, server_cert, server_key, clients)


def tls_source(
    pki: Pki, *, require_client_cert: bool = True, allowed_subjects: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The ``tls:`` mapping of a source, referencing the files as ``${file:...}``."""
    out: dict[str, Any] = {
        "cert": f"${{file:{pki.server_cert}}}",
        "key": f"${{file:{pki.server_key}}}",
        "ca": f"${{file:{pki.ca}}}",
        "require_client_cert": require_client_cert,
    }
    if allowed_subjects:
        out["allowed_subjects"] = list(allowed_subjects)
    return out


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs at ``where`` (``options``: ``size=16k``, ``ro``); skipped without root."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def shipped_routes(path: Path, *, ack_when: str = "on-processed", **top: Any) -> Path:
    """The shipped routes.yaml written to ``path`` with the ``ehr`` source's ``ack_when``
    (default ``on-processed``: the ACK arrives once the message is routed and tracked, so
    a test reads the result without waiting) and top-level sections added or replaced
    (``channels={...}``, ``sources={...}`` merged into the shipped sources)."""
    data = yaml.safe_load((REPO / "routes.yaml").read_text(encoding="utf-8"))
    data["sources"]["ehr"]["ack_when"] = ack_when
    for key, value in top.items():
        if key == "sources":
            data["sources"].update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# The real processor with the shipped routes, fed the benchmark's new-referral messages


def bench_ingest() -> Any:
    """bench/ingest.py as a module (its message template is the benchmark's ORM)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_ingest", REPO / "bench" / "ingest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def shipped_processor(db: Any, clock: Clock) -> tuple[Any, Any]:
    """(Processor, Inbox) on ``db`` with the shipped routes.yaml: routes, the tracker and
    its escalation, as the worker builds them."""
    from prometheus_client import CollectorRegistry

    from engine.app import default_handler
    from engine.config import load
    from engine.ingest.processor import Processor
    from engine.metrics import Metrics
    from engine.routing.compile import compile_config
    from engine.store import Inbox
    from engine.tracking.tracker import build_tracker

    config = load(REPO / "routes.yaml")
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    table = compile_config(config)
    tracker = build_tracker(config, db, clock, policy=table.escalation, registry=registry)
    handler = default_handler(
        config, db, clock=clock, metrics=metrics, tracker=tracker, table=table
    )
    inbox = Inbox(db)
    return Processor(db, inbox, handler, clock, metrics), inbox


def store_new_referrals(db: Any, inbox: Any, count: int, received_at: float) -> None:
    """``count`` of the benchmark's ORM^O01 (placer numbers REF0, REF1 ...), each a new
    referral, stored as the listener stores them (ACK code AA), in one transaction."""
    from engine.hl7v2.message import read_msh
    from engine.model import Inbound

    parts = bench_ingest().message_template()
    with db.transaction() as c:
        for i in range(count):
            raw = f"REF{i}".encode().join(parts)[1:-2]  # without the MLLP frame
            msh, codec = read_msh(raw)
            inbound = Inbound(
                source="ehr",
                peer="test",
                raw=raw,
                received_at=received_at,
                msh=msh,
                text_encoding=codec,
            )
            inbox.add_in(c, [inbound], "AA")
