"""The coordinator's run configuration: one frozen dataclass tree, loaded from TOML.

Precedence (lowest first): these defaults, the ``--config`` TOML file, ``FEDSODA_*``
environment variables, CLI flags. Unknown keys in the file are errors naming the key.
The training section is :class:`shared.protocol.TrainingParams`, so the wire and the config
never disagree. This module is the coordinator's configuration room: both halves (the model
side, :mod:`coordinator.model`, and the run side, :mod:`coordinator.run`) read it, and it
imports neither, except the method table (:mod:`coordinator.model.methods`, pure data) that
says which method names exist. It also holds the named presets (:data:`PRESETS`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from coordinator.model.methods import METHODS, get_method
from coordinator.model.presets import task_preset
from shared.embedded_broker import LOOPBACK_ONLY, is_loopback_host
from shared.errors import ConfigError
from shared.protocol import MAX_ROUND, TrainingParams
from shared.tasks import TaskSpec

#: ``model.device`` / ``--device`` values (resolved by :mod:`coordinator.model.placement`).
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cuda", "cpu")
#: ``model.dtype`` / ``--dtype`` values.
DTYPE_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundConfig:
    """How rounds are scheduled and closed.

    Attributes:
        rounds: Number of federated rounds (>= 1).
        min_clients: Eligible (accepted at hello, online) clients needed to start a round.
        clients_per_round: Clients selected per round; None selects ``client_fraction`` of
            the eligible ones (at least ``min_clients``), capped at how many are eligible.
        client_fraction: Fraction of eligible clients selected when ``clients_per_round``
            is None, in (0, 1].
        quorum: Reports needed to close a round, as a count; None uses ``quorum_fraction``.
        quorum_fraction: Fraction of the selected clients (rounded up) that must report
            when ``quorum`` is None, in (0, 1].
        round_timeout_s: Seconds from publishing a round to its deadline (> 0); also the
            length of one extension.
        on_deadline_without_quorum: ``"extend"`` moves the deadline by
            ``round_timeout_s`` (up to ``max_extensions`` times, then fails); ``"fail"``
            fails the run at once.
        max_extensions: Extensions allowed per round.
        realign_every: Re-align the sub-LLMs after every r-th aggregation (not after the
            last round); 0 never re-aligns.
        max_wait_s: Seconds the run may wait for ``min_clients`` before failing; None waits
            for ever.
        max_missed: A client online but assigned to this many rounds in a row without
            reporting is no longer waited for: rounds close as soon as the others reported
            (it stays selected, and an update it sends in time counts), until it shows life (a
            report, a new hello, or a late update). So one that never reports cannot stretch
            every round to its deadline; 0 always waits.
    """

    rounds: int
    min_clients: int = 1
    clients_per_round: int | None = None
    client_fraction: float = 1.0
    quorum: int | None = None
    quorum_fraction: float = 0.5
    round_timeout_s: float = 600.0
    on_deadline_without_quorum: Literal["extend", "fail"] = "extend"
    max_extensions: int = 3
    realign_every: int = 0
    max_wait_s: float | None = None
    max_missed: int = 1

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.max_missed < 0:
            problems.append(f"max_missed must be >= 0 (0 = always wait), got {self.max_missed}")
        if not 1 <= self.rounds <= MAX_ROUND:
            problems.append(f"rounds must be in 1..{MAX_ROUND} (clients refuse later rounds), got {self.rounds}")
        if self.min_clients < 1:
            problems.append(f"min_clients must be >= 1, got {self.min_clients}")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            problems.append(f"clients_per_round must be >= 1 or unset, got {self.clients_per_round}")
        if not 0.0 < self.client_fraction <= 1.0:
            problems.append(f"client_fraction must be in (0, 1], got {self.client_fraction}")
        if self.quorum is not None:
            if self.quorum < 1:
                problems.append(f"quorum must be >= 1 or unset, got {self.quorum}")
            # A count quorum larger than a round can ever select would never close a round.
            if self.quorum > self.min_clients:
                problems.append(
                    f"quorum ({self.quorum}) exceeds min_clients ({self.min_clients}): "
                    "raise min_clients or lower quorum"
                )
            if self.clients_per_round is not None and self.quorum > self.clients_per_round:
                problems.append(
                    f"quorum ({self.quorum}) exceeds clients_per_round ({self.clients_per_round})"
                )
        if not 0.0 < self.quorum_fraction <= 1.0:
            problems.append(f"quorum_fraction must be in (0, 1], got {self.quorum_fraction}")
        if not self.round_timeout_s > 0:
            problems.append(f"round_timeout_s must be > 0, got {self.round_timeout_s}")
        if self.on_deadline_without_quorum not in ("extend", "fail"):
            problems.append(
                "on_deadline_without_quorum must be 'extend' or 'fail', "
                f"got {self.on_deadline_without_quorum!r}"
            )
        if self.max_extensions < 0:
            problems.append(f"max_extensions must be >= 0, got {self.max_extensions}")
        if self.realign_every < 0:
            problems.append(f"realign_every must be >= 0 (0 = never), got {self.realign_every}")
        if self.max_wait_s is not None and not self.max_wait_s > 0:
            problems.append(f"max_wait_s must be > 0 or unset, got {self.max_wait_s}")
        if problems:
            raise ConfigError("invalid round config: " + "; ".join(problems))

    def selection_size(self, n_eligible: int) -> int:
        """How many of ``n_eligible`` clients a round selects.

        Args:
            n_eligible: Eligible clients online (>= ``min_clients`` when a round starts).

        Returns:
            The number to select, between 1 and ``n_eligible``.
        """
        if self.clients_per_round is not None:
            k = self.clients_per_round
        else:
            k = max(math.ceil(self.client_fraction * n_eligible), self.min_clients)
        return max(1, min(k, n_eligible))

    def quorum_for(self, n_selected: int) -> int:
        """Reports needed to close a round that selected ``n_selected`` clients.

        Args:
            n_selected: Clients assigned to the round.

        Returns:
            The quorum, between 1 and ``n_selected``.
        """
        q = self.quorum if self.quorum is not None else math.ceil(self.quorum_fraction * n_selected)
        return max(1, min(q, n_selected))


@dataclass(frozen=True)
class ModelSettings:
    """Which full model to start from and the public text used to prune and align it.

    Attributes:
        model: A Hugging Face model folder or id, or ``"bundled"`` (SmolLM2-135M-Instruct).
        public_data: ``"wikipedia"``, ``"owt"`` or a JSONL / text file of public text.
        calibration_samples: Public paragraphs used for SGP and ODA.
        calibration_seq_len: Tokens per calibration sequence.
        task_calibration: Unlabelled public in-domain text, put in the task's prompt template
            (``"Review: ...\nSentiment:"``) and mixed into the calibration set, so distillation
            also restores the next-token distribution where the task reads its answer (a pruned
            model loses it first): ``imdb`` or ``rotten_tomatoes`` (the bundled movie-review
            corpora, labels dropped), a JSONL / text file, or ``""`` for none. Pick a corpus
            other than the clients' (the demo aligns on IMDB reviews for a Rotten Tomatoes task).
        task_calibration_samples: How many task-format prompts to add.
        device: Where the full model, SGP, ODA and evaluation run: ``auto`` (CUDA when a
            GPU is visible), ``cuda`` or ``cpu``.
        dtype: The full model's weight dtype: ``auto`` (bf16 on a GPU that has it, else fp16;
            fp32 on the CPU), ``bf16``, ``fp16`` or ``fp32``.
    """

    model: str = "bundled"
    public_data: str = "wikipedia"
    calibration_samples: int = 64
    calibration_seq_len: int = 128
    task_calibration: str = ""
    task_calibration_samples: int = 32
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in DEVICE_CHOICES:
            raise ConfigError(f"model.device must be one of {', '.join(DEVICE_CHOICES)}; got {self.device!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"model.dtype must be one of {', '.join(DTYPE_CHOICES)}; got {self.dtype!r}")


@dataclass(frozen=True)
class PruningSettings:
    """How sub-LLM tiers are cut from the full model.

    A tier is named after its depth, the number of layers it keeps (``L18`` keeps 18).

    Attributes:
        depths: Layers each tier keeps, e.g. ``[18]`` cuts a 30-layer model to 18 layers and
            ``[12, 18]`` packages two nested tiers. The full depth minus each depth must be a
            multiple of ``block_size``. Empty: one tier of about 60% of the layers. Ignored by
            ``fedpetuning`` and ``fedkrso``, which have a single full-depth tier.
        block_size: n, the layers in one SGP block.
        keep_head: First layers never pruned.
        keep_tail: Last layers never pruned.
        token: SGP distances over ``all`` non-padding tokens or the ``last`` one of each text.
        precision: Weight precision of the packages clients download (``nf4``, ``bf16``, ``fp32``).
        extra_precisions: Further precisions every tier is also published in, for devices that
            cannot run ``precision`` (a Jetson without 4-bit kernels trains the ``bf16``
            package); each is a package of its own (``L18-bf16``), assigned only where the
            primary one does not run or fit. ``simulate --profiles`` adds what its classes need.
        tiers_dir: A ``fedsoda-coordinator prune`` output folder whose tiers the run uses as
            they are (no SGP, no pre-alignment); "" builds the tiers. Its method must be the
            run's; its depths, block size and precision replace the ones above.
    """

    depths: list[int] = field(default_factory=list)
    block_size: int = 1
    keep_head: int = 1
    keep_tail: int = 1
    token: Literal["all", "last"] = "all"
    precision: Literal["nf4", "bf16", "fp32"] = "nf4"
    extra_precisions: list[str] = field(default_factory=list)
    tiers_dir: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.block_size < 1:
            problems.append(f"pruning.block_size must be >= 1, got {self.block_size}")
        if any(d < 1 for d in self.depths):
            problems.append(f"pruning.depths entries must be >= 1, got {self.depths}")
        if len(set(self.depths)) != len(self.depths):
            problems.append(f"pruning.depths has repeated entries: {self.depths}")
        unknown = [p for p in self.extra_precisions if p not in ("nf4", "bf16", "fp32")]
        if unknown:
            problems.append(f"pruning.extra_precisions must be among nf4, bf16, fp32; got {unknown}")
        if self.precision in self.extra_precisions or len(set(self.extra_precisions)) != len(self.extra_precisions):
            problems.append(
                f"pruning.extra_precisions {self.extra_precisions} repeats a precision (or the primary {self.precision!r})"
            )
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class AggregationSettings:
    """How accepted client deltas become the next global adapter.

    Every strategy gets the deltas after the influence bounds
    (``coordinator.run.aggregation.bounds``): one client moves a round by at most
    ``weight_cap x clip`` times the round's median client, whatever it sends.

    Attributes:
        strategy: A registered aggregation strategy (``coordinator.run.aggregation``):
            ``fedavg`` (example-weighted, per key over the clients that hold it),
            ``trimmed_mean`` or ``median`` (coordinate-wise, unweighted; robust to a minority
            of hostile clients).
        weight_cap: A client's weight is at most this multiple of the round's median weight
            (``inf`` disables).
        clip: A delta above this multiple of the round's median L2 norm is scaled down to it
            (``inf`` disables).
        clip_per_key: Clip each adapter key too, against the median norm of its holders.
        min_holders: A key fewer clients than this hold is not changed that round.
        trim_ratio: ``trimmed_mean`` drops ``ceil(trim_ratio x n)`` values at each end.
    """

    strategy: str = "fedavg"
    weight_cap: float = 2.0
    clip: float = 2.0
    clip_per_key: bool = True
    min_holders: int = 1
    trim_ratio: float = 0.2

    def __post_init__(self) -> None:
        problems = [
            f"aggregation.{name} must be a number >= 1 (inf disables it), got {getattr(self, name)!r}"
            for name in ("weight_cap", "clip")
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 1.0)
        ]
        if isinstance(self.min_holders, bool) or not isinstance(self.min_holders, int) or self.min_holders < 1:
            problems.append(f"aggregation.min_holders must be an int >= 1, got {self.min_holders!r}")
        if not 0.0 <= self.trim_ratio < 0.5:
            problems.append(f"aggregation.trim_ratio must be in [0, 0.5), got {self.trim_ratio!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    def strategy_options(self) -> dict[str, float]:
        """Constructor arguments of the chosen strategy."""
        return {"trim_ratio": self.trim_ratio} if self.strategy == "trimmed_mean" else {}


@dataclass(frozen=True)
class AlignmentSettings:
    """ODA distillation settings (see ALGORITHM.md).

    Attributes:
        pre_align_steps: Distillation steps before round 1 (0 disables pre-alignment).
        realign_steps: Steps of each intermittent re-alignment.
        align_layers: ``bridge`` (only the layer after each pruned block trains) or ``all``.
        realign_layers: The same choice for re-alignments. Clients download again every layer
            a re-alignment trains, so ``bridge`` (the default) keeps re-alignment cheap on the
            wire even when pre-alignment trains ``all``.
        alpha: Weight of the logit KL term.
        beta: Weight of the hidden-state alignment term.
        temperature: Distillation temperature tau.
        learning_rate: AdamW learning rate for alignment.
        batch_size: Sequences per alignment step.
        chunk_tokens: Tokens whose logits exist at once in the distillation KL (memory only:
            the loss is the same); lower it for a large vocabulary on a small machine.
    """

    pre_align_steps: int = 30
    realign_steps: int = 10
    align_layers: Literal["bridge", "all"] = "bridge"
    realign_layers: Literal["bridge", "all"] = "bridge"
    alpha: float = 1.0
    beta: float = 1.0
    temperature: float = 2.0
    learning_rate: float = 3e-4
    batch_size: int = 4
    chunk_tokens: int = 256  # coordinator.model.lm_head.DEFAULT_CHUNK_TOKENS (settings import no torch)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_tokens < 1:
            raise ConfigError(
                f"alignment.batch_size and alignment.chunk_tokens must be >= 1, got {self.batch_size} and {self.chunk_tokens}"
            )


@dataclass(frozen=True)
class PrivacySettings:
    """DP-FedAvg with noise added on the clients (distributed Gaussian mechanism).

    Each client clips its delta to ``clip_norm`` and adds Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm / sqrt(n)`` (n: the round's participants), and the round is
    averaged with equal weights, so the average carries the noise of one Gaussian mechanism of
    multiplier ``noise_multiplier`` on a sensitivity of ``clip_norm / n``. The run's report gives
    the privacy budget (epsilon at ``delta``) against anyone who sees only the global adapters,
    and against the coordinator, which sees each update with its own noise only.

    Attributes:
        enabled: Train with DP-FedAvg.
        clip_norm: The L2 bound of each client's delta.
        noise_multiplier: z, the noise of the round's sum in units of ``clip_norm``.
        delta: The delta of the reported (epsilon, delta) budget.
    """

    enabled: bool = False
    clip_norm: float = 0.5
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and self.noise_multiplier > 0 and 0 < self.delta < 1):
            raise ConfigError(
                "privacy.clip_norm and privacy.noise_multiplier must be > 0 and privacy.delta in (0, 1); got "
                f"{self.clip_norm}, {self.noise_multiplier} and {self.delta}"
            )


@dataclass(frozen=True)
class SubspaceSettings:
    """FedKRSO's random subspaces (``method = "fedkrso"``; see :mod:`shared.subspace`).

    Attributes:
        rank: r, dimensions of each seed's subspace per weight matrix.
        seeds_per_round: K, subspaces drawn per round; a client uploads ``K * r`` numbers
            per output row of every target matrix.

    The clients train the coordinates with ``training.learning_rate``, like LoRA: measured
    on the demo preset (README, "FedKRSO"), the LoRA rate 1e-3 did best of 5e-5, 2e-4 and 1e-3.
    """

    rank: int = 4
    seeds_per_round: int = 4

    def __post_init__(self) -> None:
        if self.rank < 1 or not 1 <= self.seeds_per_round <= 64:
            raise ConfigError(
                f"subspace.rank must be >= 1 and subspace.seeds_per_round in 1..64; got {self.rank} and {self.seeds_per_round}"
            )


@dataclass(frozen=True)
class ValidationSettings:
    """Bounds an update must respect to be averaged.

    Attributes:
        max_delta_norm: Largest L2 norm of a whole adapter delta.
        max_examples: Largest example count a client may claim (caps its FedAvg weight).
        hellos_per_second: Hellos the coordinator handles per second, sustained (each may run
            the planner and rewrite the run's files); more are dropped unanswered, and a
            real client says hello again.
        hello_burst: Hellos it handles at once (a fleet starting together).
    """

    max_delta_norm: float = 100.0
    max_examples: int = 1_000_000
    hellos_per_second: float = 20.0
    hello_burst: int = 200

    def __post_init__(self) -> None:
        if not (self.hellos_per_second > 0 and self.hello_burst >= 1):
            raise ConfigError(
                f"validation.hellos_per_second must be > 0 and validation.hello_burst >= 1, got "
                f"{self.hellos_per_second} and {self.hello_burst}"
            )


@dataclass(frozen=True)
class BrokerSettings:
    """Which MQTT broker the run uses and how the coordinator logs in.

    Attributes:
        mode: ``external``: a broker you run, at ``host:port``, logged in to with
            ``username``/``password`` (and TLS files); ``embedded``: the embedded broker in a
            child process, no logins (one-machine runs and trusted networks); ``mosquitto``: a
            local mosquitto in a child process with the per-client logins and ACL of
            ``credentials_dir`` (``fedsoda-coordinator credentials``), and TLS when
            ``server_cert_file`` is set. The coordinator then logs in with its own generated
            user, on a loopback listener.
        host: Broker host (``external``), or the address the started broker listens on
            (``0.0.0.0`` lets other machines in; ``embedded`` takes loopback addresses only,
            as it has no logins).
        port: Broker port; 0 with a started broker picks a free one.
        username: MQTT user name ("" for anonymous); ``external`` only.
        password: MQTT password; ``external`` only.
        ca_file: CA certificate for TLS ("" for plaintext). ``mosquitto`` mode: the CA that
            signed the client certificates when ``require_client_cert``.
        cert_file: Client certificate for mutual TLS (""); ``external`` only.
        key_file: Client key for mutual TLS (""); ``external`` only.
        credentials_dir: The credentials folder of ``fedsoda-coordinator credentials``.
            ``mosquitto`` mode: the broker's logins and ACL ("" = ``~/.config/fedsoda/credentials``);
            ``external`` mode without ``username``: your broker uses its ``passwd`` and ``acl``
            files, and the coordinator logs in with the folder's coordinator login.
        server_cert_file: ``mosquitto`` mode: the broker's TLS certificate (PEM); "" = plaintext.
        server_key_file: ``mosquitto`` mode: its private key (PEM).
        require_client_cert: ``mosquitto`` mode: clients must also present a certificate
            signed by ``ca_file`` (mutual TLS).
        signing_key: The coordinator's Ed25519 signing key file (created if absent), whose
            public key clients pin; "" = ``coordinator-signing.key`` in the credentials folder
            when the broker uses one (one key per coordinator across runs), else
            ``coordinator.key`` in the run directory. ``serve --signing-key``.
    """

    mode: Literal["external", "embedded", "mosquitto"] = "external"
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    credentials_dir: str = ""
    server_cert_file: str = ""
    server_key_file: str = ""
    require_client_cert: bool = False
    signing_key: str = ""

    def __post_init__(self) -> None:
        problems = []
        tls_server = self.server_cert_file or self.server_key_file or self.require_client_cert
        if tls_server and self.mode != "mosquitto":
            problems.append("server_cert_file, server_key_file and require_client_cert apply only to mode = 'mosquitto'")
        if bool(self.server_cert_file) != bool(self.server_key_file):
            problems.append("server_cert_file and server_key_file go together")
        if self.require_client_cert and not (self.server_cert_file and self.ca_file):
            problems.append("require_client_cert needs server_cert_file, server_key_file and ca_file (the clients' CA)")
        if self.mode == "embedded" and not is_loopback_host(self.host):
            problems.append(f"host = {self.host!r} with mode = 'embedded': {LOOPBACK_ONLY}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class TaskSettings:
    """The task the run fine-tunes for (:class:`shared.tasks.TaskSpec`; README, "Bring your own task").

    Start from a built-in ``preset`` and override what differs, or set ``preset = ""`` and
    define the task here. Empty values (and 0) mean "the preset's" (or TaskSpec's default).

    Attributes:
        preset: ``rotten_tomatoes``, ``imdb``, ``medmcqa``, ``gsm_symbolic`` (see
            :mod:`coordinator.model.presets`), or "".
        kind: ``classification``, ``multiple_choice`` or ``generation``.
        prompt_template: ``str.format`` template over the row's fields.
        target_template: The answer the model learns, with ``{answer}``.
        answer_field: The row's label / right option / answer field.
        label_words: Classification: label -> word(s).
        options_field: Multiple choice: the row's list of options.
        metric: ``accuracy``, ``macro_f1`` (classification); ``exact_match``, ``rougeL`` (generation).
        normalizer: Generation exact match: ``none``, ``strip``, ``last_number``.
        max_new_tokens: Generation: the most tokens decoded per answer.
        chat_template: Generation: wrap prompts in the tokenizer's chat template.
        name: The task's name in reports ("" = the preset's name).
    """

    preset: str = "rotten_tomatoes"
    kind: str = ""
    prompt_template: str = ""
    target_template: str = ""
    answer_field: str = ""
    label_words: dict[str, str] = field(default_factory=dict)
    options_field: str = ""
    metric: str = ""
    normalizer: str = ""
    max_new_tokens: int = 0
    chat_template: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        self.spec()  # every problem of the task is a config error at load, not at the first round

    def spec(self) -> TaskSpec:
        """The resolved task: the preset's (or the defaults), with this section's values on top.

        Raises:
            ConfigError: An unknown preset, or a task that does not validate.
        """
        base = task_preset(self.preset) if self.preset else TaskSpec.for_kind(self.kind or "classification", name="custom")
        changes = {
            name: value
            for name, value in dataclasses.asdict(self).items()
            if name != "preset" and value not in ("", 0, {}, False)
        }
        if "kind" in changes and changes["kind"] != base.kind and "metric" not in changes:
            changes["metric"] = ""  # the new kind's default metric, not the preset's
        return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class EvaluationSettings:
    """How the full LLM, each tier and the final adapter are evaluated on the task.

    Attributes:
        enabled: Evaluate at the end of the run (and every ``every_rounds`` rounds).
        test_data: A JSONL / CSV file of test rows in the task's format; "" = the task
            preset's fixed test split.
        test_samples: Test rows scored (0 = all).
        split_seed: Seed of the preset's fixed train/test split.
        max_length: Tokens per scored test prompt; longer prompts lose tokens on the left
            (IMDB reviews run to hundreds of tokens; their end carries the verdict).
        batch_size: Prompts per forward pass (or per batch of greedy decoding).
        tiers: Also evaluate each tier's sub-LLM (its package, as clients load it) with the
            final adapter.
        every_rounds: Evaluate the full model with the global adapter every k rounds on the
            first ``round_samples`` test rows (0 = only at the end): the per-round curve.
        round_samples: Test rows of each per-round evaluation.
        confidence: Level of the reported confidence intervals.
    """

    enabled: bool = True
    test_data: str = ""
    test_samples: int = 300
    split_seed: int = 0
    max_length: int = 512
    batch_size: int = 8
    tiers: bool = True
    every_rounds: int = 0
    round_samples: int = 100
    confidence: float = 0.95

    def __post_init__(self) -> None:
        problems = []
        if self.test_samples < 0 or self.round_samples < 1 or self.every_rounds < 0 or self.batch_size < 1:
            problems.append("evaluation.test_samples and every_rounds must be >= 0, round_samples and batch_size >= 1")
        if not 0.5 <= self.confidence < 1.0:
            problems.append(f"evaluation.confidence must be in [0.5, 1), got {self.confidence}")
        if problems:
            raise ConfigError("; ".join(problems))


def _default_training() -> TrainingParams:
    return TrainingParams(
        local_steps=10,
        learning_rate=3e-4,
        batch_size=4,
        seq_len=64,
        lora_rank=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        mu=0.01,
        seed=0,
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything ``fedsoda-coordinator serve`` needs to run a federated fine-tuning.

    Attributes:
        run_id: Run id (MQTT topic segment; letters, digits, '.', '_', '-').
        seed: Seed for pruning calibration, client selection and adapter init.
        method: The federated method (:data:`coordinator.model.methods.METHODS`): ``fedsoda``
            (SGP + ODA + re-alignment), ``fedot`` (uniform layer drop + one distillation),
            ``fedpetuning`` (the whole model, no pruning) or ``fedkrso`` (the whole model,
            tuned in shared random subspaces).
        model: Full model and calibration text.
        pruning: Sub-LLM tiers.
        alignment: ODA settings.
        rounds: Round scheduling (see :class:`RoundConfig`).
        training: Local training parameters sent to clients each round.
        aggregation: How deltas are combined.
        subspace: FedKRSO's subspaces (used only by ``method = "fedkrso"``).
        privacy: DP-FedAvg (off unless ``privacy.enabled``).
        validation: Update validation bounds.
        broker: MQTT broker.
        task: The task clients train for and the run is judged on.
        evaluation: Evaluation on the task's test data.
    """

    #: Keys earlier versions had, and where their setting went (shown when a file still uses them).
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "pruning.strategy": "the method is now a top-level key: method = \"fedsoda\" (or fedot, fedpetuning)",
        "pruning.tiers": "tiers are now given by the layers they keep: pruning.depths "
        "(the old tiers = [12] on a 30-layer model is depths = [18])",
        "evaluation.task": "the task is now its own section: [task] preset = \"rotten_tomatoes\" (or imdb, "
        "medmcqa, gsm_symbolic, or your own task); evaluation.enabled = false skips evaluation",
    }

    run_id: str = "demo"
    seed: int = 0
    method: str = "fedsoda"
    model: ModelSettings = field(default_factory=ModelSettings)
    pruning: PruningSettings = field(default_factory=PruningSettings)
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)
    rounds: RoundConfig = field(default_factory=lambda: RoundConfig(rounds=3, min_clients=1))
    training: TrainingParams = field(default_factory=_default_training)
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    subspace: SubspaceSettings = field(default_factory=SubspaceSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    task: TaskSettings = field(default_factory=TaskSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"invalid run config: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.training.subspace_seeds or self.training.subspace_rank:
            raise ConfigError(
                "training.subspace_rank and training.subspace_seeds are filled in by the coordinator each round; "
                "set subspace.rank and subspace.seeds_per_round instead"
            )
        if self.training.dp_clip_norm or self.training.dp_noise_multiplier:
            raise ConfigError(
                "training.dp_clip_norm and training.dp_noise_multiplier are filled in by the coordinator; "
                "set [privacy] enabled, clip_norm and noise_multiplier instead"
            )


def effective_config(config: RunConfig) -> RunConfig:
    """Apply what the method implies: only a method that re-aligns keeps ``rounds.realign_every``.

    Args:
        config: The loaded configuration.

    Returns:
        The configuration the run actually uses.
    """
    if not get_method(config.method).realigns and config.rounds.realign_every:
        log.info("method %s does not re-align: ignoring rounds.realign_every", config.method)
        return dataclasses.replace(config, rounds=dataclasses.replace(config.rounds, realign_every=0))
    return config


PRESETS: dict[str, dict[str, Any]] = {
    # `make demo`: the real SmolLM2-135M, SGP + ODA to 18 layers, 4-bit, 3 clients, 3 rounds,
    # sized to finish within 15 minutes on a 2-core CPU (see README, "The demo").
    # Measured on this CPU: ODA ~3.7 s/step (4 x 64 tokens, full teacher), NF4 training of the
    # 18-layer sub-LLM ~2 s/step per client thread, scoring the full model ~0.4 s/sentence.
    # Chosen on the accuracy harness (README, "What the demo shows"): SGP blocks of 4 layers, all
    # kept layers aligned at lr 1e-3, and IMDB reviews in the task's template mixed into the
    # calibration text lift the 18-layer sub-LLM's own zero-shot accuracy from 0.60 to 0.67.
    "demo": {
        "run_id": "demo",
        "method": "fedsoda",
        "model.model": "bundled",
        "model.calibration_samples": 32,
        "model.calibration_seq_len": 64,
        "model.task_calibration": "imdb",
        "model.task_calibration_samples": 32,
        "pruning.block_size": 4,
        "pruning.depths": [18],
        "alignment.pre_align_steps": 10,
        "alignment.realign_steps": 4,
        "alignment.align_layers": "all",
        "alignment.learning_rate": 1e-3,
        "rounds.rounds": 3,
        "rounds.min_clients": 3,
        "rounds.realign_every": 2,
        "rounds.round_timeout_s": 600.0,
        "training.local_steps": 10,
        "training.learning_rate": 1e-3,
        "evaluation.test_samples": 200,
    },
}
"""Named sets of config overrides (dotted key -> value) that ``simulate --preset NAME`` (and
``--demo``, the ``demo`` preset) and the benchmarks start from; flags and ``--set`` apply on top."""


def preset(name: str) -> dict[str, Any]:
    """A copy of the overrides of preset ``name``.

    Raises:
        ConfigError: No preset has that name.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
