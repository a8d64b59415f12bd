"""Direct test PKI made at run time: a trust anchor, address-bound end-entity certificates
for us, the specialist and a test HISP, and an untrusted CA for forgeries; plus a TLS
certificate for the loopback SMTP servers and a little aiosmtpd runner on port 0.

The certificates follow the Direct certificate profile closely enough for both our verifier
and ``openssl cms -verify -purpose smimesign``: RSA-2048, SHA-256, subjectAltName
rfc822Name, keyUsage digitalSignature+keyEncipherment, EKU emailProtection.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from channels.direct.smime import Identity

NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "refloop tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey
    cert_path: Path
    key_path: Path

    @property
    def identity(self) -> Identity:
        return Identity(certificate=self.cert, key=self.key)


def _write(tmp: Path, stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> Issued:
    cp, kp = tmp / f"{stem}.pem", tmp / f"{stem}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert, key, cp, kp)


def make_ca(tmp: Path, stem: str) -> Issued:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = _name(f"{stem} CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _write(tmp, stem, cert, key)


def issue(
    tmp: Path,
    ca: Issued,
    stem: str,
    address: str,
    *,
    san: list[x509.GeneralName] | None = None,
    subject: x509.Name | None = None,
) -> Issued:
    """An end-entity Direct certificate; ``san`` defaults to rfc822Name ``address`` (an
    address-bound certificate); ``[]`` leaves the subjectAltName extension out."""
    names = [x509.RFC822Name(address)] if san is None else san
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or _name(address))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(tmp, stem, builder.sign(ca.key, hashes.SHA256()), key)


def tls_server_context(tmp: Path, ca: Issued) -> ssl.SSLContext:
    """A server TLS context for 127.0.0.1 signed by ``ca``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    issued = _write(tmp, "smtp-tls", cert, key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(issued.cert_path, issued.key_path)
    return ctx


def tls_client_context(ca: Issued) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert_path))


@dataclass
class Pki:
    anchor: Issued  # the Direct trust anchor both sides share
    rogue: Issued  # a CA nobody trusts
    ours: Issued  # refloop@direct.clinic.test
    specialist: Issued  # dr@direct.specialist.test
    forger: Issued  # dr@direct.specialist.test, issued by the rogue CA
    tmp: Path


OUR_ADDRESS = "refloop@direct.clinic.test"
SPECIALIST = "dr@direct.specialist.test"


def make_direct_pki(tmp: Path) -> Pki:
    anchor = make_ca(tmp, "anchor")
    rogue = make_ca(tmp, "rogue")
    return Pki(
        anchor=anchor,
        rogue=rogue,
        ours=issue(tmp, anchor, "ours", OUR_ADDRESS),
        specialist=issue(tmp, anchor, "specialist", SPECIALIST),
        forger=issue(tmp, rogue, "forger", SPECIALIST),
        tmp=tmp,
    )


@asynccontextmanager
async def smtp_server(handler: Any, **smtp_kwargs: Any) -> AsyncIterator[int]:
    """An aiosmtpd server on 127.0.0.1 port 0 in the running loop; yields the port.
    (aiosmtpd's Controller needs a fixed port and its own thread, so it is not used.)"""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="hisp.test", **smtp_kwargs), "127.0.0.1", 0
    )
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()
