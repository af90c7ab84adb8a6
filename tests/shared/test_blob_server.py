"""The blob server over a real broker: bad chunk requests do not stop it serving."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from shared import codec, topics
from shared.broker import BrokerHandle
from shared.manifests import build_manifest
from shared.protocol import ChunkRequest, MessageType
from tests.shared.helpers import fetcher_for, folder_tree, serving, write_folder


def test_server_keeps_serving_after_bad_requests(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    src = write_folder(tmp_path / "src", {"x.bin": os.urandom(10_000)})
    m = build_manifest(src, "pkg", 1, "t", chunk_size=4096)
    with serving(any_broker, run) as server:
        server.add(m, src)
        transport, fetcher = fetcher_for(any_broker, run, client, tmp_path / "cache")
        try:
            transport.publish(topics.chunkreq(run, client), b"\x93garbage")
            transport.publish(
                topics.chunkreq(run, client),
                codec.encode(
                    MessageType.CHUNK_REQUEST, ChunkRequest(m.blob_id, ["0" * 64]), run=run, round=-1, sender="impostor"
                ),
            )
            assert folder_tree(fetcher.fetch(m, timeout=60)) == {"x.bin": (src / "x.bin").read_bytes()}
            assert server.refused == Counter({"MalformedMessageError": 1, "TopicError": 1})
        finally:
            transport.close()
