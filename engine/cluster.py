"""This node in a cluster: its ``nodes`` row, its heartbeat and the singleton lease.

Several refloop daemons may share one store (docs/scale-out.md). Most work is safe on
every node because it claims rows (inbox processing, outbox dispatch, webhooks). Work that
must run once per installation (FHIR pollers, IMAP pollers, the escalation timer wheel)
runs only on the node holding the ``singletons`` lease: :class:`Membership` acquires it,
renews it every third of ``store.lease_seconds``, calls ``on_gain`` when it gets it and
``on_lose`` as soon as it cannot be sure it still holds it (a failed renewal, or no
successful renewal before the lease's end: the node fences itself). One node alone takes
the lease at start and keeps it. A clean stop releases it, so a restart or a standby takes
over at once; after a crash (kill -9) the others wait for the lease to run out, except a
restarted daemon on the same host, which sees that the holder's process is gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final

from engine.clock import Clock, isoformat
from engine.errors import ConfigError
from engine.metrics import Metrics
from engine.store import leases, nodes
from engine.store.leases import Lease
from engine.store.sql import Conn, Database, DatabaseError, has_table

log = logging.getLogger(__name__)

SINGLETONS: Final = "singletons"  # the lease name of the once-per-installation work


def _pid_gone(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Membership:
    def __init__(
        self,
        db: Database,
        node_id: str,
        clock: Clock,
        *,
        lease_seconds: float,
        version: str,
        on_gain: Callable[[int], None],
        on_lose: Callable[[], Coroutine[Any, Any, None]],
        metrics: Metrics | None = None,
        config: str = "",
    ):
        self.db = db
        self.node_id = node_id
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.version = version
        self.on_gain = on_gain
        self.on_lose = on_lose
        self.metrics = metrics
        self.config = config  # routes_fingerprint of what this node runs
        if metrics is not None:
            metrics.cluster_lease_held.labels(SINGLETONS).set(0)
        self.lease: Lease | None = None
        self.joined = False  # our row is written (leave() touches nothing before that)
        self.host = socket.gethostname()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._losing: asyncio.Task[None] | None = None
        self._own: Database | None = None  # the periodic round's connection (SQLite)

    @property
    def interval(self) -> float:
        return self.lease_seconds / 3

    @property
    def leader(self) -> bool:
        return self.lease is not None

    def check_id(self) -> None:
        """Raise ConfigError when another running node already uses this node id (both
        would believe they hold its leases and outbox claims). Called before anything
        starts listening."""
        other = nodes.get(self.db.conn, self.node_id)
        if (
            other is not None
            and other["stopped"] is None
            and self.clock.now() - other["heartbeat"] <= self.lease_seconds
            and (other["host"], other["pid"]) != (self.host, os.getpid())
            and not (other["host"] == self.host and _pid_gone(int(other["pid"])))
        ):
            raise ConfigError(
                f"store.node_id {self.node_id!r} is in use by a running node "
                f"(host {other['host']}, pid {other['pid']}); give each node its own node_id"
            )

    def join(self, addresses: str = "") -> None:
        """Write this node's row and try the lease once (a lone node gets it here).
        Raises ConfigError when the node id is in use (:meth:`check_id`)."""
        self.check_id()
        with self.db.transaction() as conn:
            nodes.register(
                conn,
                self.node_id,
                host=self.host,
                pid=os.getpid(),
                version=self.version,
                addresses=addresses,
                now=self.clock.now(),
                config=self.config,
            )
        self.joined = True
        self._round()

    def set_config(self, fingerprint: str) -> None:
        """Record the routes this node runs after a reload."""
        self.config = fingerprint
        try:
            with self.db.transaction(durable=False) as conn:
                nodes.set_config(conn, self.node_id, fingerprint)
        except DatabaseError as exc:
            log.error("cluster: could not record the reloaded config: %s", exc)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster")

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval)
            except TimeoutError:
                pass
            if self._stopping.is_set():
                break
            await self._round_off_loop()

    def _dead_holder(self, db: Database, holder: str) -> str:
        """``holder`` when it is a node on this host whose process is gone."""
        row = nodes.get(db.conn, holder)
        if row and row["host"] == self.host and _pid_gone(int(row["pid"])):
            return holder
        return ""

    def _round(self) -> None:
        """One heartbeat and one lease renewal (or attempt), on the loop's connection
        (at join)."""
        self._apply(*self._round_on(self.db))

    async def _round_off_loop(self) -> None:
        """The periodic round. On SQLite its BEGIN may wait for the write lock (the inbox
        writer's group commits, the processing worker's transactions) in SQLite's busy
        handler, which sleeps: on the event loop that held every ACK of the node (0.85 and
        1.6 s in bench/ingest.py runs, docs/performance.md issue 18). So it runs in a
        thread on a connection of its own; what it decided is applied on the loop. On
        PostgreSQL (row locks, no file lock) it stays on the loop's connection."""
        if self._own is None:
            own = self.db.another() if self.db.dialect == "sqlite" else self.db
            if own is not self.db and isinstance(getattr(own.conn, "label", None), str):
                own.conn.label = "cluster"  # REFLOOP_SQL_STATS, REFLOOP_TXN_TRACE: apart
            self._own = own
        if self._own is self.db:
            self._round()
            return
        self._apply(*await asyncio.to_thread(self._round_on, self._own))

    def _round_on(self, db: Database) -> tuple[str, Lease | None]:
        """The round's transaction on ``db``: (what happened, the lease) with what
        happened one of ``renewed``, ``lost``, ``got``, ``none`` or ``failed: <error>``.
        Touches no asyncio object (it may run in a thread)."""
        now = self.clock.now()
        lease = self.lease
        try:
            with db.transaction(durable=False) as conn:
                if not nodes.beat(conn, self.node_id, now):
                    nodes.register(
                        conn,
                        self.node_id,
                        host=self.host,
                        pid=os.getpid(),
                        version=self.version,
                        addresses="",
                        now=now,
                        config=self.config,
                    )
                if lease is not None:
                    renewed = leases.renew(conn, lease, now, self.lease_seconds)
                    return ("lost", lease) if renewed is None else ("renewed", renewed)
                current = leases.get(conn, SINGLETONS)
                dead = ""
                if current and current.holder != self.node_id and current.until >= now:
                    dead = self._dead_holder(db, current.holder)
                    if not dead:
                        return "none", None
                got = leases.acquire(
                    conn, SINGLETONS, self.node_id, now, self.lease_seconds, dead=dead
                )
        except DatabaseError as exc:
            return f"failed: {exc}", None
        return ("got", got) if got is not None else ("none", None)

    def _apply(self, what: str, lease: Lease | None) -> None:
        """On the loop: act on a round's outcome."""
        if what.startswith("failed"):
            log.error("cluster: heartbeat %s", what)
            if self.lease is not None and self.clock.now() >= self.lease.until:
                log.error("cluster: %s lease ran out unrenewed; stopping that work", SINGLETONS)
                self._lose()
        elif what == "lost":
            assert lease is not None
            log.error(
                "cluster: lost the %s lease (token %d); stopping that work",
                SINGLETONS,
                lease.token,
            )
            self._lose()
        elif what == "renewed":
            self.lease = lease
        elif what == "got":
            assert lease is not None
            self.lease = lease
            if self.metrics is not None:
                self.metrics.cluster_lease_held.labels(SINGLETONS).set(1)
            log.info(
                "cluster: %s holds the %s lease (token %d)", self.node_id, SINGLETONS, lease.token
            )
            self.on_gain(lease.token)

    def _lose(self) -> None:
        self.lease = None
        if self.metrics is not None:
            self.metrics.cluster_lease_held.labels(SINGLETONS).set(0)
            self.metrics.cluster_lease_lost.labels(SINGLETONS).inc()
        self._losing = asyncio.create_task(self.on_lose(), name="cluster-lose")

    def halt(self) -> None:
        """No more rounds (shutdown): the lease is neither renewed nor taken again."""
        self._stopping.set()

    async def leave(self) -> None:
        """Stop the heartbeat, release the lease (the caller has stopped the leased work)
        and stamp this node stopped."""
        self._stopping.set()
        if not self.joined:
            return  # refused or never started: the row (maybe another node's) is not ours
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._losing is not None:
            await asyncio.gather(self._losing, return_exceptions=True)
        if self._own is not None and self._own is not self.db:
            self._own.close()
        self._own = None
        try:
            with self.db.transaction() as conn:
                if self.lease is not None:
                    leases.release(conn, self.lease, self.clock.now())
                    self.lease = None
                    if self.metrics is not None:
                        self.metrics.cluster_lease_held.labels(SINGLETONS).set(0)
                nodes.mark_stopped(conn, self.node_id, self.clock.now())
        except DatabaseError as exc:
            log.error("cluster: could not record the stop: %s", exc)


