"""Inbound Direct by IMAP (docs/direct.md, "What comes back"): the HISP leaves MDNs in a
mailbox, refloop polls it. A small wire-level IMAP4rev1 server on 127.0.0.1 port 0 stands
in for the HISP's (imaplib talks to it over a real socket). Through a running Engine whose
routes.yaml has an ``imap:`` block beside ``inbound:``: a signed ``dispatched`` MDN from
the mailbox moves the referral exactly as one over SMTP does, and is flagged ``\\Seen``
only once stored; forged and unsigned mail is quarantined (a stored outcome, so flagged);
a storage failure leaves the message unseen for the next poll. Plus the poller's single
connection per poll, TLS verification, and the configuration errors."""

from __future__ import annotations

import asyncio
import email
import re
import ssl
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiosmtplib
import pytest
import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session
from direct_pki import (
    OUR_ADDRESS,
    SPECIALIST,
    Issued,
    Pki,
    make_direct_pki,
    smtp_server,
    tls_server_context,
)
from helpers import run
from prometheus_client import CollectorRegistry

from channels.direct import smime
from channels.direct.inbound import DirectHandler, ImapPoller, ImapSettings
from engine.app import Engine
from engine.clock import VirtualClock, WallClock
from engine.config import loads
from engine.delivery.direct_inbound import MDN_TIMEOUT_KIND
from engine.delivery.factory import build_direct_imap_poller
from engine.errors import ConfigError
from engine.model import DirectInbound, Identifiers, MdnResult, Provider, ReferralCreated
from engine.routing.compile import compile_config
from engine.routing.table import ChannelSpec
from engine.store import outbox
from engine.store import referrals as rstore
from engine.tracking.specialists import import_csv

T0 = WallClock().now()  # certificates are checked at the clock's time
NPI = "1234567893"
USER, PASSWORD = "refloop", "imap-secret"
SEEN = "\\Seen"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_direct_pki(tmp_path_factory.mktemp("imap-pki"))


# ---------------------------------------------------------------------------
# A wire-level IMAP4rev1 server (RFC 3501)

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\([^)]*\)|\S+')


def _unquote(token: str) -> str:
    if len(token) > 1 and token[0] == token[-1] == '"':
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return token


