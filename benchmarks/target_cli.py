"""A speed goal through the command line, checked by `structprune bench` afterwards.

Runs, as a user would,

    structprune prune torchvision:resnet50 --target ort-cpu --threads T --target-speedup 2 \
        --exporter torchscript --out OUT
    structprune bench OUT --batch 1 --threads T --no-openvino --repeats 20

and records `prune`'s own measurement (``report.json``'s ``target``) beside `bench`'s
interleaved pairs. Writes ``benchmarks/results/target_resnet50_speedup2_cpu<cores>.json``;
``benchmarks/tables.py`` renders it.

    python benchmarks/target_cli.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="structprune-target-cli-") as tmp:
        out = Path(tmp) / "out"
        commands = [
            ["prune", args.model, "--target", "ort-cpu", "--threads", str(args.threads),
             "--target-speedup", f"{args.speedup:g}", "--exporter", "torchscript",
             "--out", str(out)],
            ["bench", str(out), "--batch", "1", "--threads", str(args.threads),
             "--no-openvino", "--repeats", "20"]]
        for command in commands:
            subprocess.run([sys.executable, "-c",
                            "import sys; from structprune.front.cli import main; sys.exit(main())",
                            *command], check=True)
        report = json.loads((out / "report.json").read_text())
        bench = json.loads((out / "bench.json").read_text())
    result = {"commands": ["structprune " + " ".join(c).replace(str(out), "OUT")
                           for c in commands],
              "macs_ratio": report["macs_ratio"], "target": report["target"], "bench": bench}
    path = Path(args.out or ROOT / "results" /
                f"target_resnet50_speedup2_cpu{os.cpu_count()}.json")
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    cell = bench["cells"][0]
    print(f"prune: {report['target']['measured']['speedup']:.2f}x; bench: "
          f"{cell['speedup']:.2f}x ({cell['speedup_p10']:.2f}-{cell['speedup_p90']:.2f}); "
          f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
