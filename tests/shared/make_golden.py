"""Write tests/shared/golden/<type>.msgpack once; the files are committed and must keep decoding.

Run from the repository root: ``.venv/bin/python -m tests.shared.make_golden``. Do not
re-run it to "fix" a failing golden test: a golden file that stops decoding means the
change broke compatibility with peers of the same major version.
"""

from __future__ import annotations

from pathlib import Path

from shared import codec
from tests.shared.samples import (
    GOLDEN_MESSAGE_ID,
    GOLDEN_ROUND,
    GOLDEN_TIMESTAMP,
    RUN,
    SENDER,
    samples,
)

GOLDEN_DIR = Path(__file__).parent / "golden"


def main() -> None:
    """Encode every sample with a fixed header and write it."""
    GOLDEN_DIR.mkdir(exist_ok=True)
    for msg_type, body in samples().items():
        data = codec.encode(
            msg_type,
            body,
            run=RUN,
            round=GOLDEN_ROUND,
            sender=SENDER,
            message_id=GOLDEN_MESSAGE_ID,
            timestamp=GOLDEN_TIMESTAMP,
        )
        target = GOLDEN_DIR / f"{msg_type.value}.msgpack"
        target.write_bytes(data)
        print(f"wrote {target} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
