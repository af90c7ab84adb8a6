"""Admitted clients that try to steer the model, against a real ``serve`` process on its broker.

A real ``fedsoda-coordinator serve`` (the 4-layer cut of SmolLM2, FedPETuning, two rounds) on
the embedded broker; five clients are scripts on their own MQTT connections, so their deltas
(and their lies) are exactly what the test says:

* three honest clients declare 40 examples and send deltas of norm 0.30-0.44 (what real
  clients of the demo send);
* ``inflater`` declares 1,000,000 examples at hello and sends a delta of norm 99 every round
  (just under ``validation.max_delta_norm``) — the attack that owned 99.99% of each round;
* ``liar`` declares 40 and then claims 1,000,000 in its update: refused (``examples``); it
  sends its real count next and that one is averaged;
* in round 2 a replay of honest client ``h0``'s round-1 update, re-labelled for round 2 with a
  fresh message id, arrives before ``h0``'s real update: refused (``base``), and the real one
  is averaged (before, the replay was kept and the real update dropped as a duplicate).

Asserted from the run directory: the run finished; every honest accepted update is in its
round's aggregate exactly once (``benchmarks.harness.check_ledger``, which recomputes each
aggregate from the persisted updates and the recorded factors); and in each round the
inflater moved the global adapter by at most ``weight_cap x clip`` (= 4) times the median
honest client's contribution, where unbounded FedAvg of the same updates hands it > 99% of
the round's change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from benchmarks.harness import check_ledger
from coordinator.run.aggregation import FedAvg, InfluenceLimits, aggregate_round
from coordinator.run.checkpoint import RunDir
from hardware_profiles.detect import detect_profile
from shared import codec, topics
from shared.broker import free_port
from shared.protocol import (
    GlobalAdapter,
    Hello,
    MessageType,
    Presence,
    ResourceReport,
    Schedule,
    Update,
)
from shared.tensors import payloads_digest, state_to_payloads
from shared.transport import MqttTransport
from shared.transport_types import InboundMessage, TransportConfig

pytestmark = [pytest.mark.integration]

TIMEOUT = 120.0
HONEST = ("h0", "h1", "h2")
CLIENTS = (*HONEST, "inflater", "liar")


def _config(path: Path, run_id: str, model_dir: Path, port: int) -> Path:
    path.write_text(f"""
run_id = "{run_id}"
method = "fedpetuning"

[model]
model = "{model_dir}"

[pruning]
precision = "bf16"

[rounds]
rounds = 2
min_clients = {len(CLIENTS)}
quorum = {len(CLIENTS)}
round_timeout_s = {TIMEOUT}

[evaluation]
enabled = false

[broker]
mode = "embedded"
host = "127.0.0.1"
port = {port}
""")
    return path


class Script:
    """One scripted client: its own connection, and every message addressed to it or to all."""

    def __init__(self, client_id: str, run: str, port: int, serve: subprocess.Popen, log: Path) -> None:
        self.client_id, self.run, self.serve, self.log = client_id, run, serve, log
        self.transport = MqttTransport(TransportConfig("127.0.0.1", port, client_id=client_id, connect_timeout=10.0)).connect()
        self.inbox: list[InboundMessage] = []
        for topic in (topics.schedule(run), topics.adapter(run), topics.assign(run, client_id), topics.nack(run, client_id)):
            self.transport.subscribe(topic, self.inbox.append)

    def send(self, msg_type: MessageType, body: object, topic: str, round_: int = -1, retain: bool = False) -> None:
        self.transport.publish(topic, codec.encode(msg_type, body, run=self.run, round=round_, sender=self.client_id), retain=retain)
        assert self.transport.flush(30)

    def wait(self, topic: str, accept: Callable[[object], bool] = lambda _b: True) -> object:
        """The newest message on ``topic`` that ``accept`` takes, waiting up to TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for message in reversed(self.inbox):
                if message.topic == topic:
                    body = codec.decode(message.payload).body
                    if accept(body):
                        return body
            self.transport.poll(0.2)
            if self.serve.poll() is not None:
                raise AssertionError(f"serve exited ({self.serve.returncode}):\n{self.log.read_text()[-4000:]}")
        raise AssertionError(f"{self.client_id}: nothing on {topic} within {TIMEOUT:.0f} s:\n{self.log.read_text()[-4000:]}")

    def join(self, examples: int) -> None:
        # The retained adapter goes out once the coordinator subscribed: a hello before it is lost.
        self.wait(topics.adapter(self.run))
        self.send(MessageType.PRESENCE, Presence(self.client_id, True, "joined"), topics.presence(self.run, self.client_id), retain=True)
        hello = Hello(client_id=self.client_id, profile=detect_profile(), num_examples=examples, software_version="attack-script")
        self.send(MessageType.HELLO, hello, topics.hello(self.run, self.client_id))
        assert self.wait(topics.assign(self.run, self.client_id)).accepted

    def update(self, round_: int, base: GlobalAdapter, delta: dict[str, torch.Tensor], examples: int) -> bytes:
        body = Update(
            client_id=self.client_id, round=round_, num_examples=examples, delta=state_to_payloads(delta),
            metrics={"loss": 1.0}, resources=ResourceReport(1, 0, 1.0, 1.0, 0, 0, "cpu"),
            base_round=base.round, base_digest=payloads_digest(base.tensors),
        )
        return codec.encode(MessageType.UPDATE, body, run=self.run, round=round_, sender=self.client_id)

    def publish_update(self, payload: bytes) -> None:
        self.transport.publish(topics.update(self.run, self.client_id), payload, qos=1)
        assert self.transport.flush(30)


