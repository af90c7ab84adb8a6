"""How fast do blobs and messages move, compared with what the machine can do?

One run measures, on loopback:

- raw TCP: a sender process pushes the blob's bytes through a plain socket (the ceiling);
- blob fetch through mosquitto and through the embedded broker: a coordinator process runs
  a :class:`~shared.blob_server.BlobServer`, this process runs a :class:`~shared.blob_fetcher.BlobFetcher`
  into an empty cache (request windows, sha256 checks, the on-disk chunk store and the
  atomic materialization included), each as a ratio to raw TCP;
- the message path alone through each broker: a publisher process sends encoded 4 MiB
  chunk envelopes, this process receives and decodes them (no hashing, no disk);
- sha256 speed (the receiver must hash every byte, so it caps the blob path);
- the fetcher's own work without MQTT: the same bytes over a plain socket, each chunk
  sha256-checked into the chunk store, then materialized (what MQTT adds is the gap);
- codec encode / decode of a 4 MiB chunk and of a 16 MiB adapter update, each as a ratio
  to a plain memory copy of the same bytes.

Targets: mosquitto blob path >= 0.5x raw TCP; codec >= 0.5x memcpy.
Writes benchmarks/results/transport.json and transport.md.

Usage: ``python benchmarks/transport.py [--blob-mib 192] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared import codec, topics  # noqa: E402
from shared.blob_fetcher import BlobFetcher  # noqa: E402
from shared.blob_server import BlobServer  # noqa: E402
from shared.broker import BrokerHandle  # noqa: E402
from shared.chunkstore import ChunkStore, materialize  # noqa: E402
from shared.embedded_broker import start_embedded_broker  # noqa: E402
from shared.manifests import build_manifest, chunk_lengths  # noqa: E402
from shared.mosquitto import start_mosquitto  # noqa: E402
from shared.protocol import Chunk, MessageType, ResourceReport, Update  # noqa: E402
from shared.signing import SigningKey  # noqa: E402
from shared.tensors import to_payload  # noqa: E402
from shared.topics import TopicKind  # noqa: E402
from shared.transport import MqttTransport  # noqa: E402
from shared.transport_types import InboundMessage, TransportConfig  # noqa: E402

MiB = 1024 * 1024
CHUNK = 4 * MiB
RUN = "bench"
BENCH_KEY = SigningKey.from_seed(b"fedsoda transport benchmark key.")
"""The blob server's signing key, which the fetcher pins (the server runs in a child process)."""
TARGET_BLOB_RATIO = 0.5
TARGET_CODEC_RATIO = 0.5


# ----------------------------------------------------------------- child roles


def _role_tcp_sender(port: int, total: int) -> None:
    data = os.urandom(CHUNK)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sent = 0
        while sent < total:
            piece = data[: min(CHUNK, total - sent)]
            sock.sendall(piece)
            sent += len(piece)


def _role_tcp_blob_sender(port: int, folder: str) -> None:
    manifest = build_manifest(folder, "bench", 1, "t")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for entry in manifest.files:
            with (Path(folder) / entry.path).open("rb") as fh:
                while piece := fh.read(manifest.chunk_size):
                    sock.sendall(piece)


def _role_blob_server(port: int, folder: str) -> None:
    transport = MqttTransport(TransportConfig(port=port, client_id="bench-coordinator")).connect()
    server = BlobServer(transport, run=RUN, signer=BENCH_KEY)  # chunks are signed, as the coordinator's are
    server.add(build_manifest(folder, "bench", 1, "t"), folder)

    def on_chunk_request(message: InboundMessage) -> None:
        # Decoded and served as the coordinator's handler does; only this benchmark's own
        # client asks, so there is nothing to refuse.
        info, envelope = codec.decode_message(message.topic, message.payload, run=RUN)
        assert info.client is not None  # chunkreq topics are per-client
        server.serve(info.client, envelope.body, ref_message_id=envelope.message_id, round=envelope.round)

    transport.subscribe(topics.all_of(RUN, TopicKind.CHUNKREQ), on_chunk_request)
    print("ready", flush=True)
    while True:  # killed by the parent
        transport.poll(1.0)