class FakeImap:
    """Just enough IMAP4rev1 for imaplib, on the test's event loop: CAPABILITY, NOOP,
    LOGIN, SELECT, UID SEARCH UNSEEN, UID FETCH n (BODY.PEEK[]) answered with a
    ``{size}`` literal, UID STORE n +FLAGS (\\Seen), LOGOUT. ``BODY[]`` without PEEK sets
    \\Seen, as RFC 3501 §6.4.5 says. Every command is recorded as (connection number,
    command line without tag; LOGIN without the password). ``on_store(uid)`` runs when
    a STORE arrives, before the flag is set; ``refuse_logins`` answers that many LOGINs
    with NO."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, mailbox: str = "INBOX") -> None:
        self.tls = tls
        self.mailbox = mailbox
        self.messages: dict[int, bytes] = {}
        self.seen: set[int] = set()
        self.commands: list[tuple[int, str]] = []
        self.on_store: Callable[[int], None] | None = None
        self.refuse_logins = 0
        self.port = 0
        self._connections = 0
        self._changed: asyncio.Condition | None = None
        self._server: asyncio.Server | None = None

    def add(self, raw: bytes) -> int:
        uid = max(self.messages, default=0) + 1
        self.messages[uid] = raw
        return uid

    def count(self, command: str) -> int:
        return sum(1 for _, c in self.commands if c.split(" ")[0] == command)

    def since(self, mark: int) -> list[str]:
        return [c for _, c in self.commands[mark:]]

    async def wait(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        assert self._changed is not None
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def __aenter__(self) -> FakeImap:
        self._changed = asyncio.Condition()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        conn, state = self._connections, "connected"
        writer.write(b"* OK fake IMAP4rev1 ready\r\n")
        try:
            while line := await reader.readline():
                tag, _, rest = line.decode("ascii").rstrip("\r\n").partition(" ")
                args = [_unquote(t) for t in _TOKEN.findall(rest)]
                name = " ".join(args[:2]).upper() if args[:1] == ["UID"] else args[0].upper()
                self.commands.append((conn, f"LOGIN {args[1]}" if name == "LOGIN" else rest))
                out, state = self._answer(tag, name, args, state)
                writer.write(out)
                await writer.drain()
                assert self._changed is not None
                async with self._changed:
                    self._changed.notify_all()
                if name == "LOGOUT":
                    break
        finally:
            writer.close()
            await writer.wait_closed()

    def _answer(self, tag: str, name: str, args: list[str], state: str) -> tuple[bytes, str]:
        def done(text: str, *untagged: bytes | str) -> bytes:
            head = b"".join(u if isinstance(u, bytes) else f"* {u}\r\n".encode() for u in untagged)
            return head + f"{tag} {text}\r\n".encode()

        if name == "CAPABILITY":
            return done("OK CAPABILITY completed", "CAPABILITY IMAP4rev1"), state
        if name == "NOOP":
            return done("OK NOOP completed"), state
        if name == "LOGOUT":
            return done("OK LOGOUT completed", "BYE logging out"), "logout"
        if name == "LOGIN":
            if self.refuse_logins:
                self.refuse_logins -= 1
                return done("NO [AUTHENTICATIONFAILED] try again later"), state
            if args[1:] != [USER, PASSWORD]:
                return done("NO [AUTHENTICATIONFAILED] invalid credentials"), state
            return done("OK LOGIN completed"), "authenticated"
        if name == "SELECT" and state != "connected":
            if args[1:] != [self.mailbox]:
                return done("NO [NONEXISTENT] no such mailbox"), state
            return done(
                "OK [READ-WRITE] SELECT completed",
                f"{len(self.messages)} EXISTS",
                "0 RECENT",
                "OK [UIDVALIDITY 1] UIDs valid",
                f"FLAGS ({SEEN})",
            ), "selected"
        if state != "selected":
            return done(f"BAD {name} not allowed now"), state
        if name == "UID SEARCH" and [a.upper() for a in args[2:]] == ["UNSEEN"]:
            unseen = " ".join(str(u) for u in sorted(self.messages) if u not in self.seen)
            return done("OK SEARCH completed", f"SEARCH {unseen}".rstrip()), state
        if name == "UID FETCH" and args[3:] and args[3].upper() in ("(BODY.PEEK[])", "(BODY[])"):
            uid = int(args[2])
            if uid not in self.messages:
                return done("OK FETCH completed"), state
            if args[3].upper() == "(BODY[])":
                self.seen.add(uid)
            body, seq = self.messages[uid], sorted(self.messages).index(uid) + 1
            literal = f"* {seq} FETCH (UID {uid} BODY[] {{{len(body)}}}\r\n".encode()
            return done("OK FETCH completed", literal + body + b")\r\n"), state
        if name == "UID STORE" and args[3:] == ["+FLAGS", f"({SEEN})"]:
            uid = int(args[2])
            if uid in self.messages:
                if self.on_store is not None:
                    self.on_store(uid)
                self.seen.add(uid)
                seq = sorted(self.messages).index(uid) + 1
                return done("OK STORE completed", f"{seq} FETCH (UID {uid} FLAGS ({SEEN}))"), state
            return done("OK STORE completed"), state
        return done(f"BAD unknown command {name}"), state


# ---------------------------------------------------------------------------
# Mail the specialist's HISP sends: signed by the specialist, encrypted to us


def mdn_mail(
    pki: Pki, original: str, disposition: str, message_id: str, *, signer: Issued | None
) -> bytes:
    """An MDN (RFC 8098) for ``original``; ``signer`` None: encrypted but unsigned."""
    content = (
        'Content-Type: multipart/report; report-type=disposition-notification; boundary="b"\r\n'
        f"\r\n--b\r\nContent-Type: text/plain\r\n\r\nYour message was {disposition}.\r\n"
        "--b\r\nContent-Type: message/disposition-notification\r\n\r\n"
        f"Reporting-UA: hisp.specialist.test; test\r\nFinal-Recipient: rfc822;{SPECIALIST}\r\n"
        f"Original-Message-ID: {original}\r\n"
        f"Disposition: automatic-action/MDN-sent-automatically;{disposition}\r\n"
        + ("X-DIRECT-FINAL-DESTINATION-DELIVERY: \r\n" if disposition == "dispatched" else "")
        + "\r\n--b--\r\n"
    ).encode()
    entity = smime.canonicalize(content)
    if signer is not None:
        entity = smime.sign(entity, signer.identity)
    head = (
        f"From: {SPECIALIST}\r\nTo: {OUR_ADDRESS}\r\nSubject: Notification\r\n"
        f"Message-ID: {message_id}\r\n"
    )
    return head.encode() + smime.encrypt(entity, [pki.ours.cert])


def file_refs(pki: Pki) -> dict[str, str]:
    return {
        "cert": f"${{file:{pki.ours.cert_path}}}",
        "key": f"${{file:{pki.ours.key_path}}}",
        "trust_anchors": f"${{file:{pki.anchor.cert_path}}}",
    }


# ---------------------------------------------------------------------------
# The engine, with our HISP (submission) and the mailbox on loopback


class Hisp:
    """Our HISP's submission port: keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(envelope.original_content)
        return "250 2.0.0 queued"


