"""The coordinator's run configuration: one frozen dataclass tree, loaded from TOML.

Precedence (lowest first): these defaults, the ``--config`` TOML file, ``FEDSODA_*``
environment variables, CLI flags. Unknown keys in the file are errors naming the key.
The round and training sections reuse :class:`coordinator.rounds.RoundConfig` and
:class:`shared.protocol.TrainingParams`, so the wire and the config never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from coordinator.rounds import RoundConfig
from shared.errors import ConfigError
from shared.protocol import TrainingParams

Strategy = Literal["fedsoda", "fedot", "fedpetuning"]
STRATEGIES: tuple[str, ...] = ("fedsoda", "fedot", "fedpetuning")


@dataclass(frozen=True)
class ModelSettings:
    """Which full model to start from and the public text used to prune and align it.

    Attributes:
        model: A Hugging Face model folder or id, or ``"bundled"`` (SmolLM2-135M-Instruct).
        public_data: ``"wikipedia"``, ``"owt"`` or a JSONL / text file of public text.
        calibration_samples: Public paragraphs used for SGP and ODA.
        calibration_seq_len: Tokens per calibration sequence.
    """

    model: str = "bundled"
    public_data: str = "wikipedia"
    calibration_samples: int = 64
    calibration_seq_len: int = 128


@dataclass(frozen=True)
class PruningSettings:
    """How sub-LLM tiers are cut from the full model.

    Attributes:
        strategy: ``fedsoda`` (SGP + ODA + re-alignment), ``fedot`` (uniform layer drop + one
            distillation) or ``fedpetuning`` (the whole model, no pruning).
        block_size: n, the layers in one SGP block.
        tiers: Layers pruned per tier, e.g. ``[12]`` cuts 30 -> 18 layers. Each must be a
            multiple of ``block_size``; tiers nest (a tier prunes a superset of a larger one).
            Ignored by ``fedpetuning``, which has a single full-depth tier.
        keep_head: First layers never pruned.
        keep_tail: Last layers never pruned.
        precision: Weight precision of the packages clients download (``nf4``, ``bf16``, ``fp32``).
    """

    strategy: Strategy = "fedsoda"
    block_size: int = 1
    tiers: list[int] = field(default_factory=lambda: [12])
    keep_head: int = 1
    keep_tail: int = 1
    precision: Literal["nf4", "bf16", "fp32"] = "nf4"


@dataclass(frozen=True)
class AlignmentSettings:
    """ODA distillation settings (see ALGORITHM.md).

    Attributes:
        pre_align_steps: Distillation steps before round 1 (0 disables pre-alignment).
        realign_steps: Steps of each intermittent re-alignment.
        align_layers: ``bridge`` (only the layer after each pruned block trains) or ``all``.
        alpha: Weight of the logit KL term.
        beta: Weight of the hidden-state alignment term.
        temperature: Distillation temperature tau.
        learning_rate: AdamW learning rate for alignment.
        batch_size: Sequences per alignment step.
    """

    pre_align_steps: int = 30
    realign_steps: int = 10
    align_layers: Literal["bridge", "all"] = "bridge"
    alpha: float = 1.0
    beta: float = 1.0
    temperature: float = 2.0
    learning_rate: float = 3e-4
    batch_size: int = 4


@dataclass(frozen=True)
class ValidationSettings:
    """Bounds an update must respect to be averaged.

    Attributes:
        max_delta_norm: Largest L2 norm of a whole adapter delta.
        max_examples: Largest example count a client may claim (caps its FedAvg weight).
    """

    max_delta_norm: float = 100.0
    max_examples: int = 1_000_000


@dataclass(frozen=True)
class BrokerSettings:
    """Where the MQTT broker is and how to log in.

    Attributes:
        host: Broker host; ignored when ``embedded``.
        port: Broker port; 0 with ``embedded`` picks a free one.
        embedded: Start the embedded broker in a child process (one-machine runs).
        username: MQTT user name ("" for anonymous).
        password: MQTT password.
        ca_file: CA certificate for TLS ("" for plaintext).
        cert_file: Client certificate for mutual TLS ("").
        key_file: Client key for mutual TLS ("").
    """

    host: str = "127.0.0.1"
    port: int = 1883
    embedded: bool = False
    username: str = ""
    password: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class EvaluationSettings:
    """How the full LLM + final adapter is evaluated.

    Attributes:
        task: ``rotten_tomatoes``, ``imdb``, or ``""`` to skip evaluation.
        test_samples: Test examples scored (0 = the whole test split).
        split_seed: Seed of the fixed train/test split.
    """

    task: str = "rotten_tomatoes"
    test_samples: int = 300
    split_seed: int = 0


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
        model: Full model and calibration text.
        pruning: Sub-LLM tiers.
        alignment: ODA settings.
        rounds: Round scheduling (see :class:`coordinator.rounds.RoundConfig`).
        training: Local training parameters sent to clients each round.
        validation: Update validation bounds.
        broker: MQTT broker.
        evaluation: Final evaluation.
    """

    run_id: str = "demo"
    seed: int = 0
    model: ModelSettings = field(default_factory=ModelSettings)
    pruning: PruningSettings = field(default_factory=PruningSettings)
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)
    rounds: RoundConfig = field(default_factory=lambda: RoundConfig(rounds=3, min_clients=1))
    training: TrainingParams = field(default_factory=_default_training)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def __post_init__(self) -> None:
        problems = []
        if self.pruning.strategy not in STRATEGIES:
            problems.append(f"pruning.strategy must be one of {', '.join(STRATEGIES)}, got {self.pruning.strategy!r}")
        for pruned in self.pruning.tiers:
            if pruned < 1 or pruned % self.pruning.block_size:
                problems.append(
                    f"pruning.tiers entry {pruned} must be a positive multiple of block_size {self.pruning.block_size}"
                )
        if len(set(self.pruning.tiers)) != len(self.pruning.tiers):
            problems.append(f"pruning.tiers has repeated entries: {self.pruning.tiers}")
        if problems:
            raise ConfigError("invalid run config: " + "; ".join(problems))
