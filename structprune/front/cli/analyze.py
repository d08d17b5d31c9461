"""``structprune analyze``: a model's pruning groups, what is left unpruned, and why."""

from __future__ import annotations

import argparse
import json
from typing import Any

from structprune.config import PruneConfig
from structprune.core.prepare import prepare
from structprune.front.cli.arguments import model_and_inputs, model_args

HELP = "list pruning groups and what is left unpruned, and why"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("analyze", help=HELP)
    model_args(p)
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    return p


def handle(args: argparse.Namespace) -> int:
    model, inputs = model_and_inputs(args)
    # the groups prune sees: literals settled on a torch.export capture
    analysis = prepare(model, inputs, PruneConfig(capture_method=args.capture),
                       scored=False).analysis
    summary = analysis.summary()
    if args.json:
        print(json.dumps({"summary": summary, "groups": [g.to_json() for g in analysis.groups]},
                         indent=1))
        return 0
    print(f"structprune: {args.spec} (captured with {summary['capture']})")
    print(f"{summary['groups']} groups: {summary['exact_groups']} exact, "
          f"{summary['approximate_groups']} approximate, {summary['blocked_groups']} blocked")
    for g in analysis.groups:
        lead = ", ".join(f"{n}:{d}" for n, d in g.members[:3])
        more = f" +{len(g.members) - 3}" if len(g.members) > 3 else ""
        print(f"  [{g.index:3d}] {g.status:11s} {g.size:5d} units  {lead}{more}")
        for reason, nodes in g.reasons.items():
            print(f"        {reason} (at {', '.join(sorted(set(nodes))[:3])})")
    return 0


__all__ = ["HELP", "add_parser", "handle"]