def engine_config(tmp: Path, pki: Pki, hisp_port: int, imap_port: int) -> Any:
    doc = {
        "version": 1,
        "store": {"file": "refloop.db"},
        "http": {"enabled": False},
        "channels": {
            "direct": {
                "type": "direct",
                "address": OUR_ADDRESS,
                "hisp_host": "127.0.0.1",
                "hisp_port": hisp_port,
                "hisp_ca": f"${{file:{pki.anchor.cert_path}}}",
                **file_refs(pki),
                "inbound": {"host": "127.0.0.1", "port": 0, "require_tls": False},
                "imap": {
                    "host": "127.0.0.1",
                    "port": imap_port,
                    "username": USER,
                    "password": "${env:IMAP_PASSWORD}",
                    "tls": False,  # loopback only
                    "interval": 3600,  # the test polls; the engine's task polls at start
                },
            },
        },
        "routes": [{"name": "all", "then": [{"drop": "tests"}]}],
    }
    env = {"IMAP_PASSWORD": PASSWORD}
    return loads(yaml.safe_dump(doc), file=str(tmp / "routes.yaml"), env=env)


@dataclass
class Rig:
    engine: Engine
    clock: VirtualClock
    hisp: Hisp
    fake: FakeImap

    @property
    def db(self) -> Any:
        assert self.engine.db is not None
        return self.engine.db

    def referral(self, placer: str) -> int:
        with self.db.transaction() as conn:
            created = self.engine.tracker.apply(
                ReferralCreated(
                    ids=Identifiers(sending_facility="CLINIC", placer_number=placer),
                    occurred_at=self.clock.now(),
                    specialist=Provider(name="Dr Ann Smith", npi=NPI),
                ),
                conn,
            )
        assert created.referral_id is not None
        return int(created.referral_id)

    def packet(self, rid: int) -> outbox.Item:
        (row,) = [o for o in rstore.outbox_for(self.db.conn, rid) if o.channel == "direct"]
        item = outbox.get(self.db.conn, row.id)
        assert item is not None
        return item

    async def send_packets(self, *rids: int) -> dict[int, str]:
        """Dispatch the Direct packets; their Message-IDs by referral."""
        assert self.engine.dispatcher is not None
        assert await self.engine.dispatcher.run_once("direct") == len(rids)
        sent = {str(email.message_from_bytes(m)["Message-ID"]) for m in self.hisp.messages}
        ids = {rid: self.packet(rid).provider_id for rid in rids}
        assert set(ids.values()) == sent
        return ids

    def branch(self, rid: int) -> tuple[Any, ...]:
        """The referral's specialist side: statuses, the packet's provider status, the
        MDN timer and the timeline."""
        ref = rstore.get_referral(self.db.conn, rid)
        assert ref is not None
        return (
            ref.status,
            ref.specialist_status,
            self.packet(rid).provider_status,
            MDN_TIMEOUT_KIND in [t.kind for t in rstore.timers_for(self.db.conn, rid)],
            [e.kind for e in rstore.timeline(self.db.conn, rid)],
        )

    def quarantined(self) -> list[tuple[str, str]]:
        assert self.engine.inbox is not None
        rows = self.engine.inbox.list(source="direct", newest_first=False)
        return [(r.status, r.error) for r in rows]

    async def poll(self) -> int:
        ((_name, poller),) = self.engine.direct_pollers
        return int(await poller.poll_once())

    async def smtp(self, mail: bytes) -> None:
        await aiosmtplib.send(
            mail,
            sender=SPECIALIST,
            recipients=[OUR_ADDRESS],
            hostname="127.0.0.1",
            port=self.engine.ports()["direct:direct"],
            start_tls=False,
            timeout=10,
        )


