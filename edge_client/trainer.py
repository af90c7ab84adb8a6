"""Local QLoRA training of one round: the client half of the federated method.

:func:`train_adapter` adds LoRA to the (sub-)LLM the client holds (:mod:`edge_client.lora`),
starts it from the global adapter, takes ``local_steps`` AdamW steps on

    loss = causal-LM loss on the answer tokens + (mu / 2) * ||theta - theta_global||^2

(theta: the LoRA parameters), and returns ``delta = theta_local - theta_global`` keyed by
FULL-LLM layer index (:mod:`shared.adapters`), in float32 on the CPU. With the
``label_words`` objective the task loss is the cross-entropy over the candidate answers (the
label words, or the option letters) at the answer position instead (:func:`label_word_loss`).

A FedKRSO round (``params.subspace_seeds`` non-empty) trains subspace coordinates instead of
LoRA (:mod:`edge_client.subspace`): theta is this round's coordinates, starting at zero on
top of the history the global state holds, only the coordinates of one seed move per step
(:func:`edge_client.subspace.active_seed`), and the delta is the coordinates themselves,
keyed ``<canonical module>.krso.<seed>``. Everything else is the same loop.

The base model is left as it was found: LoRA is injected for the call and removed afterwards
(``unload``), so the caller can evaluate the bare model or train the next round on it.
Every ``checkpoint_every`` steps the round's state is saved (:mod:`edge_client.train_checkpoint`),
and a round resumed from such a checkpoint ends as if it had never stopped.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edge_client.data import IGNORE_INDEX, LocalDataset, batch_indices, make_batch
from edge_client.lora import adapter_parameters, load_start, lora_for_training
from edge_client.subspace import active_seed, subspaces_for_training
from edge_client.train_checkpoint import (
    TrainCheckpoint,
    check_resume,
    check_resume_start,
    optimizer_tensors,
    params_dict,
    restore_optimizer,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from shared.adapters import to_full_keys
from shared.errors import DataError, ModelError
from shared.subllm import is_4bit

if TYPE_CHECKING:
    from shared.protocol import TrainingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced.

    Attributes:
        delta: ``theta_local - theta_global`` per LoRA tensor, canonical full-LLM keys
            (e.g. ``base_model.model.model.layers.17.self_attn.q_proj.lora_A.weight``),
            float32 CPU tensors shaped like the LoRA weights (A ``[r, in]``, B ``[out, r]``).
            In a FedKRSO round: this round's coordinates ``B`` (``[out, subspace_rank]``) of
            every target module along every seed of the round, keyed
            ``base_model.model.model.layers.17.self_attn.q_proj.krso.<seed>``.
        num_examples: n_c, the size of the local dataset (the FedAvg weight).
        metrics: ``steps``, ``resumed_from_step``, ``prox_last`` (``||theta - theta_global||^2``
            before the last step), ``step_seconds_mean``, ``answer_tokens``, ``delta_norm``,
            ``learning_rate``, ``mu``, and when at least one step ran ``loss_first``,
            ``loss_last``, ``loss_mean`` (task loss) and ``grad_norm_first``,
            ``grad_norm_last`` (before clipping); all floats.
    """

    delta: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class TrainProgress:
    """Passed to ``progress_cb`` after every optimizer step.

    Attributes:
        step: Steps completed so far this round (1-based after the first step).
        total_steps: ``local_steps`` of the round.
        loss: Task loss of the step.
        prox: Proximal term ``||theta - theta_global||^2`` before the step.
        seconds: Wall time of the step.
    """

    step: int
    total_steps: int
    loss: float
    prox: float
    seconds: float


