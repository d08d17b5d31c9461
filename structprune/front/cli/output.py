"""How the commands print: aligned tables, human-sized numbers, accuracy rows, fidelity."""

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


def fidelity_line(f: dict[str, Any]) -> str:
    """One line of a pruned model's fidelity to the dense one
    (:func:`structprune.accuracy.evaluate.fidelity` data)."""
    parts = []
    if f.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {100 * f['top1_agreement']:.2f}%")
    errors = f["rel_error"]
    worst = max(errors, key=errors.get)
    parts.append(f"relative output error {errors[worst]:.2e}" if len(errors) == 1 else
                 f"relative output error up to {errors[worst]:.2e} ({worst} of {len(errors)})")
    if "box_map50" in f:
        parts.append(f"box mAP not computed: {f['box_map_skipped']}" if f["box_map50"] is None
                     else f"box mAP50 {f['box_map50']:.3f}, mAP50-95 {f['box_map50_95']:.3f} "
                          f"({f['pruned_boxes']} pruned boxes against {f['dense_boxes']} dense)")
    return f"fidelity to the dense model on {f['samples']} samples: " + "; ".join(parts)


def yolo_rows(record: dict[str, Any], columns: tuple[str, ...] = ("dense", "before", "after"),
              ) -> list[tuple[str, ...]]:
    """Table rows of ultralytics' mAP for the models of ``record`` that were measured."""
    present = [c for c in columns if record.get(c)]
    header = {"dense": "dense", "before": "pruned before", "after": "pruned after",
              "pruned": "pruned"}
    rows = [("", *(header.get(c, c) for c in present))]
    for kind in ("box", "mask", "pose"):
        if any(kind in record[c] for c in present):
            for metric in ("mAP50", "mAP50-95"):
                rows.append((f"{kind} {metric}",
                             *(f"{record[c][kind][metric]:.4f}" if kind in record[c] else "-"
                               for c in present)))
    return rows


__all__ = ["fidelity_line", "human", "metric_rows", "table", "yolo_rows"]
