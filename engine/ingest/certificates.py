"""When the certificates the daemon serves with expire: the MLLP listeners' TLS
certificates and the Direct channels' S/MIME certificates, as loaded at start (a renewed
file takes effect on restart, so the running daemon's own copy is what counts). Exported
as ``refloop_certificate_expiry_timestamp_seconds`` (docs/metrics.md, docs/alerts.yml)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509

from engine.config import MllpSource

log = logging.getLogger(__name__)


def not_after(pem: bytes) -> float:
    """The first certificate's notAfter in ``pem``, Unix time. Raises ValueError."""
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def certificate_expiries(
    sources: Iterable[MllpSource], channels: Mapping[str, Any]
) -> dict[str, float]:
    """``mllp:<source>`` for each TLS listener and ``direct:<channel>`` for each channel
    with an S/MIME identity (``channel.identity.certificate``), each its notAfter. A
    certificate that cannot be read is left out with a warning (the listener's own start
    reports the problem)."""
    out: dict[str, float] = {}
    for source in sources:
        if source.tls is None:
            continue
        try:
            out[f"mllp:{source.name}"] = not_after(Path(source.tls.cert_file).read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot read the TLS certificate's expiry (%s)", source.name,
                        type(exc).__name__)  # fmt: skip
    for name, channel in channels.items():
        identity = getattr(channel, "identity", None)
        cert = getattr(identity, "certificate", None)
        if isinstance(cert, x509.Certificate):
            out[f"direct:{name}"] = cert.not_valid_after_utc.timestamp()
    return out
