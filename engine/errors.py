"""One exception root; each leaf maps to one outward behaviour.

| exception          | what the caller does                                   |
|--------------------|--------------------------------------------------------|
| FramingError       | close that connection only                             |
| MessageRejected    | NAK (MSA AR/AE) with an ERR segment; the daemon goes on |
| ConfigError        | CLI exits 2 naming file:line and the key path          |
| ChannelError       | retry (retryable) or dead-letter                       |
| StoreError         | the operation fails; nothing half-written              |

Messages carried by these exceptions never contain PHI: they name segments, fields,
codes and ids, never field values from a patient's message.
"""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error refloop raises on purpose."""


class FramingError(EngineError):
    """The byte stream violates MLLP framing; the connection is closed."""


class MessageRejected(EngineError):
    """A message cannot be accepted; answered with a NAK carrying an ERR segment.

    ``code`` is an HL7 table 0357 error code, ``location`` an ERR-2 style location
    (``"MSH^1^9"``), ``ack`` the original-mode acknowledgment code (AR or AE).
    """

    def __init__(self, reason: str, *, code: str = "207", location: str = "", ack: str = "AE"):
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.location = location
        self.ack = ack


class ConfigError(EngineError):
    """routes.yaml (or another config input) is invalid.

    ``problems`` lists every error found, each already formatted as
    ``file:line key.path: message``.
    """

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ChannelError(EngineError):
    """An outbound send failed; ``retryable`` says whether to try again."""

    def __init__(self, reason: str, *, retryable: bool = True, retry_after: float | None = None):
        super().__init__(reason)
        self.retryable = retryable
        self.retry_after = retry_after


class StoreError(EngineError):
    """The store refused or failed an operation."""