def _role_publisher(port: int, count: int) -> None:
    transport = MqttTransport(TransportConfig(port=port, client_id="bench-publisher")).connect()
    payload = codec.encode(
        MessageType.CHUNK, Chunk("0" * 64, "1" * 64, os.urandom(CHUNK)), run=RUN, round=-1, sender="c"
    )
    go = topics.schedule(RUN)
    transport.subscribe(go)
    print("ready", flush=True)
    while not isinstance(event := transport.poll(30), InboundMessage) or event.topic != go:
        pass
    for _ in range(count):
        transport.publish(topics.chunk(RUN, "bench-client"), payload)
    transport.flush(300)
    transport.close()


def _child(*args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, __file__, "--role", *args], stdout=subprocess.PIPE, text=True, cwd=REPO)
    return process


def _wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"benchmark child failed to start (got {line!r})")


# ---------------------------------------------------------------- measurements


def measure_raw_tcp(total: int) -> float:
    """Seconds for a separate process to push ``total`` bytes through a loopback socket."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        child = _child("tcp-sender", str(server.getsockname()[1]), str(total))
        conn, _ = server.accept()
        buf = memoryview(bytearray(CHUNK))
        start = time.perf_counter()
        got = 0
        with conn:
            while got < total:
                n = conn.recv_into(buf)
                if not n:
                    break
                got += n
        elapsed = time.perf_counter() - start
    child.wait(30)
    assert got == total, f"raw TCP moved {got} of {total} bytes"
    return elapsed


def measure_tcp_blob(folder: Path, work: Path) -> float:
    """Seconds to do the fetcher's work (sha256 check, chunk store, materialize) on a plain socket."""
    manifest = build_manifest(folder, "bench", 1, "t")
    cache = work / "tcp-cache"
    shutil.rmtree(cache, ignore_errors=True)
    store = ChunkStore(cache)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        child = _child("tcp-blob-sender", str(server.getsockname()[1]), str(folder))
        conn, _ = server.accept()
        buf = bytearray(manifest.chunk_size)
        start = time.perf_counter()
        with conn:
            for digest, length in chunk_lengths(manifest).items():
                view = memoryview(buf)[:length]
                got = 0
                while got < length:
                    got += conn.recv_into(view[got:])
                store.put(digest, bytes(view))
        materialize(manifest, store, work / "tcp-dest", verify=set())
        elapsed = time.perf_counter() - start
    child.wait(30)
    return elapsed


def measure_blob(broker: BrokerHandle, folder: Path, work: Path) -> tuple[float, int]:
    """Seconds to fetch the folder into an empty cache through ``broker``; and chunks fetched."""
    manifest = build_manifest(folder, "bench", 1, "t")
    server = _child("blob-server", str(broker.port), str(folder))
    try:
        _wait_ready(server)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        transport = MqttTransport(TransportConfig(port=broker.port, client_id="bench-client")).connect()
        fetcher = BlobFetcher(transport, ChunkStore(cache), run=RUN, client_id="bench-client", coordinator_key=BENCH_KEY.public)
        start = time.perf_counter()
        fetcher.fetch(manifest, timeout=600)
        elapsed = time.perf_counter() - start
        transport.close()
        return elapsed, fetcher.stats.fetched
    finally:
        server.kill()
        server.wait(10)


