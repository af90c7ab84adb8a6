"""One error tree for the whole project.

Every error the system raises on purpose is a :class:`FedSodaError`. Each class carries an
``exit_code`` so the CLIs can turn any of them into a distinct process exit status, and each
message says what was wrong in words a user can act on.
"""

from __future__ import annotations


class FedSodaError(Exception):
    """Root of every deliberate fedsoda error.

    Attributes:
        exit_code: Process exit status the CLI uses for this error.
    """

    exit_code: int = 1


class ConfigError(FedSodaError):
    """A configuration file, environment variable or flag is invalid."""

    exit_code = 2


class ProtocolError(FedSodaError):
    """A message could not be decoded or failed validation."""

    exit_code = 3


class VersionError(ProtocolError):
    """A message uses a protocol major version this build does not speak."""


class PayloadTooLargeError(ProtocolError):
    """A payload exceeds the configured size cap (checked before unpacking)."""


class MalformedMessageError(ProtocolError):
    """Bytes that are not a valid msgpack envelope (truncated, garbage, too deep)."""


class UnknownMessageTypeError(ProtocolError):
    """The envelope names a message type this build does not know."""


class MissingFieldError(ProtocolError):
    """A required field is absent from an envelope or body."""


class FieldTypeError(ProtocolError):
    """A field has the wrong type or an out-of-range value."""


class TensorError(ProtocolError):
    """An encoded tensor is invalid: unknown dtype, bad shape, or byte count mismatch."""


class SignatureError(ProtocolError):
    """A message is unsigned where its sender's key is pinned, or its signature does not verify against that key."""


class TopicError(ProtocolError):
    """A topic is not fedsoda's, names another run or protocol major, or disagrees with its envelope."""


class BlobError(FedSodaError):
    """A blob transfer failed: bad chunk hash, unsafe path, incomplete manifest."""

    exit_code = 4


class ChunkHashMismatchError(BlobError):
    """A received chunk's sha256 does not match its manifest entry."""


class UnsafePathError(BlobError):
    """A manifest names a file outside the cache folder."""


class BrokerError(FedSodaError):
    """The MQTT broker cannot be reached, refused us, or rejected a publish."""

    exit_code = 5


class OutgoingQueueFullError(BrokerError):
    """A publish found the outgoing queue full (unacknowledged bytes at their bound) and it stayed full."""


class ModelError(FedSodaError):
    """A model cannot be loaded, pruned or packaged (e.g. no decoder layer list found)."""

    exit_code = 6


class InsufficientMemoryError(FedSodaError):
    """The device does not have enough memory for the requested work."""

    exit_code = 7


class UpdateRejectedError(FedSodaError):
    """A client update failed validation (shape, dtype, NaN/Inf, norm, round, sender)."""

    exit_code = 8


class DataError(FedSodaError):
    """A local dataset file is missing or malformed."""

    exit_code = 9


class RunStateError(FedSodaError):
    """A run directory or checkpoint is missing, corrupt, or belongs to another run."""

    exit_code = 10
