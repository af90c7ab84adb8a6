"""What ``fedsoda-client probe`` and ``fedsoda-coordinator profiles`` show, as data and tables.

The functions here build plain dicts (for ``--json``) and rich tables; they never print: the
``cli.py`` modules do that.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from hardware_profiles.budget import Budget, budget_for
from hardware_profiles.detect import Detection, detect_hardware, process_rss_bytes
from hardware_profiles.memory import describe_bytes
from hardware_profiles.planner import Plan, PlannerOptions, plan_for_profile, plan_tiers
from hardware_profiles.profile import GIB, Catalog, load_catalog
from hardware_profiles.shape import model_shape
from shared.errors import ConfigError, InsufficientMemoryError


def read_ranking(path: str | Path) -> list[list[int]]:
    """Read an SGP ranking: a JSON list of layer lists, or a prune report with ``ranking``.

    Args:
        path: ``[[20], [21, 22], ...]`` or ``{"ranking": [{"layers": [...]}, ...]}`` (the
            ``fedsoda-coordinator prune --json`` report).

    Returns:
        Blocks of full-LLM layer indices in pruning order.

    Raises:
        ConfigError: Missing file or not one of those shapes.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"ranking file {p} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"ranking file {p} is not JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("ranking")
    blocks = []
    for item in data if isinstance(data, list) else [None]:
        layers = item.get("layers") if isinstance(item, dict) else item
        if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
            raise ConfigError(f"ranking file {p}: expected a list of layer-index lists (or a prune report), got {item!r}")
        blocks.append(layers)
    return blocks


def default_ranking(num_layers: int, keep_head: int = 1, keep_tail: int = 1) -> list[list[int]]:
    """A stand-in ranking when the coordinator's SGP ranking is not at hand.

    Single layers, deepest unprotected layer first: deep layers are the most redundant in
    Gromov et al. (2024), and this is the order the uniform-drop baseline comes closest to.

    Args:
        num_layers: Layers of the full model.
        keep_head: Protected first layers.
        keep_tail: Protected last layers.

    Returns:
        Blocks in pruning order.
    """
    return [[i] for i in range(num_layers - keep_tail - 1, keep_head - 1, -1)]


@dataclass(frozen=True)
class ProbeResult:
    """Everything ``fedsoda-client probe`` reports.

    Attributes:
        detection: Measured hardware and matched class.
        budget: The memory budget now.
        model: The model folder planned for, or None.
        ranking_source: Where the ranking came from.
        plan: The plan, or None (no model, or nothing fits).
        plan_error: Why nothing fits, or "".
    """

    detection: Detection
    budget: Budget
    model: str | None
    ranking_source: str
    plan: Plan | None
    plan_error: str

    def to_dict(self) -> dict[str, Any]:
        """Plain types for ``--json``."""
        det = self.detection
        return {
            "profile": dataclasses.asdict(det.profile),
            "device_class": det.device_class.name if det.device_class else None,
            "match_reason": det.match_reason,
            "jetson_model": det.jetson_model,
            "probes": [dataclasses.asdict(p) for p in det.probes],
            "class": dataclasses.asdict(det.device_class) if det.device_class else None,
            "budget": dataclasses.asdict(self.budget),
            "model": self.model,
            "ranking": self.ranking_source,
            "plan": self.plan.to_dict() if self.plan else None,
            "plan_error": self.plan_error,
        }


def run_probe(
    *,
    model: str | Path | None = None,
    override: str | None = None,
    ranking_file: str | Path | None = None,
    options: PlannerOptions | None = None,
    catalog: Catalog | None = None,
) -> ProbeResult:
    """Detect the hardware and, given a model folder, plan its training here.

    Args:
        model: A Hugging Face model folder (its ``config.json`` is read), or None.
        override: Catalog class name to use instead of the match.
        ranking_file: SGP ranking (see :func:`read_ranking`); default :func:`default_ranking`.
        options: Planner options.
        catalog: Catalog (default: the shipped one).

    Returns:
        The :class:`ProbeResult` (``plan_error`` set when nothing fits).

    Raises:
        ConfigError: Unknown override, bad ranking file.
        ModelError: The model's config cannot be read.
    """
    catalog = catalog if catalog is not None else load_catalog()
    detection = detect_hardware(override=override, catalog=catalog)
    # This process already holds torch & co.; the estimate counts them, so add them back.
    budget = budget_for(detection.profile, catalog, process_rss_bytes=process_rss_bytes())
    if model is None:
        return ProbeResult(detection, budget, None, "", None, "")
    shape = model_shape(model)
    if ranking_file is not None:
        ranking, source = read_ranking(ranking_file), str(ranking_file)
    else:
        ranking, source = default_ranking(shape.num_layers), "default (deepest layers first; pass --ranking for SGP's)"
    try:
        plan = plan_for_profile(shape, ranking, budget, options=options)
        return ProbeResult(detection, budget, str(model), source, plan, "")
    except InsufficientMemoryError as exc:
        return ProbeResult(detection, budget, str(model), source, None, str(exc))