@asynccontextmanager
async def rig(tmp: Path, pki: Pki, fake: FakeImap) -> AsyncIterator[Rig]:
    """A running Engine whose own IMAP task has finished its first poll (at start)."""
    hisp, clock = Hisp(), VirtualClock(T0)
    tls = tls_server_context(pki.tmp, pki.anchor)
    async with smtp_server(hisp, tls_context=tls, require_starttls=True) as hisp_port:
        engine = Engine(
            engine_config(tmp, pki, hisp_port, fake.port),
            tmp / "state",
            clock=clock,
            registry=CollectorRegistry(),
            background=False,
            drain_seconds=5.0,
        )
        await engine.start()
        try:
            await fake.wait(lambda: fake.count("LOGOUT") >= 1)
            csv = tmp / "specialists.csv"
            csv.write_text(
                "npi,name,direct_address,fax,certificate\n"
                f"{NPI},Dr Ann Smith,{SPECIALIST},,{pki.specialist.cert_path}\n"
            )
            assert engine.db is not None
            import_csv(engine.db, csv, clock)
            yield Rig(engine, clock, hisp, fake)
        finally:
            await engine.stop()


CONFIRMED = ("specialist-confirmed", "confirmed", "dispatched", False)


@pytest.mark.store
def test_a_dispatched_mdn_from_the_mailbox_moves_the_referral_like_one_over_smtp(
    tmp_path: Path, pki: Pki
) -> None:
    async def main() -> None:
        async with FakeImap() as fake, rig(tmp_path, pki, fake) as r:
            a, b = r.referral("REF-A"), r.referral("REF-B")
            ids = await r.send_packets(a, b)
            assert r.branch(a) == r.branch(b)
            assert r.branch(b)[1:4] == ("packet-sent", "accepted", True)

            await r.smtp(mdn_mail(pki, ids[a], "dispatched", "<mdn-a@t>", signer=pki.specialist))
            uid = fake.add(mdn_mail(pki, ids[b], "dispatched", "<mdn-b@t>", signer=pki.specialist))
            at_store: dict[int, tuple[Any, ...]] = {}
            fake.on_store = lambda u: at_store.__setitem__(u, r.branch(b))
            mark = len(fake.commands)
            assert await r.poll() == 1

            assert r.branch(a)[:4] == CONFIRMED
            assert r.branch(b) == r.branch(a)  # the same effect as over SMTP
            assert at_store == {uid: r.branch(b)}  # already stored when it was flagged
            assert fake.seen == {uid}
            assert fake.since(mark) == [  # one connection: fetch, hand on, flag, in order
                "CAPABILITY",
                f"LOGIN {USER}",
                "SELECT INBOX",
                "UID SEARCH UNSEEN",
                f"UID FETCH {uid} (BODY.PEEK[])",
                f"UID STORE {uid} +FLAGS ({SEEN})",
                "LOGOUT",
            ]
            assert await r.poll() == 0  # nothing unseen: nothing happens twice
            assert r.branch(b) == r.branch(a)

    run(main())


@pytest.mark.store
def test_forged_and_unsigned_mdns_are_quarantined_and_flagged_seen(
    tmp_path: Path, pki: Pki
) -> None:
    async def main() -> None:
        async with FakeImap() as fake, rig(tmp_path, pki, fake) as r:
            b = r.referral("REF-B")
            ids = await r.send_packets(b)
            before = r.branch(b)
            forged = fake.add(mdn_mail(pki, ids[b], "dispatched", "<f@t>", signer=pki.forger))
            unsigned = fake.add(mdn_mail(pki, ids[b], "dispatched", "<u@t>", signer=None))
            at_store: dict[int, list[tuple[str, str]]] = {}
            fake.on_store = lambda u: at_store.__setitem__(u, r.quarantined())
            assert await r.poll() == 2

            untrusted = ("rejected", "quarantined: untrusted-signer")
            no_signature = ("rejected", "quarantined: unsigned")
            assert r.quarantined() == [untrusted, no_signature]
            assert at_store == {forged: [untrusted], unsigned: [untrusted, no_signature]}
            assert fake.seen == {forged, unsigned}  # stored outcomes, as SMTP answers 250
            assert r.branch(b) == before  # and no effect at all

    run(main())