# routes.yaml sections that legitimately differ between nodes (bind addresses, node id)
NODE_LOCAL: Final = frozenset({"version", "store", "http", "sources"})


def routes_fingerprint(sections: Mapping[str, Any]) -> str:
    """A short hash of the routes.yaml sections every node must share (routes, tables,
    channels, escalation, practice, ...), as written (``${env:...}`` references, not their
    values), so ``refloop cluster status`` can show nodes running different routes."""
    shared = {name: section.data for name, section in sections.items() if name not in NODE_LOCAL}
    text = json.dumps(shared, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cluster_status(conn: Conn, now: float, lease_seconds: float) -> dict[str, Any]:
    """What ``refloop cluster status`` shows: nodes (alive, stale or stopped by their
    heartbeat), leases (holder, expires in), the processing lag and the outbox rows in
    flight per node. A node is stale when its heartbeat is older than ``lease_seconds``
    (it renews every third of that)."""
    if not has_table(conn, "nodes"):
        node_rows: list[dict[str, Any]] = []
        lease_rows: list[dict[str, Any]] = []
    else:
        node_rows = nodes.list_nodes(conn)
        lease_rows = leases.list_leases(conn)
    out_nodes = []
    for n in node_rows:
        age = max(0.0, now - n["heartbeat"])
        state = "stopped" if n["stopped"] else ("alive" if age <= lease_seconds else "stale")
        out_nodes.append(
            {
                "node_id": n["node_id"],
                "state": state,
                "heartbeat_age_seconds": round(age, 1),
                "heartbeat": isoformat(n["heartbeat"]),
                "started": isoformat(n["started"]),
                "version": n["version"],
                "config": n["config"],
                "addresses": [a for a in n["addresses"].split(",") if a],
            }
        )
    out_leases = [
        {
            "name": lease["name"],
            "holder": lease["holder"] if lease["until"] >= now else "",
            "last_holder": lease["holder"],
            "expires_in_seconds": round(lease["until"] - now, 1),
            "token": lease["token"],
            "since": isoformat(lease["acquired"]),
        }
        for lease in lease_rows
    ]
    waiting, oldest = nodes.processing_lag(conn)
    running = {n["config"] for n in out_nodes if n["state"] == "alive" and n["config"]}
    return {
        "nodes": out_nodes,
        "config_drift": len(running) > 1,
        "leases": out_leases,
        "processing": {
            "lag_messages": waiting,
            "oldest_waiting_seconds": round(now - oldest, 1) if oldest is not None else 0.0,
        },
        "outbox_in_flight": [
            {
                "node_id": holder,
                "rows": rows,
                "lease_ends_in_seconds": round(until - now, 1) if until is not None else None,
            }
            for holder, rows, until in nodes.in_flight_by_node(conn)
        ],
    }