def probe_tables(result: ProbeResult) -> list[Table]:
    """Rich tables for a :class:`ProbeResult`: hardware, class, and the plan."""
    det = result.detection
    p = det.profile
    hw = Table(title=f"hardware of {p.name}", show_header=True)
    hw.add_column("probe")
    hw.add_column("status")
    hw.add_column("found")
    colours = {"ok": "green", "absent": "dim", "unknown": "yellow"}
    for probe in det.probes:
        hw.add_row(probe.name, f"[{colours[probe.status]}]{probe.status}[/]", probe.detail)
    hw.add_row("class", "[green]ok[/]" if det.device_class else "[yellow]unknown[/]", f"{p.device_class}: {det.match_reason}")
    hw.add_row("4-bit", "", "yes" if p.supports_4bit else "no")
    hw.add_row("budget", "", f"{describe_bytes(result.budget.bytes)} ({result.budget.source})")
    tables = [hw]
    if result.model is None:
        return tables
    plan_table = Table(title=f"training plan for {result.model}", show_header=False)
    plan_table.add_column("what")
    plan_table.add_column("value")
    plan_table.add_row("ranking", result.ranking_source)
    if result.plan is None:
        plan_table.add_row("[red]does not fit[/]", result.plan_error)
        return tables + [plan_table]
    plan = result.plan
    plan_table.add_row("tier", f"{plan.tier}: keeps {len(plan.keep_layers)} layers, prunes {plan.pruned_blocks} blocks")
    plan_table.add_row("kept layers", ",".join(map(str, plan.keep_layers)))
    plan_table.add_row("precision", plan.precision)
    plan_table.add_row("LoRA rank", str(plan.lora_rank))
    plan_table.add_row("batch", f"{plan.batch_size} x {plan.seq_len} tokens" + (f", {plan.grad_accumulation} accumulation steps" if plan.grad_accumulation > 1 else ""))
    plan_table.add_row("checkpointing", "on" if plan.grad_checkpointing else "off")
    plan_table.add_row("memory", f"{describe_bytes(plan.estimate_bytes)} of {describe_bytes(plan.budget_bytes)}")
    for key, value in plan.breakdown.items():
        plan_table.add_row(f"  {key}", describe_bytes(value))
    if plan.step_seconds is not None:
        plan_table.add_row("step time", f"~{plan.step_seconds:.2f} s (planning figure)")
    return tables + [plan_table]


def catalog_report(
    catalog: Catalog,
    *,
    model: str | Path | None = None,
    ranking_file: str | Path | None = None,
    options: PlannerOptions | None = None,
) -> dict[str, Any]:
    """The catalog as plain data, with each class's plan for a model when one is given.

    Args:
        catalog: The catalog.
        model: Model folder to plan for, or None.
        ranking_file: SGP ranking for the plans (default :func:`default_ranking`).
        options: Planner options.

    Returns:
        ``{"classes": [...], "model": ..., "plans": {name: plan dict or reason}}``.
    """
    out: dict[str, Any] = {
        "classes": [dict(dataclasses.asdict(c), budget_bytes=c.budget_bytes()) for c in catalog],
        "model": str(model) if model else None,
        "plans": {},
    }
    if model is not None:
        shape = model_shape(model)
        ranking = read_ranking(ranking_file) if ranking_file else default_ranking(shape.num_layers)
        plans = plan_tiers(shape, ranking, list(catalog), options=options)
        out["plans"] = {name: (p if isinstance(p, str) else p.to_dict()) for name, p in plans.items()}
    return out


def catalog_table(report: dict[str, Any]) -> Table:
    """A rich table of :func:`catalog_report`'s output."""
    table = Table(title="device catalog" + (f" (plans for {report['model']})" if report["model"] else ""))
    for column, justify in (
        ("class", "left"), ("device", "left"), ("memory", "right"), ("unified", "center"), ("sm", "center"),
        ("4-bit", "center"), ("bf16", "center"), ("TFLOPS", "right"), ("budget", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    if report["model"]:
        table.add_column("plan")
    for c in report["classes"]:
        row = [
            c["name"], c["display_name"], f"{c['memory_gib']:g} GiB", "yes" if c["unified_memory"] else "",
            c["compute_capability"] or "-", "yes" if c["supports_4bit"] else "no", "yes" if c["supports_bf16"] else "no",
            f"{c['sustained_tflops']:g}", f"{c['budget_bytes'] / GIB:.1f} GiB",
        ]
        if report["model"]:
            plan = report["plans"].get(c["name"])
            if isinstance(plan, dict):
                row.append(
                    f"{plan['tier']} {plan['precision']} b{plan['batch_size']}"
                    + (" ckpt" if plan["grad_checkpointing"] else "")
                    + f" ({plan['estimate_bytes'] / GIB:.1f} GiB)"
                )
            else:
                row.append("[red]does not fit[/]")
        table.add_row(*row)
    return table


def planner_options(
    *, batch_size: int, seq_len: int, lora_rank: int, targets: str, precision: str | None, min_batch_size: int | None
) -> PlannerOptions:
    """Planner options from CLI flags (``targets`` comma-separated, ``precision`` one name or None)."""
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not names:
        raise ConfigError("--targets must name at least one module")
    return PlannerOptions(
        precisions=(precision,) if precision else None,  # type: ignore[arg-type]
        lora_rank=lora_rank,
        lora_targets=names,
        batch_size=batch_size,
        min_batch_size=min_batch_size if min_batch_size is not None else batch_size,
        seq_len=seq_len,
    )


__all__: Sequence[str] = (
    "ProbeResult", "catalog_report", "catalog_table", "default_ranking", "planner_options", "probe_tables", "read_ranking", "run_probe",
)
