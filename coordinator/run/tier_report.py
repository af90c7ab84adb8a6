"""Per-tier results of a run: who trained each published package, at what memory, to what end.

A heterogeneous federation trains several tiers (and a tier in several precisions) in one
run; :func:`tier_rows` folds a loaded report (:func:`coordinator.run.reports.load_report`)
into one row per published package: its clients, layers, precision, bytes, the clients' peak
memory against what the plan estimated, their loss, and the sub-LLM's metric with the final
adapter. :func:`render_tiers` prints them; ``report`` shows them after the client table.
"""

from __future__ import annotations

from typing import Any

from coordinator.run.reports import GIB, MIB, metric_text


def tier_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per published package, deepest first.

    Args:
        data: A loaded report.

    Returns:
        Rows with ``package``, ``tier``, ``precision``, ``layers``, ``package_bytes``,
        ``clients`` (accepted clients assigned it), ``updates`` (accepted updates from them),
        ``peak_rss_bytes`` (the highest peak of those updates), ``estimate_bytes`` (the
        highest plan estimate of those clients), ``estimate_error`` ((estimate - measured) /
        measured, ``None`` without updates), ``loss_first`` / ``loss_last`` (mean over the
        clients' first and last updates, ``None`` without), ``metric`` (the sub-LLM with the
        final adapter, ``None`` when not evaluated).
    """
    assignments = data.get("assignments", {})
    evaluated = ((data.get("results") or {}).get("evaluation") or {}).get("tiers", {})
    per_round = data.get("per_client_round", [])
    rows = []
    for name, tier in data.get("tiers", {}).items():
        clients = sorted(c for c, a in assignments.items() if a.get("accepted") and a.get("tier") == name)
        updates = [r for r in per_round if r["client_id"] in clients]
        peak = max((int(r["peak_rss_bytes"]) for r in updates), default=0)
        estimate = max((int(assignments[c].get("estimate_bytes") or 0) for c in clients), default=0)
        firsts, lasts = _first_and_last_losses(updates)
        rows.append({
            "package": name,
            "tier": tier.get("tier", name),
            "precision": tier.get("precision", ""),
            "layers": tier["layers"],
            "package_bytes": tier["package_bytes"],
            "clients": clients,
            "updates": len(updates),
            "peak_rss_bytes": peak,
            "estimate_bytes": estimate,
            "estimate_error": (estimate - peak) / peak if peak and estimate else None,
            "loss_first": _mean_or_none(firsts),
            "loss_last": _mean_or_none(lasts),
            "metric": evaluated.get(name),
        })
    return sorted(rows, key=lambda r: (-r["layers"], r["package"]))


def _first_and_last_losses(updates: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Each client's loss at the start of its first update and at the end of its last one."""
    firsts, lasts = [], []
    for client in sorted({u["client_id"] for u in updates}):
        mine = sorted((u for u in updates if u["client_id"] == client), key=lambda u: u["round"])
        if mine[0]["loss_first"] is not None:
            firsts.append(float(mine[0]["loss_first"]))
        if mine[-1]["loss_last"] is not None:
            lasts.append(float(mine[-1]["loss_last"]))
    return firsts, lasts


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def render_tiers(data: dict[str, Any]) -> None:
    """Print :func:`tier_rows` as a rich table, with the full model's metric at the end.

    Args:
        data: A loaded report.
    """
    from rich import box
    from rich.table import Table

    from shared.console import console

    table = Table(title="tiers (memory: highest client peak against its plan's estimate)", box=box.SIMPLE_HEAD)
    for col in ("package", "layers", "precision", "MiB", "clients", "updates", "peak GiB", "plan GiB", "error", "loss", "metric + adapter"):
        table.add_column(col, justify="left" if col in ("package", "precision", "clients", "metric + adapter") else "right")
    for row in tier_rows(data):
        loss = f"{row['loss_first']:.2f}>{row['loss_last']:.2f}" if row["loss_first"] is not None and row["loss_last"] is not None else "-"
        table.add_row(
            row["package"], str(row["layers"]), row["precision"], f"{row['package_bytes'] / MIB:.1f}",
            ", ".join(row["clients"]) or "-", str(row["updates"]),
            f"{row['peak_rss_bytes'] / GIB:.2f}" if row["peak_rss_bytes"] else "-",
            f"{row['estimate_bytes'] / GIB:.2f}" if row["estimate_bytes"] else "-",
            f"{row['estimate_error']:+.1%}" if row["estimate_error"] is not None else "-",
            loss, metric_text(row["metric"]) if row["metric"] else "-",
        )
    console.print(table)
    evaluation = (data.get("results") or {}).get("evaluation")
    if evaluation:
        console.print(f"full LLM + final adapter: {metric_text(evaluation['after'])} (before {metric_text(evaluation['before'])})")
