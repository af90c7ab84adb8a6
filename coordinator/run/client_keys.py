"""The clients' signing keys the coordinator holds, and decoding a client's message with them.

A key is known before any hello when the broker's credentials registry issued it; otherwise it
is pinned at the client's first accepted hello (which must be signed by the key it brings, so
nobody gets a key pinned for a client that cannot sign with it) and kept in the run directory
(:data:`CLIENT_KEYS_FILE`), so a resumed run keeps it. Once a client's key is known, everything
in its name must be signed by it: a stranger can no longer say hello (and evict it), go offline
or ask for chunks as that client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator.run.checkpoint import atomic_write_bytes
from shared import codec, topics
from shared.errors import ConfigError, FieldTypeError, RunStateError
from shared.protocol import Hello
from shared.signing import VerifyKey, key_from_text
from shared.topics import TopicKind

log = logging.getLogger(__name__)

CLIENT_KEYS_FILE = "client_keys.json"
"""Client id -> the public key pinned at its first accepted hello (kept with the run, so a resumed run keeps them)."""


class ClientKeys:
    """The public keys of a run's clients: from the registry, and pinned at first hello.

    Args:
        run_dir: The run directory (holds :data:`CLIENT_KEYS_FILE`).
        registry: Client id -> ``ed25519:`` key text the credentials registry issued (these win).

    Raises:
        RunStateError: The pinned-keys file is not valid JSON.
    """

    def __init__(self, run_dir: Path, registry: Mapping[str, str]) -> None:
        self.path = Path(run_dir) / CLIENT_KEYS_FILE
        try:
            self._pinned_at_hello: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except ValueError as exc:
            raise RunStateError(f"{self.path} is not the JSON of pinned client keys: {exc}") from None
        self.keys: dict[str, VerifyKey] = {
            cid: key_from_text(text, owner=f"client {cid}") for cid, text in {**self._pinned_at_hello, **registry}.items()
        }
        """Client id -> its key."""

    def decode(self, message: Any, *, run: str) -> tuple[topics.TopicInfo, Any]:
        """Decode a client's message; once its key is known it must be signed by it.

        Args:
            message: The inbound message (topic and payload).
            run: The run this coordinator serves.

        Raises:
            SignatureError: Unsigned or badly signed where a key is known or brought.
            ProtocolError: Any other decoding or topic failure.
        """
        client = topics.client_of(message.topic)
        key = self.keys.get(client) if client is not None else None
        info, envelope = codec.decode_message(message.topic, message.payload, run=run, verify_key=key)
        if key is None and info.kind is TopicKind.HELLO and envelope.body.public_key:
            try:
                brought = key_from_text(envelope.body.public_key, owner=f"client {info.client}")
            except ConfigError as exc:
                raise FieldTypeError(f"hello message: public_key: {exc}") from None
            brought.verify(message.payload)
        return info, envelope

    def pin(self, hello: Hello, accepted: bool) -> None:
        """Pin the key a client's first accepted hello brings (persisted before the answer goes out)."""
        if not accepted or not hello.public_key or hello.client_id in self.keys:
            return
        self.keys[hello.client_id] = key_from_text(hello.public_key, owner=f"client {hello.client_id}")
        self._pinned_at_hello[hello.client_id] = hello.public_key
        # A crash leaves the old pins or the new ones, never half a file.
        atomic_write_bytes(self.path, json.dumps(self._pinned_at_hello, indent=2, sort_keys=True).encode())
        log.info("pinned the signing key of %s: %s", hello.client_id, hello.public_key)
