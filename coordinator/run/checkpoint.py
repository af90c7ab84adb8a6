"""Run directory layout and crash-safe persistence of the round loop.

Layout of a run directory::

    state.json                              RoundState.to_dict(), replaced atomically
    updates/round_0003/<client>.safetensors  an accepted update's delta
    updates/round_0003/<client>.json         its metadata (client, round, n, metrics, ...)
    global/round_0000.safetensors            the initial global adapter; one file per round
    influence/round_0003.json                each update's weight and clip factors in that
                                             round's aggregate (RoundInfluence.to_json())
    round_evaluations.json                   the global adapter's metric every few rounds

Every file is written to a temporary name in the same folder, fsynced, and moved into
place with ``os.replace``, so a reader sees the old file or the new one, never half of
one. An update counts as persisted once its JSON exists (written after its tensors), and
the server persists it *before* feeding ``UpdateReceived(ok=True)`` to the round loop, so a
coordinator killed at any moment loses no update it had accepted: :func:`load_run` counts
persisted-but-uncounted updates back into the state. Updates are keyed by (round, client),
the first one persisted wins, and each is returned exactly once.

Tensors are stored with safetensors (no pickle); nothing here calls ``torch.load``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from coordinator.run.aggregation.bounds import RoundInfluence, delta_norms
from coordinator.run.round_events import UpdateReceived
from coordinator.run.round_state import RoundState
from coordinator.run.rounds import admission, step
from shared.errors import RunStateError

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file.

    Args:
        path: Destination; its folder must exist.
        data: Full new content.

    Raises:
        OSError: The write failed (the destination is untouched; the temp file removed).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_stem(client_id: str) -> str:
    """A file name for ``client_id``: the id itself when safe, else a hash of it."""
    if _SAFE_NAME.fullmatch(client_id) and client_id not in (".", ".."):
        return client_id
    # '_' cannot start a safe id, so a hashed name never collides with a literal one.
    return "_" + hashlib.sha256(client_id.encode()).hexdigest()[:40]


def _tensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return safetensors.torch.save(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata
    )


@dataclass(frozen=True)
class PersistedUpdate:
    """An accepted update on disk; its delta is loaded only when asked (streaming).

    Attributes:
        round: Round it was accepted in.
        client_id: Sender.
        num_examples: Its example count (the FedAvg weight).
        message_id: Envelope message id.
        metrics: Client-reported training metrics.
        resources: The client's resource report as a plain dict.
        tensors_path: The safetensors file of the delta.
        sha256: Hex digest of that file, checked on load.
        norm: L2 norm of the whole delta (None in runs persisted before norms were kept).
        key_norms: L2 norm of each key (likewise).
    """

    round: int
    client_id: str
    num_examples: int
    message_id: str
    metrics: dict[str, float]
    resources: dict[str, Any]
    tensors_path: Path
    sha256: str
    norm: float | None = None
    key_norms: dict[str, float] | None = None

    def norms(self) -> tuple[float, dict[str, float]]:
        """L2 norm of the whole delta and of each key (read from the delta when not recorded)."""
        if self.norm is not None and self.key_norms is not None:
            return self.norm, self.key_norms
        return delta_norms(self.load_delta())

    def load_delta(self) -> dict[str, torch.Tensor]:
        """Read the delta from disk.

        Returns:
            Key -> tensor, as the client sent it.

        Raises:
            RunStateError: The file is missing or does not match its recorded hash.
        """
        try:
            data = self.tensors_path.read_bytes()
        except OSError as exc:
            raise RunStateError(f"update of {self.client_id} for round {self.round} is unreadable: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise RunStateError(
                f"{self.tensors_path} does not match its recorded sha256: the run directory is corrupt"
            )
        return safetensors.torch.load(data)


class RunDir:
    """One run's directory (see the module docstring for the layout).

    Args:
        path: The folder; created by :meth:`create`, read by :func:`load_run`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.state_path = self.path / STATE_FILE
        self.updates_dir = self.path / "updates"
        self.global_dir = self.path / "global"

    @classmethod
    def create(cls, path: str | os.PathLike[str], state: RoundState) -> RunDir:
        """Start a new run directory holding ``state``.

        Args:
            path: Folder to create (may exist, but must not hold a run).
            state: The initial state.

        Returns:
            The run directory.

        Raises:
            RunStateError: The folder already holds a run (resume it, or pick another folder).
        """
        run_dir = cls(path)
        if run_dir.state_path.exists():
            raise RunStateError(
                f"{run_dir.path} already holds a run: resume it with --resume or choose another run dir"
            )
        for folder in (run_dir.path, run_dir.updates_dir, run_dir.global_dir):
            folder.mkdir(parents=True, exist_ok=True)
        run_dir.save_state(state)
        return run_dir

    # ----------------------------------------------------------------- state

    def save_state(self, state: RoundState) -> None:
        """Atomically replace state.json with ``state``.

        Args:
            state: The state to persist.
        """
        data = json.dumps(state.to_dict(), indent=1, sort_keys=True).encode()
        atomic_write_bytes(self.state_path, data)

    def load_state(self) -> RoundState:
        """Read state.json.

        Returns:
            The persisted state.

        Raises:
            RunStateError: state.json is missing or corrupt.
        """
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError as exc:
            raise RunStateError(
                f"no {STATE_FILE} in {self.path}: not a run directory (start without --resume)"
            ) from exc
        try:
            d = json.loads(raw)
        except ValueError as exc:
            raise RunStateError(f"{self.state_path} is not valid JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise RunStateError(f"{self.state_path} does not hold a JSON object")
        return RoundState.from_dict(d)

    # --------------------------------------------------------------- updates

    def round_dir(self, round_: int) -> Path:
        """Folder of the updates of ``round_``."""
        return self.updates_dir / f"round_{round_:04d}"

    def save_update(
        self,
        round_: int,
        client_id: str,
        delta: Mapping[str, torch.Tensor],
        *,
        num_examples: int,
        message_id: str,
        metrics: Mapping[str, float] | None = None,
        resources: Mapping[str, Any] | None = None,
        norms: tuple[float, Mapping[str, float]] | None = None,
    ) -> bool:
        """Persist an accepted update durably (call before counting it in the round loop).

        Args:
            round_: Round it belongs to.
            client_id: Sender.
            delta: Validated delta, key -> tensor.
            num_examples: Its example count.
            message_id: Envelope message id.
            metrics: Client metrics (JSON-serializable floats).
            resources: Resource report as a plain dict.
            norms: The delta's L2 norm and per-key norms (computed here when not given).

        Returns:
            True if written, False if an update of this client for this round was already
            persisted (the first one is kept: redeliveries never replace it).
        """
        folder = self.round_dir(round_)
        folder.mkdir(parents=True, exist_ok=True)
        stem = _file_stem(client_id)
        meta_path = folder / f"{stem}.json"
        if meta_path.exists():
            return False
        tensors_path = folder / f"{stem}.safetensors"
        data = _tensors_bytes(delta, {"client_id": client_id, "round": str(round_)})
        atomic_write_bytes(tensors_path, data)
        norm, key_norms = norms if norms is not None else delta_norms(delta)
        meta = {
            "norm": norm,
            "key_norms": dict(key_norms),
            "client_id": client_id,
            "round": round_,
            "num_examples": num_examples,
            "message_id": message_id,
            "metrics": dict(metrics or {}),
            "resources": dict(resources or {}),
            "tensors": tensors_path.name,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        # The JSON is the commit marker: written last, so a crash in between leaves an
        # orphan tensors file that is ignored and later overwritten.
        atomic_write_bytes(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        return True

    def updates(self, round_: int) -> list[PersistedUpdate]:
        """Every update persisted for ``round_``, sorted by client id.

        Args:
            round_: The round.

        Returns:
            One entry per client (metadata only; call ``load_delta`` to read tensors).

        Raises:
            RunStateError: A metadata file is corrupt.
        """
        folder = self.round_dir(round_)
        if not folder.is_dir():
            return []
        found: list[PersistedUpdate] = []
        for meta_path in sorted(folder.glob("*.json")):
            if meta_path.name.startswith("."):
                continue  # a temporary file of an interrupted write
            try:
                m = json.loads(meta_path.read_bytes())
                found.append(
                    PersistedUpdate(
                        round=int(m["round"]),
                        client_id=str(m["client_id"]),
                        num_examples=int(m["num_examples"]),
                        message_id=str(m["message_id"]),
                        metrics=dict(m["metrics"]),
                        resources=dict(m["resources"]),
                        tensors_path=folder / str(m["tensors"]),
                        sha256=str(m["sha256"]),
                        norm=float(m["norm"]) if "norm" in m else None,
                        key_norms={str(k): float(v) for k, v in m["key_norms"].items()} if "key_norms" in m else None,
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise RunStateError(f"{meta_path} is corrupt ({type(exc).__name__}: {exc})") from exc
        return sorted(found, key=lambda u: u.client_id)

    # ---------------------------------------------------------------- global

    def global_path(self, round_: int) -> Path:
        """File of the global adapter after round ``round_`` (0 = initial)."""
        return self.global_dir / f"round_{round_:04d}.safetensors"

    def save_global(self, round_: int, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Atomically write the global adapter of ``round_``.

        Args:
            round_: Round it results from (0 for the initial adapter).
            tensors: Adapter, key -> tensor.

        Returns:
            The file written.
        """
        self.global_dir.mkdir(parents=True, exist_ok=True)
        path = self.global_path(round_)
        atomic_write_bytes(path, _tensors_bytes(tensors, {"round": str(round_)}))
        return path

    def influence_path(self, round_: int) -> Path:
        """File of the factors each update of ``round_`` was aggregated with."""
        return self.path / "influence" / f"round_{round_:04d}.json"

    def save_influence(self, round_: int, influence: RoundInfluence) -> None:
        """Record one round's aggregation factors (atomically; a re-aggregation replaces them)."""
        path = self.influence_path(round_)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(influence.to_json(), indent=1, sort_keys=True).encode())

    def load_influence(self, round_: int) -> RoundInfluence | None:
        """The factors of ``round_`` (None for a round aggregated before they were recorded).

        Raises:
            RunStateError: The file is corrupt.
        """
        path = self.influence_path(round_)
        if not path.is_file():
            return None
        try:
            return RoundInfluence.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise RunStateError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from exc

    @property
    def round_evaluations_path(self) -> Path:
        """File of the per-round evaluations."""
        return self.path / "round_evaluations.json"

    def round_evaluations(self) -> list[dict[str, Any]]:
        """Every per-round evaluation saved so far, in round order (empty when none)."""
        path = self.round_evaluations_path
        if not path.is_file():
            return []
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RunStateError(f"{path} is not valid JSON ({exc.msg})") from exc

    def save_round_evaluation(self, record: Mapping[str, Any]) -> None:
        """Add (or, for a round evaluated again after a resume, replace) one round's evaluation."""
        kept = [r for r in self.round_evaluations() if r.get("round") != record["round"]]
        records = sorted([*kept, dict(record)], key=lambda r: r["round"])
        atomic_write_bytes(self.round_evaluations_path, json.dumps(records, indent=2).encode())

    def load_global(self, round_: int) -> dict[str, torch.Tensor]:
        """Read the global adapter of ``round_``.

        Args:
            round_: The round.

        Returns:
            Key -> tensor.

        Raises:
            RunStateError: No adapter was saved for that round.
        """
        path = self.global_path(round_)
        if not path.exists():
            raise RunStateError(f"no global adapter for round {round_} in {self.global_dir}")
        return safetensors.torch.load_file(path)


@dataclass(frozen=True)
class ResumedRun:
    """What a restarted coordinator carries on from.

    Attributes:
        run_dir: The run directory.
        state: The state, with every persisted update of the open round counted.
        updates: The accepted updates of the open round (collecting or awaiting
            aggregation), one per client; empty otherwise.
    """

    run_dir: RunDir
    state: RoundState
    updates: tuple[PersistedUpdate, ...] = field(default=())


def load_run(path: str | os.PathLike[str]) -> ResumedRun:
    """Load a run directory for ``serve --resume``.

    An update persisted just before a crash, but not yet in state.json, is counted back in
    (through the round loop's own ``step``, so the round may close) and state.json is
    rewritten. Feed ``Start(now)`` to
    the returned state next: it re-emits what the phase waits on (e.g. the aggregation
    request).

    Args:
        path: The run directory.

    Returns:
        The state and the open round's accepted updates.

    Raises:
        RunStateError: The directory holds no run, is corrupt, or the state counts an
            update whose file is gone.
    """
    run_dir = RunDir(path)
    state = loaded = run_dir.load_state()
    rec = state.current
    if rec is None or rec.outcome not in ("open", "closed"):
        return ResumedRun(run_dir=run_dir, state=state)
    on_disk = {u.client_id: u for u in run_dir.updates(rec.round)}
    for cid, upd in on_disk.items():
        if cid in rec.reported:
            continue
        verdict = admission(state, cid, rec.round)
        if verdict.accepted:
            logger.info("resume: counting update of %s for round %d persisted before the crash", cid, rec.round)
            state, _ = step(
                state, UpdateReceived(cid, rec.round, upd.message_id, upd.num_examples, ok=True)
            )
        else:
            logger.warning("resume: ignoring persisted update of %s: %s", cid, verdict.reason)
    rec = state.current
    assert rec is not None
    missing = [cid for cid in rec.reported if cid not in on_disk]
    if missing:
        raise RunStateError(
            f"state counts updates of {', '.join(missing)} for round {rec.round} but their files "
            f"are missing from {run_dir.round_dir(rec.round)}: the run directory is corrupt"
        )
    if state != loaded:
        run_dir.save_state(state)
    return ResumedRun(run_dir=run_dir, state=state, updates=tuple(on_disk[cid] for cid in rec.reported))