def measure_messages(broker: BrokerHandle, count: int) -> float:
    """Seconds to receive and decode ``count`` 4 MiB chunk envelopes from another process."""
    transport = MqttTransport(TransportConfig(port=broker.port, client_id="bench-client", persistent=False)).connect()
    transport.subscribe(topics.chunk(RUN, "bench-client"))
    publisher = _child("publisher", str(broker.port), str(count))
    try:
        _wait_ready(publisher)
        start = time.perf_counter()
        transport.publish(topics.schedule(RUN), b"go")
        got = 0
        while got < count:
            event = transport.poll(60)
            if event is None:
                raise RuntimeError(f"message benchmark stalled after {got} of {count}")
            if isinstance(event, InboundMessage) and event.topic.endswith("/chunk/bench-client"):
                codec.decode(event.payload)
                got += 1
        elapsed = time.perf_counter() - start
    finally:
        publisher.wait(60)
        transport.close()
    return elapsed


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_codec(repeats: int) -> dict[str, dict[str, float]]:
    """Encode/decode throughput of a chunk and an update, and of memcpy of the same bytes."""
    import torch  # here, so the benchmark's child processes start without it

    chunk = Chunk("0" * 64, "1" * 64, os.urandom(CHUNK))
    gen = torch.Generator().manual_seed(0)
    delta = {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": to_payload(
            torch.randn(256, 256, generator=gen, dtype=torch.float32)
        )
        for i in range(32)
        for ab in "AB"
    }
    update = Update("c", 1, 100, delta, {"loss": 1.0}, ResourceReport(0, 0, 0.0, 0.0, 0, 0, "x"))
    out: dict[str, dict[str, float]] = {}
    cases: list[tuple[str, MessageType, Chunk | Update, bytes]] = [
        ("chunk_4mib", MessageType.CHUNK, chunk, chunk.data),
        ("update_16mib", MessageType.UPDATE, update, b"".join(p.data for p in delta.values())),
    ]
    for name, msg_type, body, payload in cases:
        size = len(payload)
        encoded = codec.encode(msg_type, body, run=RUN, round=0, sender="c")

        def copy(p: bytes = payload) -> bytearray:
            return bytearray(p)

        def encode(t: MessageType = msg_type, b: Chunk | Update = body) -> bytes:
            return codec.encode(t, b, run=RUN, round=0, sender="c")

        def decode(e: bytes = encoded) -> object:
            return codec.decode(e)

        t_copy, t_enc, t_dec = (_best(fn, repeats) for fn in (copy, encode, decode))
        out[name] = {
            "bytes": size,
            "memcpy_mib_s": size / t_copy / MiB,
            "encode_mib_s": size / t_enc / MiB,
            "decode_mib_s": size / t_dec / MiB,
            "encode_ratio": t_copy / t_enc,
            "decode_ratio": t_copy / t_dec,
        }
    return out


def measure_sha256() -> float:
    """MiB/s of hashlib.sha256 on 4 MiB pieces (the fetcher hashes every byte it receives)."""
    data = os.urandom(CHUNK)
    return CHUNK / _best(lambda: hashlib.sha256(data).digest(), 10) / MiB


