"""Coverage of outside model zoos: ultralytics YOLO, segmentation-models-pytorch, and
torchvision's detection pieces and RAFT, pruned end to end at ratio 0.5, exact-only.

Every model (random weights, nothing downloaded; listed in ``tests/external_models.py``) goes
through ``structprune.front.workflow.prune_to_dir``: prune, verify against the masked dense model,
export dense and pruned ONNX, check ONNX Runtime against torch. Each row records the status
(pruned, refused with its one-line reason, or crashed), the capture path, MACs kept, groups
pruned and blocked, the verification and ONNX errors and the seconds taken.

    python benchmarks/coverage_external.py     # writes benchmarks/results/coverage_external.json
    python benchmarks/coverage_external.py --models yolov8n,Unet/resnet18 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # for tests.external_models

from tests.external_models import CASES, Case, run  # noqa: E402

PACKAGES = {"ultralytics": "ultralytics", "smp": "segmentation_models_pytorch"}


def available(case: Case) -> bool:
    return case.needs is None or importlib.util.find_spec(PACKAGES[case.needs]) is not None


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "torchvision", "ultralytics", "segmentation_models_pytorch", "timm",
                 "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated substrings of model names (default: all)")
    parser.add_argument("--out", default=str(ROOT / "results" / "coverage_external.json"))
    args = parser.parse_args()
    wanted = args.models.split(",") if args.models else None
    rows = []
    for case in CASES:
        if wanted and not any(w in case.name for w in wanted):
            continue
        if not available(case):
            print(f"{case.name:44s} skipped ({case.needs} is not installed)", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = run(case, Path(tmp) / "out")
        rows.append(row)
        detail = (f"MACs kept {row['macs_ratio']:.1%}, {row['capture']}, verify "
                  f"{row['verify_rel_error']:.1e}, onnx {row['onnx_rel_error']:.1e}"
                  if row["status"] == "pruned" else row["reason"][:150])
        print(f"{case.name:44s} {row['status']:8s} {row['seconds']:6.1f}s  {detail}",
              flush=True)
    try:
        from structprune.deploy.bench import machine

        info = machine()
    except ImportError:
        info = {}
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pruned", "refused", "crashed")}
    data = {"what": __doc__.splitlines()[0], "date": dt.date.today().isoformat(),
            "ratio": 0.5, "exact_only": True, "machine": info, "versions": versions(),
            "models": len(rows), "counts": counts,
            "seconds": sum(r["seconds"] for r in rows), "rows": rows}
    Path(args.out).write_text(json.dumps(data, indent=1, default=float) + "\n")
    print(f"{counts} of {len(rows)} in {data['seconds']:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
