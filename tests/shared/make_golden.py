"""Write the golden samples that do not exist yet; the files are committed and must keep decoding.

Run from the repository root: ``.venv/bin/python -m tests.shared.make_golden``. It never
rewrites a file: each was written by the protocol version of its day (``<type>.msgpack`` by
1.0, ``<type>-1.1.msgpack`` by 1.1, ``signed-<type>-1.3.msgpack`` by 1.3, signed with the
key of ``GOLDEN_SIGNING_SEED``), and one that stops decoding means a change broke
compatibility with peers of the same major version; fix the change, not the file.
"""

from __future__ import annotations

from pathlib import Path

from shared import codec
from shared.signing import SigningKey
from tests.shared.samples import (
    GOLDEN_MESSAGE_ID,
    GOLDEN_ROUND,
    GOLDEN_SIGNING_SEED,
    GOLDEN_TIMESTAMP,
    RUN,
    SENDER,
    newer_samples,
    samples,
    signed_samples,
)

GOLDEN_DIR = Path(__file__).parent / "golden"


def main() -> None:
    """Encode every sample that has no golden file yet, with a fixed header (signed where its stem says), and write it."""
    GOLDEN_DIR.mkdir(exist_ok=True)
    wanted = {msg_type.value: (msg_type, body) for msg_type, body in samples().items()} | newer_samples() | signed_samples()
    signer = SigningKey.from_seed(GOLDEN_SIGNING_SEED)
    for stem, (msg_type, body) in wanted.items():
        target = GOLDEN_DIR / f"{stem}.msgpack"
        if target.exists():
            continue
        data = codec.encode(
            msg_type,
            body,
            run=RUN,
            round=GOLDEN_ROUND,
            sender=SENDER,
            message_id=GOLDEN_MESSAGE_ID,
            timestamp=GOLDEN_TIMESTAMP,
            signer=signer if stem.startswith("signed-") else None,
        )
        target.write_bytes(data)
        print(f"wrote {target} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