def _write_blob(folder: Path, total: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    index = 0
    while written < total:
        size = min(64 * MiB, total - written)  # several files, like per-layer shards
        with (folder / f"shard_{index:03d}.bin").open("wb") as fh:
            left = size
            while left:
                piece = min(CHUNK, left)
                fh.write(os.urandom(piece))
                left -= piece
        written += size
        index += 1


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def run(blob_mib: int, repeats: int, out_dir: Path) -> dict:
    """Run every measurement and write the JSON and markdown results."""
    total = blob_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="fedsoda-bench-"))
    results: dict = {
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "paho_mqtt": _version("paho-mqtt"),
            "msgpack": _version("msgpack"),
            "iotcore": _version("iotcore"),
            "mosquitto": subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True).stdout.split(
                "\n"
            )[0],
        },
        "blob_bytes": total,
        "chunk_bytes": CHUNK,
        "repeats": repeats,
    }
    try:
        folder = work / "blob"
        _write_blob(folder, total)
        raw = min(measure_raw_tcp(total) for _ in range(repeats))
        results["raw_tcp_mib_s"] = total / raw / MiB
        results["sha256_mib_s"] = measure_sha256()
        tcp_blob = min(measure_tcp_blob(folder, work) for _ in range(repeats))
        results["tcp_blob_mib_s"] = total / tcp_blob / MiB
        results["blob"] = {}
        results["messages"] = {}
        for kind, start in (("mosquitto", start_mosquitto), ("embedded", start_embedded_broker)):
            with start() as broker:
                best = min(measure_blob(broker, folder, work)[0] for _ in range(repeats))
                results["blob"][kind] = {
                    "mib_s": total / best / MiB,
                    "ratio_to_raw_tcp": raw / best,
                    "ratio_to_tcp_blob": tcp_blob / best,
                }
                count = total // CHUNK
                msg = min(measure_messages(broker, count) for _ in range(repeats))
                results["messages"][kind] = {
                    "mib_s": count * CHUNK / msg / MiB,
                    "ratio_to_raw_tcp": raw / msg * (count * CHUNK / total),
                }
        results["codec"] = measure_codec(max(40, repeats * 20))  # cheap: many repeats tame a busy machine
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["targets"] = {
        "mosquitto_blob_ratio": TARGET_BLOB_RATIO,
        "codec_ratio": TARGET_CODEC_RATIO,
        "mosquitto_blob_met": results["blob"]["mosquitto"]["ratio_to_raw_tcp"] >= TARGET_BLOB_RATIO,
        "codec_met": all(
            min(v["encode_ratio"], v["decode_ratio"]) >= TARGET_CODEC_RATIO for v in results["codec"].values()
        ),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "transport.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "transport.md").write_text(markdown(results))
    return results


def markdown(r: dict) -> str:
    """The results as a markdown report."""
    m, t = r["machine"], r["targets"]
    raw = r["raw_tcp_mib_s"]

    def row(path: str, mib_s: float, ratio: str, target: str = "") -> str:
        return f"| {path} | {mib_s:.0f} | {ratio} | {target} |"

    lines = [
        "# Transport benchmark",
        "",
        f"Blob of {r['blob_bytes'] // MiB} MiB in {r['chunk_bytes'] // MiB} MiB chunks, loopback, best of "
        f"{r['repeats']}; {m['cpu_count']} CPUs, Python {m['python']}, paho-mqtt {m['paho_mqtt']}, "
        f"iotcore {m['iotcore']}, {m['mosquitto']}.",
        "",
        "| path | MiB/s | ratio | target |",
        "| --- | ---: | ---: | ---: |",
        row("raw TCP socket (separate sender process)", raw, "1.00x raw TCP"),
        row("sha256 (one core)", r["sha256_mib_s"], f"{r['sha256_mib_s'] / raw:.2f}x raw TCP"),
        row(
            "blob over raw TCP (same sha256 + store + materialize, no MQTT)",
            r["tcp_blob_mib_s"],
            f"{r['tcp_blob_mib_s'] / raw:.2f}x raw TCP",
        ),
    ]
    for kind in ("mosquitto", "embedded"):
        blob, msgs = r["blob"][kind], r["messages"][kind]
        target = f">= {t['mosquitto_blob_ratio']}x" if kind == "mosquitto" else ""
        ratio = f"{blob['ratio_to_raw_tcp']:.2f}x raw TCP ({blob['ratio_to_tcp_blob']:.2f}x blob over TCP)"
        lines.append(row(f"blob fetch via {kind} (sha256 + disk cache + materialize)", blob["mib_s"], ratio, target))
        ratio = f"{msgs['ratio_to_raw_tcp']:.2f}x raw TCP"
        lines.append(row(f"chunk messages via {kind} (receive + decode only)", msgs["mib_s"], ratio))
    for name, c in r["codec"].items():
        target = f">= {t['codec_ratio']}x"
        lines.append(row(f"codec encode {name}", c["encode_mib_s"], f"{c['encode_ratio']:.2f}x memcpy", target))
        lines.append(row(f"codec decode {name}", c["decode_mib_s"], f"{c['decode_ratio']:.2f}x memcpy", target))
        lines.append(row(f"memcpy {name}", c["memcpy_mib_s"], "1.00x memcpy"))
    verdict = {True: "yes", False: "NO"}
    lines += [
        "",
        f"Targets met: mosquitto blob path {verdict[t['mosquitto_blob_met']]}, codec {verdict[t['codec_met']]}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Command line entry (also the entry of the benchmark's child processes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blob-mib", type=int, default=192, help="blob size in MiB (default 192)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats per measurement; the best counts")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, port, arg = args.role
        if role == "tcp-sender":
            _role_tcp_sender(int(port), int(arg))
        elif role == "tcp-blob-sender":
            _role_tcp_blob_sender(int(port), arg)
        elif role == "blob-server":
            _role_blob_server(int(port), arg)
        else:
            _role_publisher(int(port), int(arg))
        return
    results = run(args.blob_mib, args.repeats, args.out)
    print(markdown(results))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
