"""How the commands print: aligned tables, human-sized numbers, accuracy rows."""

from __future__ import annotations

from typing import Any


def table(rows: list[tuple[str, ...]]) -> str:
    """``rows`` as aligned columns: the first row is the header, underlined; the first
    column is left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(row)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human(n: float) -> str:
    """``n`` with a G, M or K suffix and two decimals (138.36M)."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """A header and the accuracy, macro F1 and lowest class recall of ``metrics["dense"]``
    and ``metrics["pruned"]`` (:meth:`Metrics.to_json` data), for :func:`table`."""
    d, p = metrics["dense"], metrics["pruned"]
    return [("", "dense", "pruned"),
            ("top-1 accuracy", f"{100 * d['accuracy']:.2f}%", f"{100 * p['accuracy']:.2f}%"),
            ("macro F1", f"{d['macro_f1']:.4f}", f"{p['macro_f1']:.4f}"),
            ("lowest class recall", f"{min(d['recall']):.3f}", f"{min(p['recall']):.3f}")]


__all__ = ["human", "metric_rows", "table"]