@pytest.mark.store
def test_a_storage_failure_leaves_the_message_unseen_for_the_next_poll(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(result: DirectInbound) -> str:
        raise RuntimeError("database is locked")

    async def main() -> None:
        async with FakeImap() as fake, rig(tmp_path, pki, fake) as r:
            b = r.referral("REF-B")
            ids = await r.send_packets(b)
            before = r.branch(b)
            uid = fake.add(mdn_mail(pki, ids[b], "dispatched", "<mdn-b@t>", signer=pki.specialist))

            monkeypatch.setattr(r.engine.direct_flow, "handle", unavailable)
            mark = len(fake.commands)
            assert await r.poll() == 0
            assert fake.seen == set() and not any("STORE" in c for c in fake.since(mark))
            assert fake.since(mark)[-1] == "LOGOUT"
            assert r.branch(b) == before

            monkeypatch.undo()
            assert await r.poll() == 1  # read again, stored, flagged
            assert fake.seen == {uid}
            assert r.branch(b)[:4] == CONFIRMED

    run(main())


@pytest.mark.store
def test_the_engine_polls_at_start_and_stops_its_poller_cleanly(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        async with FakeImap() as fake:
            waiting = fake.add(mdn_mail(pki, "<nobody@t>", "processed", "<u@t>", signer=None))
            async with rig(tmp_path, pki, fake) as r:
                assert fake.seen == {waiting}  # the engine's own task read it at start
                assert r.quarantined() == [("rejected", "quarantined: unsigned")]
                ((_name, poller),) = r.engine.direct_pollers
                assert poller.settings.interval == 3600
                (task,) = r.engine.tasks.direct_imap
            assert task.done() and not task.cancelled() and task.exception() is None
            assert fake.count("LOGIN") == fake.count("LOGOUT") == 1

    run(main())


# ---------------------------------------------------------------------------
# The poller on its own


class Sink:
    """``on_result``: records each result in the server's command log (so the order of
    fetch, hand-on and flag shows), failing for the Message-IDs in ``fail``."""

    def __init__(self, fake: FakeImap, fail: set[str] | None = None) -> None:
        self.fake = fake
        self.fail = fail or set()
        self.results: list[DirectInbound] = []
        self.after: Callable[[], None] = lambda: None

    async def __call__(self, result: DirectInbound) -> None:
        message_id = getattr(result, "message_id", "")
        if message_id in self.fail:
            raise RuntimeError("store unavailable")
        self.results.append(result)
        self.fake.commands.append((0, f"stored {message_id}"))
        self.after()


def poller_for(pki: Pki, fake: FakeImap, sink: Sink) -> ImapPoller:
    handler = DirectHandler(
        addresses=[OUR_ADDRESS],
        identities=[pki.ours.identity],
        trust_anchors=[pki.anchor.cert],
        on_result=sink,
    )
    settings = ImapSettings(
        host="127.0.0.1", port=fake.port, username=USER, password=PASSWORD, use_tls=False
    )
    return ImapPoller(settings, handler)


def test_one_poll_is_one_connection_and_a_failed_message_stays_unseen(pki: Pki) -> None:
    async def main() -> None:
        async with FakeImap() as fake:
            for n in (1, 2, 3):
                fake.add(mdn_mail(pki, "<p@t>", "processed", f"<m{n}@t>", signer=pki.specialist))
            sink = Sink(fake, fail={"<m2@t>"})
            poller = poller_for(pki, fake, sink)
            assert await poller.poll_once() == 2
            assert fake.since(0) == [
                "CAPABILITY",
                f"LOGIN {USER}",
                "SELECT INBOX",
                "UID SEARCH UNSEEN",
                "UID FETCH 1 (BODY.PEEK[])",
                "stored <m1@t>",
                f"UID STORE 1 +FLAGS ({SEEN})",
                "UID FETCH 2 (BODY.PEEK[])",  # its callback failed: not flagged
                "UID FETCH 3 (BODY.PEEK[])",
                "stored <m3@t>",
                f"UID STORE 3 +FLAGS ({SEEN})",
                "LOGOUT",
            ]
            assert {conn for conn, _ in fake.commands if conn} == {1}
            assert fake.seen == {1, 3}
            sink.fail.clear()
            mark = len(fake.commands)
            assert await poller.poll_once() == 1  # the next poll reads it again
            assert "stored <m2@t>" in fake.since(mark) and fake.seen == {1, 2, 3}
            assert all(isinstance(x, MdnResult) for x in sink.results)

    run(main())


def test_run_survives_a_failed_poll_and_stop_ends_it_between_messages(pki: Pki) -> None:
    async def main() -> None:
        async with FakeImap() as fake:
            for n in (1, 2):
                fake.add(mdn_mail(pki, "<p@t>", "processed", f"<m{n}@t>", signer=pki.specialist))
            fake.refuse_logins = 1  # the first poll fails at LOGIN
            stop = asyncio.Event()
            sink = Sink(fake)
            sink.after = stop.set  # shutdown begins while the first message is handed on
            await asyncio.wait_for(poller_for(pki, fake, sink).run(0, stop), 20)
            assert fake.count("LOGIN") == 2 and fake.count("LOGOUT") == 2
            assert fake.seen == {1}  # flagged: it was stored; the second waits, unseen
            assert "UID FETCH 2 (BODY.PEEK[])" not in fake.since(0)

    run(main())


# ---------------------------------------------------------------------------
# The factory: TLS verification and configuration


def imap_spec(pki: Pki, **imap: Any) -> ChannelSpec:
    settings = {"address": OUR_ADDRESS, **file_refs(pki), "imap": imap}
    return ChannelSpec("direct", "direct", MappingProxyType({}), MappingProxyType(settings))


def test_tls_verifies_the_server_with_the_default_context_or_ca_file(pki: Pki) -> None:
    async def main() -> None:
        tls = tls_server_context(pki.tmp, pki.anchor)
        async with FakeImap(tls=tls) as fake:
            fake.add(mdn_mail(pki, "<p@t>", "processed", "<m1@t>", signer=pki.specialist))
            sink = Sink(fake)
            common = {"host": "127.0.0.1", "port": fake.port, "username": USER}
            env = {"IMAP_PASSWORD": PASSWORD}
            kw: dict[str, Any] = {"on_result": sink, "clock": WallClock(), "env": env}
            untrusted = build_direct_imap_poller(
                imap_spec(pki, **common, password="${env:IMAP_PASSWORD}"), **kw
            )
            assert untrusted is not None and untrusted.settings.ssl_context is not None
            assert untrusted.settings.ssl_context.verify_mode == ssl.CERT_REQUIRED
            assert untrusted.settings.ssl_context.check_hostname
            with pytest.raises(ssl.SSLCertVerificationError):  # our test CA is not a system CA
                await untrusted.poll_once()
            assert fake.commands == []

            ca = f"${{file:{pki.anchor.cert_path}}}"
            trusted = build_direct_imap_poller(
                imap_spec(pki, **common, password="${env:IMAP_PASSWORD}", ca_file=ca), **kw
            )
            assert trusted is not None
            assert await trusted.poll_once() == 1
            assert fake.seen == {1} and len(sink.results) == 1

    run(main())


@pytest.mark.parametrize(
    ("imap", "expected"),
    [
        (
            {"username": USER, "password": "${env:P}"},
            "channels.direct.imap.host: is required",
        ),
        (
            {"host": "imap.hisp.example", "username": USER, "password": "${env:P}", "tls": False},
            "channels.direct.imap.tls: may be false only for a loopback host",
        ),
        (
            {"host": "127.0.0.1", "username": USER, "password": "${env:P}", "port": 0},
            "channels.direct.imap.port: must be between 1 and 65535",
        ),
        (
            {"host": "h", "username": USER, "password": "${env:P}", "ca_file": "/etc/ca.pem"},
            "channels.direct.imap.ca_file: must be a ${file:/path} reference",
        ),
        (
            {"host": "h", "username": USER, "password": "${env:UNSET}"},
            "channels.direct.imap.password: environment variable UNSET is not set",
        ),
    ],
    ids=["no-host", "plaintext-remote", "port", "ca-file-not-a-reference", "unset-secret"],
)
def test_the_factory_names_the_imap_key(pki: Pki, imap: dict[str, Any], expected: str) -> None:
    spec = imap_spec(pki, **imap)
    with pytest.raises(ConfigError) as info:
        build_direct_imap_poller(
            spec, on_result=Sink(FakeImap()), clock=WallClock(), env={"P": "x"}
        )
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_the_factory_without_an_imap_block_builds_nothing(pki: Pki) -> None:
    spec = ChannelSpec(
        "direct", "direct", MappingProxyType({}), MappingProxyType({"address": OUR_ADDRESS})
    )
    assert build_direct_imap_poller(spec, on_result=Sink(FakeImap()), clock=WallClock()) is None


ROUTES_HEAD = """\
version: 1
channels:
  direct:
    type: direct
    address: refloop@direct.clinic.test
    hisp_host: smtp.hisp.example
    cert: ${file:/etc/refloop/direct/cert.pem}
    key: ${file:/etc/refloop/direct/key.pem}
    trust_anchors: ${file:/etc/refloop/direct/anchors.pem}
    imap:
"""  # the imap block's keys start on line 11
ROUTES_TAIL = "routes:\n  - {name: all, then: [{drop: tests}]}\n"


def _routes(imap: str, head: str = ROUTES_HEAD) -> str:
    return head + textwrap.indent(textwrap.dedent(imap), "      ") + ROUTES_TAIL


@pytest.mark.parametrize(
    ("imap", "expected"),
    [
        (
            "username: refloop\npassword: ${env:P}\n",
            "r.yaml:10 channels.direct.imap.host: is required",
        ),
        (
            "host: imap.hisp.example\nusername: refloop\npassword: ${env:P}\ntls: false\n",
            "r.yaml:14 channels.direct.imap.tls: may be false only for a loopback host",
        ),
        (
            "host: 127.0.0.1\nusername: refloop\npassword: hunter2\n",
            "r.yaml:13 channels.direct.imap.password: secrets never live in routes.yaml",
        ),
        (
            "host: imap.hisp.example\nusername: refloop\npassword: ${env:P}\nport: 99999\n",
            "r.yaml:14 channels.direct.imap.port: must be between 1 and 65535",
        ),
        (
            "host: imap.hisp.example\nusername: refloop\npassword: ${env:P}\ninterval: 0\n",
            "r.yaml:14 channels.direct.imap.interval: must be at least",
        ),
        (
            "host: imap.hisp.example\nusername: refloop\npassword: ${env:P}\nca_file: /ca.pem\n",
            "r.yaml:14 channels.direct.imap.ca_file: must be a ${file:/path} reference",
        ),
        (
            "host: imap.hisp.example\nusername: refloop\npassword: ${env:P}\nfolder: INBOX\n",
            "r.yaml:14 channels.direct.imap.folder: unknown key",
        ),
    ],
    ids=["no-host", "plaintext-remote", "literal-password", "port", "interval", "ca-file", "key"],
)
def test_routes_check_names_the_imap_key_and_line(imap: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_config(loads(_routes(imap), file="r.yaml", env={"P": "x"}))
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_imap_needs_trust_anchors() -> None:
    head = ROUTES_HEAD.replace("    trust_anchors: ${file:/etc/refloop/direct/anchors.pem}\n", "")
    imap = "host: imap.hisp.example\nusername: refloop\npassword: ${env:P}\n"
    with pytest.raises(ConfigError) as info:
        compile_config(loads(_routes(imap, head), file="r.yaml", env={"P": "x"}))
    assert any(
        "channels.direct.trust_anchors: is required to accept inbound Direct mail" in p
        for p in info.value.problems
    ), info.value.problems


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_a_valid_imap_block_compiles(host: str) -> None:
    imap = (
        f"host: '{host}'\nport: 1143\nusername: refloop\npassword: ${{env:P}}\n"
        "mailbox: Direct Inbox\ninterval: 30\ntls: false\n"
    )
    table = compile_config(loads(_routes(imap), file="r.yaml", env={"P": "x"}))
    assert table.channels["direct"].settings["imap"]["password"] == "${env:P}"  # not resolved
