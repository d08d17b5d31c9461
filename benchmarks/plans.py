"""Snapshot the plans of every zoo model, to prove a refactor leaves behaviour unchanged.

For each model of the zoo groups (torchvision CNNs, the timm and segmentation lists, and the
outside models of ``tests/external_models.py``) and each of three modes (default, exact-only,
global ranking with round_to 8), writes the plan's ``params`` and ``groups`` (the settings
block left out: its layout may change) as one JSON file per model and mode into OUT. With
``--compare OLD`` it then lists the files that differ from those in OLD.

    python benchmarks/plans.py out/plans-new --compare out/plans-old
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {"default": {}, "exact": {"exact_only": True},
         "global8": {"global_ranking": True, "round_to": 8}}


def zoo() -> list[tuple[str, object]]:
    """(name, builder) pairs; a builder returns ``(model, inputs)``."""
    import torchvision

    from structprune.front.models import build_model
    from tests.oracles import randomize
    from tests.test_zoo_more import SEGMENTATION, TIMM
    from tests.test_zoo_torchvision import INPUT, MODELS

    def spec(name: str, size: int):
        def build():
            model = randomize(build_model(name).eval())
            return model, (torch.randn(1, 3, size, size, generator=torch.Generator()
                                       .manual_seed(0)),)
        return build

    rows = [(f"torchvision:{n}", spec(f"torchvision:{n}", INPUT.get(n, 64))) for n in MODELS]
    rows += [(f"timm:{n}", spec(f"timm:{n}", 96 if n == "inception_v3" else 64)) for n in TIMM]
    rows += [(f"torchvision:{n}", spec(f"torchvision:{n}", 64)) for n in SEGMENTATION]
    try:
        from tests.external_models import CASES, build
        rows += [(case.name, lambda case=case: build(case)) for case in CASES]
    except ImportError:
        pass
    del torchvision
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--only", default="", help="substring a model name must contain")
    parser.add_argument("--record", type=Path,
                        help="with --compare: write the comparison's counts to this JSON file")
    args = parser.parse_args()

    import structprune as sp

    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in tqdm([r for r in zoo() if args.only in r[0]], desc="plans"):
        try:
            model, inputs = build()
        except Exception as exc:  # noqa: BLE001 - a model this machine cannot build
            print(f"skip {name}: {exc}", file=sys.stderr)
            continue
        for mode, settings in MODES.items():
            path = args.out / f"{name.replace(':', '_').replace('/', '_')}.{mode}.json"
            try:
                plan = sp.prune(model, inputs, 0.5, check=False, **settings).plan
                body = {"params": plan.params, "groups": plan.groups}
            except Exception as exc:  # noqa: BLE001 - a refusal is part of the behaviour
                body = {"refused": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            path.write_text(json.dumps(body, sort_keys=True))
    if args.compare:
        new = {p.name for p in args.out.glob("*.json")}
        old = {p.name for p in args.compare.glob("*.json")}
        differ = sorted(n for n in new & old
                        if (args.out / n).read_bytes() != (args.compare / n).read_bytes())
        print(f"{len(new & old)} plans compared; {len(differ)} differ; "
              f"only new {sorted(new - old)}; only old {sorted(old - new)}")
        for n in differ:
            print("  differs:", n)
        if args.record:
            args.record.write_text(json.dumps({
                "compared": len(new & old), "differ": differ, "only_new": sorted(new - old),
                "only_old": sorted(old - new), "modes": MODES,
                "refused": sorted(n for n in new & old
                                  if "refused" in json.loads((args.out / n).read_text()))},
                indent=1) + "\n")


if __name__ == "__main__":
    main()