def round_seed(seed: int, round_num: int) -> int:
    """The RNG seed of one round: every round draws fresh batches and dropout masks."""
    digest = hashlib.sha256(f"fedsoda-train/{seed}/{round_num}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def proximal_term(adapter: Mapping[str, torch.Tensor], global_adapter: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``||theta - theta_global||^2`` over the adapter tensors (float32 scalar).

    Args:
        adapter: Current LoRA tensors.
        global_adapter: The round's starting tensors, same keys and shapes.

    Returns:
        The squared distance, differentiable in ``adapter``.
    """
    total = torch.zeros((), dtype=torch.float32, device=next(iter(adapter.values())).device)
    for key, p in adapter.items():
        total = total + (p.float() - global_adapter[key]).pow(2).sum()
    return total


def first_answer_tokens(tokenizer: Any, choices: Sequence[str]) -> list[int]:
    """The first token id of each candidate answer, in order (the ``label_words`` objective).

    Raises:
        DataError: An answer tokenizes to nothing, or two answers start with the same token
            (then only the ``answer`` objective can tell them apart).
    """
    ids = []
    for choice in choices:
        tokens = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise DataError(f"answer {choice!r} tokenizes to no tokens")
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise DataError(
            f"the answers {list(choices)} do not start with distinct tokens ({ids}); "
            "use training objective 'answer' or label words that differ in their first token"
        )
    return ids


def label_word_loss(logits: torch.Tensor, labels: torch.Tensor, choices: torch.Tensor, label_word_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the label words at the answer position (the ``label_words`` objective).

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` token labels, ``IGNORE_INDEX`` before the answer (as :func:`make_batch` builds).
        choices: ``[B]`` index of each example's label in ``label_word_ids``.
        label_word_ids: ``[K]`` first token of each label's answer.

    Returns:
        The mean loss (a scalar).
    """
    # The logits that predict the first answer token sit one position before it.
    answer_start = (labels != IGNORE_INDEX).int().argmax(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    scores = logits[rows, answer_start - 1][:, label_word_ids].float()
    return torch.nn.functional.cross_entropy(scores, choices)


@dataclass(frozen=True)
class _Round:
    """What the loop trains: the prepared model, its data, and the adapter's start.

    Attributes:
        model: The model with the trainable parameters in it (the ``PeftModel`` of
            :func:`~edge_client.lora.attach_lora`, or the sub-LLM with subspace wrappers).
        tokenizer: Its tokenizer.
        dataset: The local dataset.
        params: The round's TrainingParams.
        adapter: The trainable parameters (sub-LLM keys), already at their start values.
        theta_global: The round's starting tensors (float32, on ``device``): the proximal
            term's anchor and what the delta is taken from.
        device: Where training runs.
        round_num: The round number.
        seed: The round's RNG seed (:func:`round_seed`).
        active: ``active(step)``: the keys of :attr:`adapter` that step updates (the others'
            gradients are dropped before clipping); ``None``: all of them.
    """

    model: torch.nn.Module
    tokenizer: Any
    dataset: LocalDataset
    params: TrainingParams
    adapter: dict[str, torch.nn.Parameter]
    theta_global: dict[str, torch.Tensor]
    device: torch.device
    round_num: int
    seed: int
    active: Callable[[int], Collection[str]] | None = None


@dataclass(frozen=True)
class _LoopSettings:
    """How the loop reports, saves, clips and keys the delta (see :func:`train_adapter`).

    Attributes:
        layer_map: ``layer_map[i]`` = full-LLM index of sub-LLM layer ``i``.
        layers_prefix: Dotted path of the decoder layer list.
        progress_cb: Called after every step, or ``None``.
        checkpoint_dir: Where to save mid-round checkpoints (``None``: never).
        checkpoint_every: Save after every this many steps (0: never).
        max_grad_norm: Clip the adapter gradient norm to this (``None``: no clipping).
    """

    layer_map: Sequence[int]
    layers_prefix: str
    progress_cb: Callable[[TrainProgress], None] | None
    checkpoint_dir: str | Path | None
    checkpoint_every: int
    max_grad_norm: float | None


@dataclass(frozen=True)
class TrainOptions:
    """How one round of local training runs, beyond the round's parameters.

    Attributes:
        round_num: The round number (seeds the round and is stored in checkpoints).
        progress_cb: Called with a :class:`TrainProgress` after every step; an exception
            from it aborts training (the last checkpoint stays on disk).
        resume_state: A checkpoint of this round to carry on from.
        gradient_checkpointing: Trade compute for activation memory.
        checkpoint_dir: Where to save mid-round checkpoints (``None``: never).
        checkpoint_every: Save after every this many steps (0: never).
        max_grad_norm: Clip the adapter gradient norm to this (``None``: no clipping).
    """

    round_num: int = 0
    progress_cb: Callable[[TrainProgress], None] | None = None
    resume_state: TrainCheckpoint | None = None
    gradient_checkpointing: bool = False
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 0
    max_grad_norm: float | None = 1.0


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass(frozen=True)
class _Trainable:
    """A model prepared for the round's method by :func:`_prepared`.

    Attributes:
        model: What the loop runs.
        adapter: The trainable parameters (sub-LLM keys), at their start values unless resuming.
        start: Canonical-key tensors a checkpoint's start must match
            (:func:`~edge_client.train_checkpoint.check_resume_start`; ``None``: any fresh start).
        active: As :attr:`_Round.active`.
    """

    model: torch.nn.Module
    adapter: dict[str, torch.nn.Parameter]
    start: Mapping[str, torch.Tensor] | None
    active: Callable[[int], Collection[str]] | None


@contextmanager
def _prepared(
    model: torch.nn.Module,
    params: TrainingParams,
    global_adapter: Mapping[str, torch.Tensor] | None,
    layer_map: Sequence[int],
    layers_prefix: str,
    options: TrainOptions,
    seed: int,
) -> Iterator[_Trainable]:
    """The model ready for the round's method for the ``with`` block, and as found after it."""
    checkpointing = options.gradient_checkpointing
    if not params.subspace_seeds:
        with lora_for_training(model, params, gradient_checkpointing=checkpointing) as peft_model:
            adapter = adapter_parameters(peft_model)
            if options.resume_state is None:
                load_start(adapter, global_adapter, layer_map, layers_prefix, int(params.seed))
            yield _Trainable(model=peft_model, adapter=adapter, start=global_adapter, active=None)
        return
    with subspaces_for_training(
        model, params, global_adapter, layer_map, layers_prefix, gradient_checkpointing=checkpointing
    ) as subspaces:
        # Coordinates start at zero every round (the history sits in the wrappers' buffers),
        # so zero is the start a checkpoint of this round must have begun from.
        zeros = {k: torch.zeros(p.shape) for k, p in subspaces.coordinates.items()}
        seed_keys = subspaces.seed_keys

        def active(step: int) -> Collection[str]:
            return seed_keys[active_seed(seed, step, len(seed_keys))]

        yield _Trainable(
            model=subspaces.model,
            adapter=subspaces.coordinates,
            start=to_full_keys(zeros, layer_map, layers_prefix),
            active=active,
        )


def train_adapter(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: LocalDataset,
    params: TrainingParams,
    global_adapter: Mapping[str, torch.Tensor] | None,
    layer_map: Sequence[int],
    layers_prefix: str,
    device: str | torch.device,
    options: TrainOptions = TrainOptions(),
) -> TrainResult:
    """Train a LoRA adapter for one round and return its delta from the global adapter.

    With ``params.subspace_seeds`` set it is a FedKRSO round instead: the base is tuned in
    the round's random subspaces on top of the history ``global_adapter`` holds
    (:mod:`edge_client.subspace`), one seed's coordinates per step, and the delta is this
    round's coordinates.

    Deterministic given ``params.seed`` and ``round_num`` (batches, dropout, the active
    subspace per step, and the initial adapter when there is no global one). The base model
    comes back without LoRA layers or subspace wrappers, with its train/eval mode and
    ``requires_grad`` flags as they were; 4-bit models keep the fp32 norms
    ``prepare_model_for_kbit_training`` gave them.

    Args:
        model: The client's sub-LLM (plain or bitsandbytes 4-bit), bare (no PEFT adapter).
        tokenizer: Its tokenizer.
        dataset: The local dataset (n_c = ``len(dataset)``).
        params: The round's TrainingParams (local_steps, learning_rate, batch_size, seq_len,
            lora_rank, lora_alpha, lora_dropout, target_modules, mu, seed; subspace_rank and
            subspace_seeds for FedKRSO).
        global_adapter: Canonical-key LoRA tensors to start from; keys of full-LLM layers this
            sub-LLM lacks are ignored. ``None``: a fresh init seeded per canonical key, so all
            tiers agree on it. In a FedKRSO round: the history, canonical coordinate keys of
            all past rounds (``None`` or empty before the first aggregation).
        layer_map: ``layer_map[i]`` = full-LLM index of sub-LLM layer ``i``.
        layers_prefix: Dotted path of the decoder layer list (e.g. ``"model.layers"``).
        device: Where to train. A plain model is moved there; a 4-bit model must already be.
        options: Round number, progress callback, checkpointing and clipping
            (:class:`TrainOptions`).

    Returns:
        The :class:`TrainResult`.

    Raises:
        DataError: The dataset is empty.
        ModelError: LoRA cannot be attached, the global adapter does not fit, the 4-bit model
            is on another device, the loss became NaN/Inf (lower the learning rate), or
            (FedKRSO) bad subspace parameters or history
            (:func:`~edge_client.subspace.subspaces_for_training`).
        RunStateError: ``resume_state`` belongs to another round or other params.
    """
    resume_state, round_num = options.resume_state, options.round_num
    if len(dataset) == 0:
        raise DataError(f"{dataset.source}: no examples to train on")
    if params.objective == "label_words" and dataset.choices is None:
        raise DataError(
            f"{dataset.source}: the run trains with objective 'label_words', which needs examples that share their "
            f"candidate answers (a classification task, or multiple choice with as many options in every row); "
            f"this is a {dataset.task.kind} dataset without them"
        )
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    current = _model_device(model)
    if current != device:
        if is_4bit(model):
            raise ModelError(f"the 4-bit model is on {current} but training was asked on {device}; load it there")
        model.to(device)
    if resume_state is not None:
        check_resume(resume_state, params, round_num)
    seed = round_seed(int(params.seed), round_num)
    torch.manual_seed(seed)
    with _prepared(model, params, global_adapter, layer_map, layers_prefix, options, seed) as trainable:
        adapter = trainable.adapter
        if resume_state is not None:
            check_resume_start(resume_state, adapter, trainable.start, layer_map, layers_prefix)
            with torch.no_grad():
                for key, p in adapter.items():
                    p.copy_(resume_state.adapter[key].to(dtype=p.dtype, device=p.device))
            theta_global = {k: v.to(device=device, dtype=torch.float32) for k, v in resume_state.global_adapter.items()}
        else:
            theta_global = {k: p.detach().float().clone() for k, p in adapter.items()}
        round_ = _Round(
            model=trainable.model,
            tokenizer=tokenizer,
            dataset=dataset,
            params=params,
            adapter=adapter,
            theta_global=theta_global,
            device=device,
            round_num=round_num,
            seed=seed,
            active=trainable.active,
        )
        settings = _LoopSettings(
            layer_map=layer_map,
            layers_prefix=layers_prefix,
            progress_cb=options.progress_cb,
            checkpoint_dir=options.checkpoint_dir,
            checkpoint_every=options.checkpoint_every,
            max_grad_norm=options.max_grad_norm,
        )
        return _train_loop(round_, settings, resume_state)


def _train_loop(round_: _Round, settings: _LoopSettings, resume_state: TrainCheckpoint | None) -> TrainResult:
    params, dataset, device = round_.params, round_.dataset, round_.device
    trainable = list(round_.adapter.values())
    # No weight decay: it would pull LoRA towards zero, the proximal term pulls it towards the
    # global adapter, which is the regulariser the method asks for.
    optimizer = torch.optim.AdamW(trainable, lr=float(params.learning_rate), weight_decay=0.0)
    mu = float(params.mu)
    losses: list[float] = []
    grad_norms: list[float] = []
    step_seconds: list[float] = []
    answer_tokens = 0
    start_step = 0
    if resume_state is not None:
        restore_optimizer(optimizer, resume_state.optimizer, device)
        set_rng_state(resume_state.rng, device)
        losses, grad_norms = list(resume_state.losses), list(resume_state.grad_norms)
        step_seconds, answer_tokens = list(resume_state.step_seconds), resume_state.answer_tokens
        start_step = resume_state.step
        log.info("resuming round %d at step %d of %d", round_.round_num, start_step, params.local_steps)
    prox_value = 0.0
    label_word_ids = None
    if params.objective == "label_words":
        assert dataset.choices is not None  # checked before LoRA went on
        label_word_ids = torch.tensor(first_answer_tokens(round_.tokenizer, dataset.choices), device=device)
    round_.model.train()
    total_steps = int(params.local_steps)
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        indices = batch_indices(len(dataset), int(params.batch_size), round_.seed, step)
        batch = {k: v.to(device) for k, v in make_batch(dataset, round_.tokenizer, indices, int(params.seq_len)).items()}
        if label_word_ids is None:
            task_loss = round_.model(**batch).loss
        else:
            choices = torch.tensor([dataset.examples[i].label for i in indices], device=device)
            logits = round_.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            task_loss = label_word_loss(logits, batch["labels"], choices, label_word_ids)
        prox = proximal_term(round_.adapter, round_.theta_global)
        loss = task_loss.float() + 0.5 * mu * prox
        if not torch.isfinite(loss):
            raise ModelError(
                f"the training loss became {loss.item()} at step {step + 1} of round {round_.round_num}; "
                f"lower the learning rate (now {params.learning_rate})"
            )
        loss.backward()
        if round_.active is not None:
            # FedKRSO moves one subspace per step: the other coordinates get no gradient, so
            # clipping ignores them and AdamW skips them (no moment or step-count update).
            live = round_.active(step)
            for key, p in round_.adapter.items():
                if key not in live:
                    p.grad = None
        max_norm = settings.max_grad_norm if settings.max_grad_norm is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        losses.append(float(task_loss.detach()))
        grad_norms.append(float(norm))
        step_seconds.append(seconds)
        prox_value = float(prox.detach())
        answer_tokens += int((batch["labels"][:, 1:] != -100).sum())
        done = step + 1
        every = settings.checkpoint_every
        if settings.checkpoint_dir is not None and every > 0 and done % every == 0 and done < total_steps:
            save_checkpoint(
                settings.checkpoint_dir,
                TrainCheckpoint(
                    round_num=round_.round_num,
                    step=done,
                    params=params_dict(params),
                    adapter={k: p.detach() for k, p in round_.adapter.items()},
                    global_adapter=round_.theta_global,
                    optimizer=optimizer_tensors(optimizer, len(trainable)),
                    rng=rng_state(device),
                    losses=tuple(losses),
                    grad_norms=tuple(grad_norms),
                    step_seconds=tuple(step_seconds),
                    answer_tokens=answer_tokens,
                ),
            )
        if settings.progress_cb is not None:
            settings.progress_cb(
                TrainProgress(step=done, total_steps=total_steps, loss=losses[-1], prox=prox_value, seconds=seconds)
            )

    with torch.no_grad():
        sub_delta = {k: (p.detach().float() - round_.theta_global[k]).cpu() for k, p in round_.adapter.items()}
    delta = to_full_keys(sub_delta, settings.layer_map, settings.layers_prefix)
    delta_norm = math.sqrt(sum(float(v.pow(2).sum()) for v in delta.values()))
    metrics = {
        "prox_last": prox_value,
        "steps": float(len(losses)),
        "resumed_from_step": float(start_step),
        "step_seconds_mean": sum(step_seconds) / len(step_seconds) if step_seconds else 0.0,
        "answer_tokens": float(answer_tokens),
        "delta_norm": delta_norm,
        "learning_rate": float(params.learning_rate),
        "mu": mu,
    }
    if losses:  # a zero-step round has no loss to report (and NaN would fail validation)
        metrics.update(
            loss_first=losses[0],
            loss_last=losses[-1],
            loss_mean=sum(losses) / len(losses),
            grad_norm_first=grad_norms[0],
            grad_norm_last=grad_norms[-1],
        )
    return TrainResult(delta=delta, num_examples=len(dataset), metrics=metrics)
