"""Pictures of a plan: where the channels went."""

from __future__ import annotations

import os
from collections.abc import Mapping

from structprune.core.plan import Plan


def layer_widths(plan: Plan, sizes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, int, int]]:
    """(layer, dense width, kept width) for every weight with two or more axes (convs and
    linear maps, in state_dict order): its output channels, as the plan leaves them."""
    kept = {entry["name"]: len(entry["keep"]) for entry in plan.params if entry["dim"] == 0}
    rows = []
    for name, shape in sizes.items():
        if name.endswith(".weight") and len(shape) >= 2:
            rows.append((name.removesuffix(".weight"), shape[0], kept.get(name, shape[0])))
    return rows


def plot_widths(plan: Plan, sizes: Mapping[str, tuple[int, ...]], path: str | os.PathLike,
                title: str = "") -> None:
    """Bar chart of dense against kept output width per layer (``widths.png``)."""
    from matplotlib.figure import Figure

    rows = layer_widths(plan, sizes)
    figure = Figure(figsize=(max(6.0, 0.22 * len(rows) + 2), 4.5))
    ax = figure.subplots()
    positions = range(len(rows))
    ax.bar(positions, [dense for _, dense, _ in rows], color="#c8d3e0", label="dense")
    ax.bar(positions, [kept for _, _, kept in rows], color="#2b6cb0", label="kept")
    ax.set_xticks(list(positions), [name for name, _, _ in rows], rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    dense_total = sum(dense for _, dense, _ in rows) or 1
    kept_total = sum(kept for _, _, kept in rows)
    ax.set_title(f"{title + ': ' if title else ''}{kept_total} of {dense_total} channels kept "
                 f"({100 * kept_total / dense_total:.0f}%)")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