def _delta(shapes: dict[str, tuple[int, ...]], norm: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    raw = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    total = math.sqrt(sum(float(t.square().sum()) for t in raw.values()))
    return {k: t * (norm / total) for k, t in raw.items()}


def _change(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(after[k].float() - before[k].float()).flatten() for k in sorted(before)])


def test_inflated_weights_huge_deltas_and_replays_cannot_steer_the_run(tmp_path, tiny_model_dir, unique_id) -> None:
    run = unique_id("attack")
    port = free_port()
    log = tmp_path / "serve.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with log.open("w") as fh:
        serve = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "serve", "--config", str(_config(tmp_path / "run.toml", run, tiny_model_dir, port)),
             "--run-dir", str(tmp_path / "run")],
            stdout=fh, stderr=subprocess.STDOUT, env=env,
        )
    scripts: dict[str, Script] = {}
    try:
        deadline = time.monotonic() + TIMEOUT
        while not scripts:
            try:
                scripts = {c: Script(c, run, port, serve, log) for c in CLIENTS}
            except Exception:
                if time.monotonic() > deadline or serve.poll() is not None:
                    raise
                time.sleep(0.5)
        for c in CLIENTS:
            scripts[c].join(1_000_000 if c == "inflater" else 40)
        sent_round_1: dict[str, bytes] = {}
        for round_ in (1, 2):
            schedule: Schedule = scripts["h0"].wait(topics.schedule(run), lambda s: s.status == "running" and s.round == round_)
            base: GlobalAdapter = scripts["h0"].wait(topics.adapter(run), lambda a: a.round == schedule.adapter_round)
            shapes = {k: tuple(p.shape) for k, p in base.tensors.items()}
            if round_ == 2:
                # A replay of h0's round-1 update, re-labelled for round 2 (fresh message id).
                old = codec.decode(sent_round_1["h0"])
                relabelled = dataclasses.replace(old.body, round=2)
                scripts["h0"].publish_update(codec.encode(MessageType.UPDATE, relabelled, run=run, round=2, sender="h0"))
                nack = scripts["h0"].wait(topics.nack(run, "h0"), lambda n: n.round == 2)
                assert nack.code == "base", nack
            for i, c in enumerate(HONEST):
                payload = scripts[c].update(round_, base, _delta(shapes, 0.30 + 0.07 * i, seed=10 * round_ + i), 40)
                sent_round_1.setdefault(c, payload)
                scripts[c].publish_update(payload)
            scripts["inflater"].publish_update(
                scripts["inflater"].update(round_, base, _delta(shapes, 99.0, seed=100 + round_), 1_000_000)
            )
            liar = scripts["liar"]
            liar.publish_update(liar.update(round_, base, _delta(shapes, 0.35, seed=200 + round_), 1_000_000))
            nack = liar.wait(topics.nack(run, "liar"), lambda n, r=round_: n.round == r)
            assert nack.code == "examples" and "declared at hello" in nack.reason, nack
            liar.publish_update(liar.update(round_, base, _delta(shapes, 0.35, seed=200 + round_), 40))
        serve.wait(TIMEOUT)
        assert serve.returncode == 0, log.read_text()[-4000:]
    finally:
        for s in scripts.values():
            s.transport.close()
        if serve.poll() is None:
            serve.send_signal(2)
            serve.wait(30)

    # Every accepted update in its aggregate once, each aggregate recomputed from the run dir.
    ledger = check_ledger(tmp_path / "run")
    assert ledger.accepted == {(r, c) for r in (1, 2) for c in CLIENTS}
    assert ledger.rejected == 3  # the liar's two claims and the replay

    run_dir = RunDir(tmp_path / "run")
    unbounded = InfluenceLimits(weight_cap=math.inf, clip=math.inf, clip_per_key=False)
    for r in (1, 2):
        before, after = run_dir.load_global(r - 1), run_dir.load_global(r)
        updates = run_dir.updates(r)
        influence = run_dir.load_influence(r)
        assert influence is not None
        total_weight = sum(c.weight for c in influence.clients)
        contribution = {
            u.client_id: float(torch.cat([(v.float() * influence.client(u.client_id).factor(k)).flatten() for k, v in sorted(u.load_delta().items())]).norm())
            * influence.client(u.client_id).weight / total_weight
            for u in updates
        }
        typical = statistics.median(contribution[c] for c in HONEST)
        assert contribution["inflater"] <= 4 * typical * 1.01, (r, contribution)
        inflater = influence.client("inflater")
        assert inflater.weight == 80 and inflater.claimed_weight == 1_000_000 and inflater.scale < 0.01
        # What the attack was worth without the bounds: > 99% of the round's change.
        plain, _ = aggregate_round(FedAvg(), before, updates, unbounded)
        honest_only, _ = aggregate_round(FedAvg(), before, [u for u in updates if u.client_id != "inflater"], unbounded)
        plain_off = float((_change(plain, before) - _change(honest_only, before)).norm())
        bounded_off = float((_change(after, before) - _change(honest_only, before)).norm())
        assert plain_off > 100 * float(_change(honest_only, before).norm())
        assert bounded_off < plain_off / 50
