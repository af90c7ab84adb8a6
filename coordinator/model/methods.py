"""The federated fine-tuning methods, as data: one frozen record per method in :data:`METHODS`.

A method says what the coordinator does to the full LLM before and during the run:

* which layers each tier keeps (``keep``): SGP's ranked blocks, a uniform drop, or every layer;
* which layers ODA trains when it pre-aligns a tier (``distils``), and whether it re-aligns
  every ``rounds.realign_every`` rounds (``realigns``);
* where the clients' LoRA adapter sits (``adapter_placement``);
* what the clients train and upload (``update_form``): a LoRA adapter, or FedKRSO's
  coordinates in shared random subspaces (:mod:`shared.subspace`).

The tier builder (:mod:`coordinator.model.tiers`) reads these fields and nothing else, so a
new method is one entry here plus the code its fields name, never a new ``if method == ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from shared.errors import ConfigError
from shared.layermap import blocks_for_depth, kept_layers, uniform_drop_layers


@dataclass(frozen=True)
class LayerChoice:
    """What a method may look at when it picks a tier's layers.

    Attributes:
        num_layers: Layers of the full LLM.
        depth: Layers the tier keeps.
        ranking: SGP blocks in pruning order (empty when the method ranks nothing).
        block_size: Layers per SGP block.
    """

    num_layers: int
    depth: int
    ranking: Sequence[Sequence[int]]
    block_size: int


def sgp_layers(choice: LayerChoice) -> list[int]:
    """FedSODA: prune the first ranked SGP blocks until ``depth`` layers are left (tiers nest)."""
    return kept_layers(choice.num_layers, choice.ranking, blocks_for_depth(choice.num_layers, choice.depth, choice.block_size))


def uniform_layers(choice: LayerChoice) -> list[int]:
    """FedOT: keep the first and last 2 layers and spread the rest evenly over the middle."""
    return uniform_drop_layers(choice.num_layers, choice.depth)


@dataclass(frozen=True)
class Method:
    """One federated fine-tuning method.

    Attributes:
        name: The name users pick (``method = "fedsoda"``).
        summary: One line for help texts and reports.
        keep: Picks a tier's layer map; None means no pruning: the method has one tier that
            keeps every layer, whatever depths the config asks for.
        ranks_blocks: Whether ``keep`` needs the SGP ranking (computed on public text).
        distils: Which layers ODA trains when it pre-aligns a tier: ``"configured"``
            (``alignment.align_layers``), ``"all"``, or None for no distillation.
        realigns: Whether the tiers are re-aligned with the global adapter every
            ``rounds.realign_every`` rounds (training ``alignment.realign_layers``).
        adapter_placement: Where the clients' LoRA adapter sits. ``"every_kept_layer"``: on
            every layer of the client's tier (the client adapts its whole sub-LLM), so the
            global adapter covers the union of the tiers' layers.
        update_form: ``"lora"``: clients train a LoRA adapter and send its delta.
            ``"subspace"``: clients train coordinates along the round's ``subspace.seeds_per_round``
            random subspaces of every target weight matrix and send those (FedKRSO); the global
            state is the accumulated coordinates, exported as one LoRA adapter.
    """

    name: str
    summary: str
    keep: Callable[[LayerChoice], list[int]] | None
    ranks_blocks: bool
    distils: Literal["configured", "all"] | None
    realigns: bool
    adapter_placement: Literal["every_kept_layer"] = "every_kept_layer"
    update_form: Literal["lora", "subspace"] = "lora"

    def depths(self, num_layers: int, configured: Sequence[int]) -> tuple[int, ...]:
        """The depths of the tiers this method builds, deepest last.

        Args:
            num_layers: Layers of the full LLM.
            configured: The run's ``pruning.depths`` (already defaulted).

        Returns:
            Sorted distinct depths.
        """
        if self.keep is None:
            return (num_layers,)
        return tuple(sorted(set(int(d) for d in configured)))

    def layer_map(self, choice: LayerChoice) -> list[int]:
        """The full-LLM layers a tier of ``choice.depth`` keeps under this method."""
        if self.keep is None:
            return list(range(choice.num_layers))
        return self.keep(choice)

    def pre_align_layers(self, configured: str) -> str | None:
        """ODA's ``align_layers`` for pre-alignment (None: this method does not distil).

        Args:
            configured: The run's ``alignment.align_layers``.
        """
        return configured if self.distils == "configured" else self.distils

    def adapted_layers(self, kept: Sequence[int]) -> list[int]:
        """Full-LLM layers the clients of a tier keeping ``kept`` adapt."""
        return [int(i) for i in kept]


FEDSODA = Method(
    name="fedsoda",
    summary="SGP prunes the most similar layer blocks, ODA aligns each tier and re-aligns it every r rounds",
    keep=sgp_layers,
    ranks_blocks=True,
    distils="configured",
    realigns=True,
)
FEDOT = Method(
    name="fedot",
    summary="Offsite-Tuning in FL: uniform layer drop (ends kept), one distillation of every layer",
    keep=uniform_layers,
    ranks_blocks=False,
    distils="all",
    realigns=False,
)
FEDPETUNING = Method(
    name="fedpetuning",
    summary="clients hold the whole (4-bit) model; LoRA on every layer; no pruning, no distillation",
    keep=None,
    ranks_blocks=False,
    distils=None,
    realigns=False,
)

FEDKRSO = Method(
    name="fedkrso",
    summary="clients hold the whole (4-bit) model and tune every target matrix in K shared random subspaces per round",
    keep=None,
    ranks_blocks=False,
    distils=None,
    realigns=False,
    update_form="subspace",
)

METHODS: dict[str, Method] = {m.name: m for m in (FEDSODA, FEDOT, FEDPETUNING, FEDKRSO)}
"""Every method, by name."""


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ConfigError: No method has that name (the message lists them).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {name!r}") from None
