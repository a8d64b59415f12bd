"""S/MIME for Direct: sign then encrypt outbound entities; decrypt then verify inbound ones.

Direct Applicability Statement for Secure Health Transport (v1.3) §2-§4 and RFC 8551:
signatures are detached ``multipart/signed`` (RFC 1847) with SHA-256, the signed entity is
enveloped as ``application/pkcs7-mime; smime-type=enveloped-data`` with AES-256-CBC (the
Direct floor is SHA-256 with AES-128/256-CBC; AES-256-CBC is the value every HISP and
``openssl cms`` accept), keys are RSA.

Library split: ``cryptography`` (already a dependency) builds the CMS ``SignedData`` and
``EnvelopedData`` and decrypts (``pkcs7_decrypt_der``). It has no CMS signature verifier, so
:func:`verify` walks ``SignedData`` with :mod:`channels.direct.der` and checks the signature with
``cryptography`` primitives, then validates the signer's chain with
``cryptography.x509.verification`` (RFC 5280 path building) against the configured trust
anchors, then applies the Direct rule that the signer certificate is bound to the sender's
address (``subjectAltName`` rfc822Name) or domain (dNSName).

Every entity in and out of this module is a MIME entity in canonical form (CRLF line ends,
RFC 8551 §3.1.1). Failures raise :class:`SmimeError` whose ``reason`` is a short code;
nothing here logs or quotes message content.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.message
import email.parser
import email.policy
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from email import errors
from email.headerregistry import AddressHeader, HeaderRegistry
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import verification

from channels.direct import der
from engine.errors import EngineError

SmimeFailure = Literal[
    "malformed",  # not parseable as the S/MIME structure it claims to be
    "not-encrypted",  # Direct requires encryption; plain or signed-only mail is refused
    "not-for-us",  # encrypted, but to none of our certificates
    "unsigned",  # decrypted content carries no signature
    "bad-signature",  # the signature does not match the content
    "weak-algorithm",  # digest or signature algorithm below the Direct floor
    "untrusted-signer",  # signer chain does not reach a configured trust anchor
    "signer-mismatch",  # signer certificate not bound to the sender's address or domain
]

# RFC 5652 / RFC 8551 object identifiers.
OID_DATA: Final = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA: Final = "1.2.840.113549.1.7.2"
OID_CONTENT_TYPE: Final = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST: Final = "1.2.840.113549.1.9.4"
# Direct AS v1.3 §5: SHA-1 is not allowed; SHA-256 is the floor.
DIGESTS: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
}
RSA_PKCS1: Final = frozenset(
    {
        "1.2.840.113549.1.1.1",  # rsaEncryption (hash given by digestAlgorithm)
        "1.2.840.113549.1.1.11",  # sha256WithRSAEncryption
        "1.2.840.113549.1.1.12",  # sha384WithRSAEncryption
        "1.2.840.113549.1.1.13",  # sha512WithRSAEncryption
    }
)
RSA_PSS: Final = "1.2.840.113549.1.1.10"
ECDSA: Final = frozenset(
    {
        "1.2.840.10045.2.1",  # id-ecPublicKey
        "1.2.840.10045.4.3.2",
        "1.2.840.10045.4.3.3",
        "1.2.840.10045.4.3.4",
    }
)
PKCS7_TYPES: Final = ("application/pkcs7-mime", "application/x-pkcs7-mime")
SIGNATURE_TYPES: Final = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_B64_LINE: Final = 76  # RFC 2045 §6.8


class SmimeError(EngineError):
    """An S/MIME operation failed; ``reason`` says which check (no message content)."""

    def __init__(self, reason: SmimeFailure, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: SmimeFailure = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """One of our Direct certificates with its private key (the HISP-issued address- or
    domain-bound certificate). ``chain`` holds intermediates sent along with signatures."""

    certificate: x509.Certificate
    key: rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, password: bytes | None = None) -> Identity:
        """Load from PEM (as ``${file:}`` references deliver). ``cert_pem`` may hold the
        end-entity certificate followed by its intermediates. Raises ``ValueError``."""
        certs = x509.load_pem_x509_certificates(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("Direct certificates use RSA keys")
        return cls(certificate=certs[0], key=key, chain=tuple(certs[1:]))


@dataclass(frozen=True, slots=True)
class Verified:
    """A signature that checked out: the signed entity (canonical bytes) and its signer."""

    content: bytes
    signer: x509.Certificate


# ---------------------------------------------------------------------------
# Outbound


def canonicalize(entity: bytes) -> bytes:
    """CRLF line ends everywhere (RFC 8551 §3.1.1); idempotent."""
    return entity.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _b64_body(data: bytes) -> bytes:
    text = base64.b64encode(data)
    return b"".join(text[i : i + _B64_LINE] + b"\r\n" for i in range(0, len(text), _B64_LINE))


def sign(entity: bytes, signer: Identity) -> bytes:
    """A ``multipart/signed`` entity carrying ``entity`` and a detached SHA-256 CMS
    signature (signed attributes included; our chain included for the receiver)."""
    content = canonicalize(entity)
    builder = pkcs7.PKCS7SignatureBuilder().set_data(content)
    builder = builder.add_signer(signer.certificate, signer.key, hashes.SHA256())
    for cert in signer.chain:
        builder = builder.add_certificate(cert)
    signature = builder.sign(
        serialization.Encoding.DER,
        [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
    )
    boundary = b"----=_refloop_signed_" + secrets.token_hex(16).encode()
    return b"".join(
        [
            b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";'
            b' micalg=sha-256; boundary="' + boundary + b'"\r\n',
            b"\r\n",
            b"This is an S/MIME signed message\r\n",
            b"--" + boundary + b"\r\n",
            content,
            b"\r\n--" + boundary + b"\r\n",
            b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n",
            b"Content-Transfer-Encoding: base64\r\n",
            b"Content-Disposition: attachment; filename=smime.p7s\r\n",
            b"\r\n",
            _b64_body(signature),
            b"--" + boundary + b"--\r\n",
        ]
    )


def encrypt(entity: bytes, recipients: Sequence[x509.Certificate]) -> bytes:
    """An ``application/pkcs7-mime`` enveloped-data entity (AES-256-CBC, RSA key
    transport) that only ``recipients`` can open."""
    if not recipients:
        raise ValueError("at least one recipient certificate is needed")
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(canonicalize(entity))
    builder = builder.set_content_encryption_algorithm(algorithms.AES256)
    for cert in recipients:
        builder = builder.add_recipient(cert)
    enveloped = builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    return (
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=smime.p7m\r\n"
        b"\r\n" + _b64_body(enveloped)
    )


def protect(entity: bytes, signer: Identity, recipients: Sequence[x509.Certificate]) -> bytes:
    """Sign, then encrypt (Direct AS §3: signed and encrypted, in that order)."""
    return encrypt(sign(entity, signer), recipients)


# ---------------------------------------------------------------------------
# Inbound


def _headers(entity: bytes) -> email.message.Message:
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(entity)


def _param(head: email.message.Message, name: str) -> str:
    value = head.get_param(name, header="content-type")
    return value.lower() if isinstance(value, str) else ""


def _body(entity: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = entity.find(sep)
        if i >= 0:
            return entity[i + len(sep) :]
    return b""


def decrypt(entity: bytes, identities: Sequence[Identity]) -> bytes:
    """Open an enveloped-data entity with whichever of our keys it was encrypted to;
    return the inner entity in canonical form."""
    head = _headers(entity)
    smime_type = _param(head, "smime-type")
    if head.get_content_type() not in PKCS7_TYPES or smime_type not in ("", "enveloped-data"):
        raise SmimeError("not-encrypted")
    try:
        blob = base64.b64decode(_body(entity), validate=False)
    except ValueError as exc:
        raise SmimeError("malformed", "base64") from exc
    for ident in identities:
        try:
            inner = pkcs7.pkcs7_decrypt_der(blob, ident.certificate, ident.key, [])
        except ValueError:
            continue
        return canonicalize(inner)
    raise SmimeError("not-for-us")


def _split_signed(entity: bytes) -> tuple[bytes, bytes]:
    """(signed part bytes, signature DER) of a ``multipart/signed`` entity (RFC 1847 §2.1).
    The signed part is taken byte-exact between the delimiters, never re-serialised."""
    head = _headers(entity)
    boundary = head.get_param("boundary", header="content-type")
    if not isinstance(boundary, str) or not boundary:
        raise SmimeError("malformed", "no boundary")
    marker = b"\r\n--" + boundary.encode("ascii", "replace")
    pieces = (b"\r\n" + _body(entity)).split(marker)
    parts: list[bytes] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        nl = piece.find(b"\r\n")
        if nl < 0 or piece[:nl].strip(b" \t"):
            raise SmimeError("malformed", "bad delimiter line")
        parts.append(piece[nl + 2 :])
    if len(parts) != 2:
        raise SmimeError("malformed", "multipart/signed needs two parts")
    sig_head = _headers(parts[1])
    if sig_head.get_content_type() not in SIGNATURE_TYPES:
        raise SmimeError("malformed", "second part is not a signature")
    try:
        signature = base64.b64decode(_body(parts[1]))
    except ValueError as exc:
        raise SmimeError("malformed", "signature base64") from exc
    return parts[0], signature


def verify(
    entity: bytes,
    *,
    trust_anchors: Sequence[x509.Certificate],
    sender: str,
    now: dt.datetime,
) -> Verified:
    """Check a signed entity (``multipart/signed`` or opaque ``signed-data``): the
    signature over the content, the signer's chain to one of ``trust_anchors`` at ``now``,
    and that the signer certificate is bound to ``sender`` (address or its domain)."""
    entity = canonicalize(entity)
    head = _headers(entity)
    ctype = head.get_content_type()
    detached: bytes | None
    if ctype == "multipart/signed":
        detached, blob = _split_signed(entity)
    elif ctype in PKCS7_TYPES and (_param(head, "smime-type") == "signed-data"):
        detached = None
        try:
            blob = base64.b64decode(_body(entity))
        except ValueError as exc:
            raise SmimeError("malformed", "base64") from exc
    else:
        raise SmimeError("unsigned")
    try:
        signer, intermediates, content = _check_signed_data(blob, detached)
    except der.DerError as exc:
        raise SmimeError("malformed", "CMS structure") from exc
    _check_chain(signer, intermediates, trust_anchors, now)
    if not bound_to(signer, sender):
        raise SmimeError("signer-mismatch")
    return Verified(content=canonicalize(content), signer=signer)


def unprotect(
    entity: bytes,
    *,
    identities: Sequence[Identity],
    trust_anchors: Sequence[x509.Certificate],
    sender: str,
    now: dt.datetime,
) -> Verified:
    """Decrypt, then verify: the inbound half of :func:`protect`."""
    inner = decrypt(entity, identities)
    return verify(inner, trust_anchors=trust_anchors, sender=sender, now=now)


def bound_to(cert: x509.Certificate, address: str) -> bool:
    """Direct AS v1.3 §4 and the DirectTrust certificate profile: an address-bound
    certificate names the address as a subjectAltName rfc822Name, an org-bound one the
    address's domain as a subjectAltName dNSName (both compared case-insensitively). An
    emailAddress in the subject DN binds nothing: the profile requires subjectAltName,
    and without it any address would be as good as another."""
    addr = address.strip().lower()
    local, at, domain = addr.rpartition("@")
    if not (local and at and domain):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    emails = [e.strip().lower() for e in san.get_values_for_type(x509.RFC822Name)]
    names = [d.strip().lower().rstrip(".") for d in san.get_values_for_type(x509.DNSName)]
    return addr in emails or domain in names


# ---------------------------------------------------------------------------
# CMS SignedData (RFC 5652 §5)


def _check_signed_data(
    blob: bytes, detached: bytes | None
) -> tuple[x509.Certificate, list[x509.Certificate], bytes]:
    content_info = der.parse(blob).children()
    if len(content_info) < 2 or content_info[0].oid() != OID_SIGNED_DATA:
        raise SmimeError("malformed", "not SignedData")
    signed_data = content_info[1].children()[0].children()
    encap = signed_data[2].children()
    econtent_type = encap[0].oid()
    if detached is not None:
        content = detached
    elif len(encap) > 1:
        content = encap[1].children()[0].octets()
    else:
        raise SmimeError("malformed", "no content")
    certs: list[x509.Certificate] = []
    for item in signed_data[3:-1]:
        if item.tag == 0xA0:  # [0] IMPLICIT CertificateSet
            for c in item.children():
                if c.tag == der.SEQUENCE:
                    try:
                        certs.append(x509.load_der_x509_certificate(c.raw))
                    except ValueError as exc:
                        raise SmimeError("malformed", "certificate") from exc
    signer_infos = signed_data[-1]
    if signer_infos.tag != der.SET or not signer_infos.children():
        raise SmimeError("unsigned")
    failure: SmimeError | None = None
    for info in signer_infos.children():
        try:
            signer = _check_signer(info, certs, content, econtent_type)
        except SmimeError as exc:
            failure = exc
            continue
        return signer, [c for c in certs if c != signer], content
    assert failure is not None
    raise failure


def _check_signer(
    info: der.Tlv, certs: list[x509.Certificate], content: bytes, econtent_type: str
) -> x509.Certificate:
    fields = info.children()
    sid = fields[1]
    digest_cls = DIGESTS.get(fields[2].children()[0].oid())
    if digest_cls is None:
        raise SmimeError("weak-algorithm", "digest")
    i = 3
    attrs: der.Tlv | None = None
    if fields[i].tag == 0xA0:
        attrs = fields[i]
        i += 1
    sig_alg = fields[i].children()[0].oid()
    signature = fields[i + 1].octets()
    digest = hashes.Hash(digest_cls())
    digest.update(content)
    content_digest = digest.finalize()
    if attrs is None:
        signed = content
    else:
        if attrs.indefinite:
            raise SmimeError("malformed", "signed attributes are not DER")
        seen_digest = False
        for attr in attrs.children():
            parts = attr.children()
            oid, values = parts[0].oid(), parts[1].children()
            if oid == OID_CONTENT_TYPE and values[0].oid() != econtent_type:
                raise SmimeError("bad-signature", "content type attribute")
            if oid == OID_MESSAGE_DIGEST:
                if not hmac.compare_digest(values[0].octets(), content_digest):
                    raise SmimeError("bad-signature", "message digest")
                seen_digest = True
        if not seen_digest:
            raise SmimeError("malformed", "no message digest attribute")
        # RFC 5652 §5.4: the signature covers the DER of the attributes as a SET OF.
        signed = bytes([der.SET]) + attrs.raw[1:]
    candidates = _signer_candidates(sid, certs)
    if not candidates:
        raise SmimeError("untrusted-signer", "signer certificate not included")
    for cert in candidates:
        if _signature_ok(cert, sig_alg, signature, signed, digest_cls()):
            return cert
    raise SmimeError("bad-signature")


def _signer_candidates(sid: der.Tlv, certs: list[x509.Certificate]) -> list[x509.Certificate]:
    if sid.tag == der.SEQUENCE:  # IssuerAndSerialNumber
        name_raw, serial = sid.children()[0].raw, sid.children()[1].integer()
        exact = [
            c for c in certs if c.serial_number == serial and c.issuer.public_bytes() == name_raw
        ]
        return exact or [c for c in certs if c.serial_number == serial]
    if sid.tag == 0x80:  # [0] SubjectKeyIdentifier
        out = []
        for c in certs:
            try:
                ski = c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            except x509.ExtensionNotFound:
                continue
            if ski.digest == sid.content:
                out.append(c)
        return out
    raise SmimeError("malformed", "signer identifier")


def _signature_ok(
    cert: x509.Certificate,
    sig_alg: str,
    signature: bytes,
    data: bytes,
    hash_alg: hashes.HashAlgorithm,
) -> bool:
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey) and sig_alg in RSA_PKCS1:
            key.verify(signature, data, padding.PKCS1v15(), hash_alg)
        elif isinstance(key, rsa.RSAPublicKey) and sig_alg == RSA_PSS:
            pss = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=padding.PSS.AUTO)
            key.verify(signature, data, pss, hash_alg)
        elif isinstance(key, ec.EllipticCurvePublicKey) and sig_alg in ECDSA:
            key.verify(signature, data, ec.ECDSA(hash_alg))
        else:
            raise SmimeError("weak-algorithm", "signature algorithm")
    except InvalidSignature:
        return False
    return True


def _check_chain(
    signer: x509.Certificate,
    intermediates: list[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    now: dt.datetime,
) -> None:
    if not anchors:
        raise SmimeError("untrusted-signer", "no trust anchors configured")
    # CA certificates get the RFC 5280 / Web PKI profile checks; end-entity Direct
    # certificates vary by HISP (EKU emailProtection or none), so only the path,
    # signatures, validity and basic constraints are enforced for them.
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(anchors)))
        .time(now)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(signer, intermediates)
    except verification.VerificationError as exc:
        raise SmimeError("untrusted-signer", "chain") from exc


_HEADERS: Final = HeaderRegistry()


def bare_address(value: str) -> str:
    """The one mailbox of a From header (RFC 5322 §3.6.2 and §3.4), lower-cased:
    ``"Dr X" <x@direct.example>`` → ``x@direct.example``. "" when the header names no
    mailbox, more than one (Direct mail has one author, Direct AS §3), or does not parse
    cleanly: an address inside a display name or comment is never taken for the mailbox."""
    try:
        header = _HEADERS("from", value or "")
    except (ValueError, IndexError, TypeError):  # the parser's failures on hostile input
        return ""
    if not isinstance(header, AddressHeader) or any(
        isinstance(d, errors.InvalidHeaderDefect) for d in header.defects
    ):
        return ""
    boxes = header.addresses
    if len(boxes) != 1 or not boxes[0].username or not boxes[0].domain:
        return ""
    return boxes[0].addr_spec.lower()
