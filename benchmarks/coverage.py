"""Coverage over the torchvision CNN zoo: structprune against Torch-Pruning at ratio 0.5.

For every torchvision CNN (random weights, 64x64 input, 224 for inception_v3's aux head):

- structprune: ``prune(exact_only=True)``; counted as correct when the pruned model equals
  the masked dense model (its built-in check) and output shapes are unchanged;
- Torch-Pruning: ``MagnitudePruner`` (L2, classifier ignored) construction and ``step()``;
  counted as running when it does not raise and the pruned model keeps the output shapes.
  (Whether its result also equals the masked dense model needs the index bookkeeping
  described in ANCHORS.md; ``tests/test_torch_pruning.py`` does that on four models.)

    python benchmarks/coverage.py          # writes benchmarks/results/coverage_torchvision.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

import structprune as sp
from structprune.core.verify import flatten_outputs

ROOT = Path(__file__).resolve().parent
NOT_CNN = ("vit_", "swin_", "maxvit")


def shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(t.shape) for t in flatten_outputs(model.eval()(x))]


def run_structprune(model: nn.Module, x: torch.Tensor) -> dict:
    t = time.perf_counter()
    try:
        result = sp.prune(model, (x,), 0.5, exact_only=True)
    except sp.StructPruneError as exc:
        return {"ok": False, "error": str(exc)[:200]}
    ok = result.verification.ok and shapes(result.model, x) == shapes(model, x)
    return {"ok": ok, "macs_ratio": result.figures["macs_ratio"],
            "rel_error": result.verification.max_rel_error, "seconds": time.perf_counter() - t}


def run_torch_pruning(model: nn.Module, x: torch.Tensor) -> dict:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    dense_shapes = shapes(model, x)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(
                model, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=0.5, ignored_layers=head)
            pruner.step()
        seconds = time.perf_counter() - t
        ok = shapes(model, x) == dense_shapes
        macs = tp.utils.count_ops_and_params(model, x)[0]
        return {"ok": ok, "seconds": seconds, "macs": macs,
                **({} if ok else {"error": "output shapes changed"})}
    except Exception as exc:  # noqa: BLE001 - a crash is what is being counted
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated (default: all CNNs)")
    parser.add_argument("--out", default=str(ROOT / "results" / "coverage_torchvision.json"))
    args = parser.parse_args()
    names = args.models.split(",") if args.models else sorted(
        n for n in torchvision.models.list_models(module=torchvision.models)
        if not n.startswith(NOT_CNN))
    rows = []
    for name in names:
        torch.manual_seed(0)
        kwargs = {"weights": None}
        if name in ("googlenet", "inception_v3"):
            kwargs["init_weights"] = False
        model = torchvision.models.get_model(name, **kwargs).eval()
        x = torch.randn(1, 3, 299 if name == "inception_v3" else 64,
                        299 if name == "inception_v3" else 64)
        row = {"model": name, "structprune": run_structprune(model, x),
               "torch_pruning": run_torch_pruning(model, x)}
        rows.append(row)
        print(f"{name:24s} structprune {'ok ' if row['structprune']['ok'] else 'NO '} "
              f"torch-pruning {'ok' if row['torch_pruning']['ok'] else 'NO: ' + row['torch_pruning'].get('error', '')[:80]}",
              flush=True)
    summary = {tool: sum(r[tool]["ok"] for r in rows) for tool in ("structprune", "torch_pruning")}
    data = {"what": __doc__.splitlines()[0], "date": dt.date.today().isoformat(),
            "models": len(rows), "ok": summary, "rows": rows}
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"{summary} of {len(rows)}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
