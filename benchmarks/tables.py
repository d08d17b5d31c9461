"""Render the result tables of the docs site from the JSON files in benchmarks/results/.

    python benchmarks/tables.py               # print every table
    python benchmarks/tables.py --plots       # redraw the plots in benchmarks/results/
    python benchmarks/tables.py --docs DIR    # write the result pages into DIR

The docs build (docs/gen_pages.py) calls :func:`pages` and :func:`images` itself, so the
site's results always match the JSON; nothing generated is kept in the tree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
VARIANTS = [("structprune", "structprune"), ("structprune_r8", "structprune, round_to 8"),
            ("structprune_auto", "structprune, round_to auto"),
            ("torch_pruning", "Torch-Pruning"), ("torch_pruning_r8", "Torch-Pruning, round_to 8")]


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def pass_time() -> str:
    data = load("pass_time_cpu.json")
    if not data:
        return ""
    lines = [f"## Pass time against Torch-Pruning ({data['machine'].get('cpu', '?')}, "
             f"{data['machine'].get('cores', '?')} cores, ratio 0.5, 224x224, median of "
             f"{data.get('repeats', 3)} warm runs)", "",
             "| model | structprune pass (copy) | in place | Torch-Pruning (in place) "
             "| speed-up (copy / in place) | MACs kept (sp / TP) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in data["models"].items():
        sp_, tp = row["structprune"], row["torch_pruning"]
        inplace = row.get("structprune_inplace")
        inplace_s = f"{inplace['pass_median_s']:.3f} s" if inplace else "-"
        inplace_x = f" / {row['speedup_pass_inplace']:.1f}x" if inplace else ""
        lines.append(f"| {name} | {sp_['pass_median_s']:.3f} s | {inplace_s} "
                     f"| {tp['pass_median_s']:.3f} s | {row['speedup_pass']:.1f}x{inplace_x} "
                     f"| {sp_['macs_ratio']:.3f} / {tp['macs_ratio']:.3f} |")
    lines += ["", "Where structprune's pass goes (median ms per stage; the last column is the time to "
              "read every weight once, a floor under any magnitude score):", "",
              "| model | capture | analyse | score | plan | apply | weights read once |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in data["models"].items():
        stages = row["structprune"]["stage_median_s"]
        cells = " | ".join(f"{1000 * stages[k]:.1f}"
                           for k in ("capture", "analyse", "score", "plan", "apply"))
        read = row.get("weights_read_once_s")
        lines.append(f"| {name} | {cells} | {1000 * read:.1f} |" if read is not None
                     else f"| {name} | {cells} | - |")
    return "\n".join(lines)


def capture_paths() -> str:
    data = load("capture_paths_cpu.json")
    if not data:
        return ""
    machine = data.get("machine", {})
    lines = [f"## Pass time by capture path ({machine.get('cpu', '?')}, "
             f"{machine.get('cores', '?')} cores, 224x224)", "",
             "| model | capture | pass | of which capture | MACs kept |", "|---|---|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['spec']} | {r['capture']} | {r['pass_median_s']:.3f} s | "
                     f"{r['stage_median_s']['capture']:.3f} s | {r['macs_ratio']:.3f} |")
    return "\n".join(lines)


def gpu_latency() -> str:
    data = load("latency_h100.json")
    if not data:
        return ""
    m = data["machine"]
    lines = [f"## GPU latency: speed-up over dense on {m.get('gpu')} (torch {m.get('torch')}, "
             "fp16, channels_last, CUDA graphs, batch 64)", "",
             "| model | ratio | " + " | ".join(label for _, label in VARIANTS) + " |",
             "|---|---:|" + "---:|" * len(VARIANTS)]
    slower = {key: [0, 0] for key, _ in VARIANTS}
    for row in data["rows"]:
        for cell in ("gpu_fp16_bs64_ms", "gpu_fp16_bs1_ms"):
            dense = row[cell]["dense"]["median"]
            for key, _ in VARIANTS:
                if key in row[cell]:
                    slower[key][1] += 1
                    slower[key][0] += dense / row[cell][key]["median"] < 1.0
        t = row["gpu_fp16_bs64_ms"]
        dense = t["dense"]["median"]
        cells = []
        for key, _ in VARIANTS:
            if key not in t:
                cells.append("-")
                continue
            speed = dense / t[key]["median"]
            kept = row["macs"][key] / row["macs"]["dense"]
            mark = "**" if speed < 1 else ""
            cells.append(f"{mark}{speed:.2f}x{mark} ({100 * kept:.0f}%)")
        lines.append(f"| {row['model']} | {row['ratio']} | " + " | ".join(cells) + " |")
    lines += ["", "In brackets: MACs kept. Bold: slower than the dense model. Cells slower than "
              "dense, over batch 64 and batch 1: " +
              ", ".join(f"{label} {slower[key][0]} of {slower[key][1]}"
                        for key, label in VARIANTS if slower[key][1]) + "."]
    return "\n".join(lines)


def cpu_latency(name: str, tuned_here: bool) -> str:
    data = load(name)
    if not data:
        return ""
    m = data["machine"]
    # round_to auto is shown only where it was tuned on this runtime (not on the GPU host)
    variants = [v for v in VARIANTS if tuned_here or v[0] != "structprune_auto"]
    lines = [f"## ONNX Runtime CPU latency at ratio 0.5 ({m.get('cpu')}, {m.get('cores')} cores, "
             f"onnxruntime {m.get('onnxruntime')}, batch 1)", "",
             "| model | threads | dense | " + " | ".join(label for _, label in variants) +
             " | ideal (MACs) |", "|---|---:|---:|" + "---:|" * (len(variants) + 1)]
    for row in data["rows"]:
        for cell in sorted(k for k in row if k.startswith("ort_cpu")):
            t = row[cell]
            dense = t["dense"]["median"]
            threads = cell[len("ort_cpu"):].split("_")[0]
            cells = [f"{dense / t[k]['median']:.2f}x" if k in t else "-" for k, _ in variants]
            ideal = row["macs"]["dense"] / row["macs"]["structprune"]
            lines.append(f"| {row['model']} | {threads} | {dense:.1f} ms | " + " | ".join(cells)
                         + f" | {ideal:.2f}x |")
    return "\n".join(lines)


def scale() -> str:
    data = load("scale_cpu.json")
    if not data:
        return ""
    repeats = data.get("repeats", 1)
    runs = "one run each" if repeats == 1 else f"median of {repeats} runs each"
    baseline = data.get("baseline")
    lines = [f"## Scale (2-core CPU, 224x224, ratio 0.5, {runs} in a fresh process)", ""]
    collector = all("collector_runs_s" in r for r in data["rows"])
    # the table as recorded the day #13 was filed, kept beside the runs
    recorded = load(f"scale_cpu_{baseline}.json") if baseline else None
    recorded_pass = {r["model"]: r["pass_s"] for r in recorded["rows"]} if recorded else {}
    head = "| model | graph nodes | parameters | pass (spread) |"
    rule = "|---|---:|---:|---:|"
    if collector:
        head += " of it the collector |"
        rule += "---:|"
    head += " peak memory |"
    rule += "---:|"
    if baseline:
        head += f" {baseline} pass (spread) | ratio |"
        rule += "---:|---:|"
        if collector:
            head += " ratio without the collector |"
            rule += "---:|"
        if recorded_pass:
            head += f" against {baseline}'s recorded table |"
            rule += "---:|"
    lines += [head, rule]
    for r in data["rows"]:
        passes = r.get("pass_runs_s", [r["pass_s"]])
        line = (f"| {r['model']} | {r['nodes']} | {r['params'] / 1e6:.1f}M | "
                f"{r['pass_s']:.2f} s ({min(passes):.2f}-{max(passes):.2f}) |")
        if collector:
            line += f" {np.median(r['collector_runs_s']):.2f} s |"
        line += f" {r['peak_rss_gib']:.2f} GiB |"
        if baseline and "baseline" in r:
            base = r["baseline"]
            line += (f" {base['pass_s']:.2f} s ({min(base['pass_runs_s']):.2f}-"
                     f"{max(base['pass_runs_s']):.2f}) | {r['ratio_to_baseline']:.2f}x |")
            if collector:
                line += f" {r['work_ratio_to_baseline']:.2f}x |"
            if recorded_pass:
                line += (f" {r['pass_s'] / recorded_pass[r['model']]:.2f}x |"
                         if r["model"] in recorded_pass else " - |")
        lines.append(line)
    if baseline:
        lines += ["", f"The {baseline} columns are that commit's code, run alternately with this "
                      "one, run by run, on the same machine; ratio is this pass over its pass. "
                      f"Run: `git worktree add /tmp/base {baseline}`, then `python "
                      f"benchmarks/scale.py --repeats {repeats} --baseline /tmp/base "
                      f"--baseline-label {baseline}`."]
    recheck = load("scale_cpu_recheck.json")
    if recheck and recheck.get("baseline") == baseline:
        cells = [f"{r['model']} {r['ratio_to_baseline']:.2f}x ({r['work_ratio_to_baseline']:.2f}x "
                 "without the collector)" for r in recheck["rows"]]
        lines += ["", f"The same comparison with {recheck['repeats']} runs each, run again "
                      f"(`scale_cpu_recheck.json`): {'; '.join(cells)}. On this shared machine "
                      "the ratio of identical code swings by about 0.3 from one run to the next."]
    if recorded:
        lines += ["", f"{baseline}'s recorded table is the one that commit wrote on "
                      f"{recorded['date']} (kept as `benchmarks/results/scale_cpu_{baseline}"
                      ".json`); the column is this pass over that day's pass."]
    if collector:
        lines += ["", "The collector is Python's cyclic garbage collector, timed inside the pass "
                      "through `gc.callbacks`; a full collection falls inside a large model's "
                      "pass when the process has allocated enough since the last one. "
                      + (f"{baseline} paused the collector for the whole pass; "
                         "ratio without the collector compares the median pass less the "
                         "collector's time in it. " if baseline else "")
                      + "Pausing it mostly moves that time into the user's next steps: see the "
                        "collector table below."]
    if data.get("time_vs_nodes_loglog_slope") is not None:
        lines += ["", f"Slope of log(pass time) against log(graph nodes): "
                      f"{data['time_vs_nodes_loglog_slope']:.2f} (1.0 is linear)."]
    return "\n".join(lines)


def collector() -> str:
    data = load("collector_cpu.json")
    if not data:
        return ""
    lines = ["## Pausing the garbage collector mostly moves its time", "",
             "A user's task, each run in a fresh process: three prunes (ratios 0.25, 0.5, "
             "0.75, results kept, as `structprune sweep` does) with 50,000 of the user's own "
             "objects made after each, the collector left alone (as structprune does) or "
             f"paused inside each `prune` (as 6dc2a35 did); median of {data['repeats']} runs "
             "each, alternating (`benchmarks/collector.py`).", "",
             "| model | first prune, left alone | paused | task, left alone | paused | "
             "collector over the task, left alone | paused |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        alone, paused = r["left alone"], r["paused"]
        lines.append(
            f"| {r['model']} | {alone['first_call_s']:.2f} s | {paused['first_call_s']:.2f} s "
            f"({r['first_call_saved']:+.0%}) | {alone['task_s']:.2f} s | {paused['task_s']:.2f} s "
            f"({r['task_saved']:+.0%}) | {alone['collector_s']:.2f} s "
            f"({alone['full_collections']:.0f} full) | {paused['collector_s']:.2f} s "
            f"({paused['full_collections']:.0f} full) |")
    lines += ["", "A positive percentage is time the pause saves. The full collections a "
                  "paused pass skips mostly fall in the user's next steps instead: over the "
                  "task the pause saves at most one full collection, within the runs' spread "
                  "and under 10% of the task, so structprune leaves the collector alone."]
    return "\n".join(lines)


def plot_gpu_latency(path: Path) -> bool:
    """Speed-up against ratio per tool on the GPU, one panel per model, ideal dashed."""
    data = load("latency_h100.json")
    if not data:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), sharey=False)
    for ax, model in zip(axes, models, strict=True):
        rows = [r for r in data["rows"] if r["model"] == model]
        ratios = [r["ratio"] for r in rows]
        for key, label in VARIANTS:
            ys = [r["gpu_fp16_bs64_ms"]["dense"]["median"] / r["gpu_fp16_bs64_ms"][key]["median"]
                  for r in rows]
            ax.plot(ratios, ys, marker="o", ms=3, label=label,
                    lw=2.2 if key == "structprune_auto" else 1.2)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{model}, H100 fp16 batch 64")
        ax.set_xlabel("pruning ratio")
    axes[0].set_ylabel("speed-up over dense")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_speed_targets(path: Path) -> bool:
    """Speed-up over dense against the MACs kept, one panel per model and thread count: every
    variant of the ratio cells, and the speed goals' results."""
    data = load("speed_targets_cpu2.json")
    if not data or not data.get("rows"):
        return False
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in data["rows"]})
    threads = sorted({r["threads"] for r in data["rows"]})
    fig, axes = plt.subplots(len(threads), len(models), figsize=(4.2 * len(models),
                                                                3.4 * len(threads)),
                             squeeze=False)
    for i, n in enumerate(threads):
        for j, model in enumerate(models):
            ax = axes[i][j]
            rows = [r for r in data["rows"] if r["model"] == model and r["threads"] == n]
            for key, label in SPEED_VARIANTS:
                points = sorted((r["macs"][key] / r["macs"]["dense"], r["latency"][key]["speedup"])
                                for r in rows if key in r["latency"])
                ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label,
                        lw=2.2 if key == "structprune_target" else 1.0)
            goals = [(t["macs_ratio"], t["measured"]["speedup"]) for t in data.get("targets", [])
                     if t["model"] == model and t["threads"] == n and "measured" in t]
            if goals:
                ax.scatter(*zip(*goals, strict=True), marker="*", s=70, color="black", zorder=5,
                           label="--target-speedup goals")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_yticks([0.5, 1, 2, 4, 8, 16])
            ax.invert_xaxis()
            ax.set_title(f"{model}, ONNX Runtime CPU, {n} thread{'s' * (n > 1)}", fontsize=9)
            ax.set_xlabel("MACs kept (fraction of dense)")
            ax.set_ylabel("speed-up over dense")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def coverage() -> str:
    data = load("coverage_torchvision.json")
    if not data:
        return ""
    rows = data["rows"]
    lines = [f"## Coverage of the torchvision CNN zoo ({data['models']} models, ratio 0.5)", "",
             f"structprune (exact-only, equal to the masked dense model): "
             f"{data['ok']['structprune']} of {data['models']}. Torch-Pruning (runs and keeps "
             f"output shapes): {data['ok']['torch_pruning']} of {data['models']}."]
    failed = [r for r in rows if not (r["structprune"]["ok"] and r["torch_pruning"]["ok"])]
    if failed:
        lines += ["", "| model | structprune | Torch-Pruning |", "|---|---|---|"]
        for r in failed:
            cells = ["ok" if r[t]["ok"] else r[t].get("error", "failed")[:90].replace("|", "/")
                     for t in ("structprune", "torch_pruning")]
            lines.append(f"| {r['model']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


FAMILIES = {"ultralytics": "ultralytics YOLOv8 and YOLO11 (detect, segment, pose, classify)",
            "smp": "segmentation-models-pytorch decoders",
            "torchvision": "torchvision detection pieces and RAFT"}


def coverage_external() -> str:
    data = load("coverage_external.json")
    if not data:
        return ""
    rows, m = data["rows"], data.get("machine") or {}
    where = f"{m['cpu']}, {m['cores']} cores" if m.get("cpu") else "CPU"
    lines = [f"## Outside model zoos: YOLO, segmentation, detection ({data['models']} models, "
             f"ratio 0.5, exact-only; {where})", "",
             "Every model has random weights (nothing downloaded) and goes through "
             "`prune_to_dir` end to end: prune, verify against the masked dense model, export "
             "dense and pruned ONNX, check ONNX Runtime against torch. YOLO heads are in their "
             "export form (raw box, class, mask and keypoint tensors); torchvision detectors "
             "are backbone, FPN and head without transform and post-processing; RAFT runs 2 "
             "refinement steps. `python benchmarks/coverage_external.py` "
             "(`tests/test_zoo_external.py` checks the same models).", ""]
    for family, title in FAMILIES.items():
        own = [r for r in rows if r["family"] == family]
        if not own:
            continue
        pruned = [r for r in own if r["status"] == "pruned"]
        text = f"- {title}: {len(pruned)} of {len(own)} pruned"
        others = [r for r in own if r["status"] != "pruned"]
        if others:
            text += "; " + "; ".join(
                f"{r['model']} {r['status']} ({first_line(r['reason'])})"
                + (f", an open bug: {r['known_bug']}" if r.get("known_bug") else "")
                for r in others)
        lines.append(text)
    lines += ["", "| model | status | capture | input | MACs kept | groups pruned / blocked "
              "| verification error | ONNX error | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = "x".join(str(d) for d in r["input_shapes"][0][2:])
        if len(r["input_shapes"]) > 1:
            size = f"{len(r['input_shapes'])} x {size}"
        if r["status"] == "pruned":
            cells = [r["capture"], size, f"{r['macs_ratio']:.1%}",
                     f"{r['groups_pruned']} / {r['blocked_groups']}",
                     f"{r['verify_rel_error']:.1e}", f"{r['onnx_rel_error']:.1e}"]
        else:
            cells = ["", size, "", "", "", ""]
        status = r["status"] if r["status"] == "pruned" else \
            f"{r['status']}: {first_line(r['reason'])}"
        lines.append(f"| {r['model'].removeprefix('ultralytics:')} | {status} | "
                     + " | ".join(cells) + f" | {r['seconds']:.1f} |")
    return "\n".join(lines)


def first_line(text: str, limit: int = 140) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = line.replace("|", "/")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def criteria_table() -> str:
    data = load("criteria_digits.json")
    if not data:
        return ""
    ratios, rows = data["ratios"], data["rows"]
    cell = {(r["tool"], r["criterion"], r["ratio"]): r for r in rows}
    dense, training = data["dense"], data["training"]
    mid = 0.5 if 0.5 in ratios else ratios[len(ratios) // 2]
    lines = [f"## Accuracy right after pruning, by criterion (digits CNN, dense "
             f"{100 * dense['accuracy']:.1f}% after {training['epochs']} epochs, "
             "no fine-tuning)", "",
             "| criterion | " + " | ".join(f"structprune {r} | Torch-Pruning {r}" for r in ratios)
             + f" | MACs kept at {mid} (sp / TP) |",
             "|---|" + "---:|" * (2 * len(ratios) + 1)]

    def pct(row: dict | None, key: str) -> str:
        return f"{100 * row[key]:.1f}%" if row else "-"

    for criterion in data["criteria"]:
        cells = [pct(cell.get((tool, criterion, r)), "accuracy")
                 for r in ratios for tool in ("structprune", "torch_pruning")]
        cells.append(" / ".join(pct(cell.get((tool, criterion, mid)), "macs_kept")
                                for tool in ("structprune", "torch_pruning")))
        lines.append(f"| {criterion} | " + " | ".join(cells) + " |")
    matched = ", ".join(f"{c}: {name}" for c, name in data["torch_pruning_importance"].items())
    lines += ["", "Test accuracy of the pruned model, each layer's channels cut by the ratio, the "
              "final Linear's outputs kept (structprune keeps model outputs by itself; "
              "Torch-Pruning with `ignored_layers=[final]`); calibration for the data-driven "
              "criteria: "
              f"{data['calibration']['batches']} training batches of "
              f"{data['calibration']['batch_size']}. Torch-Pruning importances: {matched} "
              "(it has no gradient-magnitude importance)."]
    spread = data.get("random_spread")
    if spread:
        seeds = spread["seeds"]
        lines[-1] += (f" Noise floor: structprune's random criterion over seeds {seeds[0]}-"
                      f"{seeds[-1]} gives " + ", ".join(
                          f"{100 * r['min']:.1f}-{100 * r['max']:.1f}% (median "
                          f"{100 * r['median']:.1f}%) at {r['ratio']}"
                          for r in spread["by_ratio"]) + ".")
    return "\n".join(lines)


def budget() -> str:
    data = load("budget_cpu.json")
    if not data:
        return ""
    lines = [f"## MACs budgets ({data['machine'].get('cpu', '?')}, 224x224, random weights, "
             "L2 magnitude)", "",
             "| model | --macs-budget | MACs kept (recounted) | predicted from the dense graph "
             "| parameters kept |", "|---|---:|---:|---:|---:|"]
    for row in data["rows"]:
        lines.append(f"| {row['model']} | {row['budget']:.2f} | {100 * row['macs_kept']:.2f}% "
                     f"| {100 * row['macs_kept_predicted']:.2f}% "
                     f"| {100 * row['params_kept']:.1f}% |")
    return "\n".join(lines)


def demo() -> str:
    data = load("demo_digits.json")
    if not data:
        return ""
    first = data["runs"][0]
    recipe = first["recipe"]
    lines = [f"## The demo: accuracy kept on the digits CNN ({data['machine'].get('cpu', '?')}, "
             f"{first['data']})", "",
             "| ratio | MACs kept | params kept | dense | right after pruning | after "
             f"recovery ({' + '.join(recipe['recover'])}) | after {recipe['finetune_epochs']} "
             "epochs of fine-tuning | ONNX Runtime 1 thread, dense / pruned |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in data["runs"]:
        d, p, steps = run["dense"], run["pruned"], run["steps"]
        lines.append(
            f"| {run['ratio']} | {100 * p['macs'] / d['macs']:.1f}% "
            f"| {100 * p['params'] / d['params']:.1f}% | {100 * d['accuracy']:.2f}% "
            f"| {100 * steps['right after pruning']['accuracy']:.2f}% "
            f"| {100 * steps['after recovery']['accuracy']:.2f}% "
            f"| {100 * steps['after fine-tuning']['accuracy']:.2f}% "
            f"| {d['ort_cpu_ms']:.2f} / {p['ort_cpu_ms']:.2f} ms |")
    lines += ["", f"L2 magnitude, dense trained {recipe['epochs']} epochs without sparsity "
              "regularisation, fine-tuning distilled from the dense model; `python "
              "benchmarks/demo.py`, or `structprune demo --ratio R` for one ratio."]
    return "\n".join(lines)


def recovery() -> str:
    data = load("recovery_digits.json")
    if not data:
        return ""
    cell = {(r["tool"], r["start"], r["ratio"], r["recovery"], r["step"]): r
            for r in data["rows"]}
    ratios = sorted({r["ratio"] for r in data["rows"]})
    ft = data["finetune_epochs"]
    columns = [(f"{m}", ("structprune", "dense", m, "right after pruning"))
               for m in ("none", "bn", "bias", "bias+bn", "lsq", "lsq+bn")]
    columns += [("lsq+bn, sparsity-trained",
                 ("structprune", "sparsity-trained", "lsq+bn", "right after pruning")),
                (f"one-shot + {ft} ep.", ("structprune", "dense", "lsq+bn", "one-shot, fine-tuned")),
                (f"one-shot + {ft} ep. distilled",
                 ("structprune", "dense", "lsq+bn", "one-shot, fine-tuned with distillation")),
                ("iterative, distilled", ("structprune", "dense", "lsq+bn",
                                          "iterative (3 steps), fine-tuned with distillation")),
                ("Torch-Pruning L2", ("torch_pruning", "dense", "none", "right after pruning")),
                (f"Torch-Pruning + {ft} ep.", ("torch_pruning", "dense", "none",
                                               "one-shot, fine-tuned"))]
    lines = [f"## Keeping the accuracy (digits CNN, dense {100 * data['dense_accuracy']:.1f}%, "
             f"sparsity-trained twin {100 * data['sparsity_trained_accuracy']:.1f}%; "
             f"{data['machine'].get('cpu', '?')})", "",
             "| ratio (MACs kept) | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for ratio in ratios:
        macs = cell.get(("structprune", "dense", ratio, "none", "right after pruning"))
        values = []
        for _, (tool, start, method, step) in columns:
            found = cell.get((tool, start, ratio, method, step))
            values.append(f"{100 * found['accuracy']:.1f}%" if found else "-")
        head = f"{ratio} ({100 * macs['macs_kept']:.1f}%)" if macs else str(ratio)
        lines.append(f"| {head} | " + " | ".join(values) + " |")
    lines += ["", "Test accuracy. The first seven columns are right after pruning (L2, per group) "
              "with each recovery method on 8 calibration batches, no gradient step; then "
              f"{ft} epochs of fine-tuning after lsq+bn, without and with distillation from the "
              "dense model; iterative: three equal steps, each recovered and fine-tuned with "
              "distillation. Torch-Pruning: L2 magnitude, final layer ignored, the same "
              "fine-tuning. `python benchmarks/recovery.py`."]
    return "\n".join(lines)



def label_free(file: str | list[str] = "label_free_issue24.json",
               heading: str = "Accuracy without labels") -> str:
    """The label-free table of one result file, or of several runs of
    ``benchmarks/label_free.py`` (for other models or ratios) read as one."""
    found = [d for d in (load(f) for f in ([file] if isinstance(file, str) else file)) if d]
    if not found:
        return ""
    data = dict(found[0])
    rows = [r for d in found for r in d["rows"]]
    if len(found) > 1:  # per-model epochs of every run; one note for all
        epochs = [d["distill_epochs"] for d in found]
        if all(isinstance(e, dict) for e in epochs):
            data["distill_epochs"] = {k: v for e in epochs for k, v in e.items()}
        data["note"] = "; ".join(d["note"] for d in found if d.get("note")) or None
    models = list(dict.fromkeys(r["model"] for r in rows))
    columns = [("L2, none", ("structprune", "l2", "none", "calibration only")),
               ("L2 + bn", ("structprune", "l2", "bn", "calibration only")),
               ("L2 + bias+bn", ("structprune", "l2", "bias+bn", "calibration only")),
               ("L2 + lsq+bn", ("structprune", "l2", "lsq+bn", "calibration only")),
               ("obs + lsq+bn", ("structprune", "obs", "lsq+bn", "calibration only")),
               ("obs sequential + lsq+bn", ("structprune", "obs+sequential", "lsq+bn",
                                            "calibration only")),
               ("obs global + lsq+bn (MACs kept)", ("structprune", "obs+global", "lsq+bn",
                                                    "calibration only")),
               ("+ label-free distillation", ("structprune", None, None, "distil")),
               ("Torch-Pruning L2 + bn", ("torch_pruning", "l2", "bn", "calibration only"))]
    epochs = data["distill_epochs"]
    distilled = any(epochs.values()) if isinstance(epochs, dict) else bool(epochs)
    if not distilled:  # a calibration-only run
        columns = [c for c in columns if c[1][3] != "distil"]

    def find(model, ratio, key):
        tool, selection, recovery, step = key
        for r in rows:
            if r["model"] != model or r["ratio"] != ratio or r["tool"] != tool:
                continue
            if step == "distil" and r["step"].startswith("label-free distillation"):
                return r
            if r["step"] == step and r["selection"] == selection and r["recovery"] == recovery:
                return r
        return None

    lines = [f"## {heading} ({data['machine'].get('cpu', '?')}, "
             f"{data['calibration_samples']} unlabeled calibration samples; 256 images for "
             "YOLOv8n)", "",
             "| model (dense) | ratio (MACs kept) | " + " | ".join(n for n, _ in columns)
             + " |", "|---|---|" + "---:|" * len(columns)]
    for model in models:
        dense = next(r["dense_accuracy"] for r in rows if r["model"] == model)
        for ratio in sorted({r["ratio"] for r in rows if r["model"] == model}):
            first = find(model, ratio, columns[0][1])
            head = f"{ratio} ({100 * first['macs_kept']:.0f}%)" if first else str(ratio)
            cells = []
            for _, key in columns:
                found = find(model, ratio, key)
                if found is None or found.get("failed") or found.get("error"):
                    cells.append("fails" if found else "-")
                elif key[1] == "obs+global":  # its own MACs
                    cells.append(f"{found['accuracy']:.1f}% ({100 * found['macs_kept']:.0f}%, "
                                 f"{found['seconds']:.0f} s)")
                elif key[3] == "distil" and found["selection"] == "obs+global":
                    cells.append(f"{found['accuracy']:.1f}% (from global, "
                                 f"{found['seconds']:.0f} s)")
                else:
                    cells.append(f"{found['accuracy']:.1f}% ({found['seconds']:.0f} s)")
            lines.append(f"| {model} ({dense:.1f}%) | {head} | " + " | ".join(cells) + " |")
    mix = f", each batch blended by mixup (Beta {data['mix']})" if data.get("mix") else ""
    if data.get("feature_weight"):
        mix += f", feature maps matched (weight {data['feature_weight']})"
    epochs = ", ".join(f"{n} epochs for {model}" for model, n in epochs.items()) \
        if isinstance(epochs, dict) else f"{epochs} epochs"  # per model, or one for all
    distillation = (f"Distillation: {epochs}, on the same unlabeled samples{mix}, from the "
                    "model of the rightmost calibration-only column the run has (obs "
                    "sequential + lsq+bn where it has one; in runs with a global column, "
                    "the most accurate calibration-only model that keeps no more MACs than "
                    "the per-group ratio), matching the dense model's "
                    "outputs; it calls `fit` directly, where `structprune finetune` keeps the "
                    "calibrated model if distillation moves it away from the dense one (the "
                    "digits rows). " if distilled else "No distillation in this run. ")
    lines += ["", "Validation accuracy (labels used only to measure it) and, in brackets, the "
              "wall time of selection plus recovery (of distillation in its column); for "
              "YOLOv8n the fidelity of the pruned model's boxes to the dense model's (mAP50-95 "
              "x 100 on 100 validation images, the dense model's boxes at confidence 0.25 as "
              "ground truth; the dense model scores itself just under 100). "
              "Calibration only: no gradient step. " + distillation + "obs sequential: "
              "the same widths, each group's channels chosen on the pruned model's inputs "
              "(`--sequential`); obs global: ranked across groups at the same ratio "
              "(`--global`), its own share of the MACs in brackets. Torch-Pruning: L2 "
              "magnitude, classifier (YOLO: Detect head) ignored, BatchNorm statistics "
              "re-estimated on the same samples. Peak memory per row is in the JSON. "
              "`python benchmarks/label_free.py`."
              + (f" {data['note'][0].upper()}{data['note'][1:]}." if data.get("note") else "")]
    return "\n".join(lines)


def yolo_map() -> str:
    data = load("yolo_cpu.json")
    if not data:
        return ""
    dense = data["dense"]["box"]["mAP50-95"] if "box" in data["dense"] else float("nan")
    settings = data["settings"]
    lines = [f"## YOLOv8n on the synthetic detection set ({data['machine'].get('cpu', '?')})",
             "", f"Dense: trained here {settings['epochs']} epochs at {settings['size']} px on "
             f"{settings['train']} images, mAP50-95 **{dense:.3f}** on {settings['val']}.", "",
             "| method | ratio (MACs kept) | right after | after label-free recovery | "
             "after fine-tuning | ONNX CPU speed-up (p10-p90) |", "|---|---|---:|---:|---:|---:|"]

    def num(row: dict, key: str) -> str:
        return f"{row[key]:.3f}" if isinstance(row.get(key), float) else "-"

    for row in data["rows"]:
        if row["method"] == "torch-pruning":
            name = f"Torch-Pruning {row['criterion']} (C2f rewritten by hand)"
        else:
            name = f"structprune {row['criterion']} + {settings['recover']}"
            if row.get("steps", 1) > 1:
                name += f" in {row['steps']} steps"
        kept = f" ({100 * row['macs_ratio']:.0f}%)" if "macs_ratio" in row else ""
        speed = row.get("latency", {}).get("pruned")
        speed = (f"{speed['speedup']:.2f}x ({speed['speedup_p10']:.2f}-"
                 f"{speed['speedup_p90']:.2f})") if speed else "-"
        if row.get("error") or (row["method"] == "torch-pruning" and row.get("status") != "ran"):
            lines.append(f"| {name} | {row['ratio']}{kept} | {row.get('status', 'error')}: "
                         f"{row.get('error', '')[:80]} | | | |")
            continue
        lines.append(f"| {name} | {row['ratio']}{kept} | {num(row, 'map_pruned')} | "
                     f"{num(row, 'map_recovered')} | {num(row, 'map_finetuned')} | {speed} |")
    tuned = next((r["finetune"] for r in data["rows"] if "finetune" in r), {})
    epochs, recipe = tuned.get("epochs"), tuned.get("args", {})
    recipe = ", ".join(f"{k} {v}" for k, v in recipe.items())
    recipe = f"; {recipe}, batch {tuned['batch']}" if recipe else ""
    steps = next((r["steps"] for r in data["rows"] if r.get("steps", 1) > 1), None)
    flags = (f" --steps {steps}" if steps else "") + (" --distill" if settings.get("distill")
                                                      else "")
    broke = next((r.get("without_rewrite") for r in data["rows"]
                  if r["method"] == "torch-pruning"), None)
    lines += ["", f"mAP50-95 by ultralytics' validator. Recovery: calibration on "
              f"{settings['calibration']} unlabeled training images, no gradient step. "
              f"Fine-tuning: ultralytics' own trainer on the pruned architecture for {epochs} "
              f"epochs (a quarter of the dense training's{recipe}), "
              + ("structprune's rows distilled from the dense model (Torch-Pruning's "
                 "recipe has no teacher)" if settings.get("distill") else
                 "without distillation")
              + (f". In {steps} steps (`prune --steps {steps}`), each pruned step is "
                 "recovered before the next: there is no unrecovered model to measure"
                 if steps else "") + ". Speed-up: ONNX Runtime CPU, one thread, "
              f"{settings['latency_size']}x{settings['latency_size']}, median of "
              f"{settings['repeats']} interleaved rounds."
              + (f" Torch-Pruning without the hand rewrite of C2f: {broke}." if broke else "")
              + (" The run was cut short: rows missing." if not data.get("complete", True)
                 else "") + f" `python benchmarks/yolo.py{flags}`."]
    return "\n".join(lines)


def recover_time() -> str:
    data = load("recover_time_issue24.json")
    if not data:
        return ""
    lines = [f"## Recovery time and memory ({data['machine'].get('cpu', '?')}, "
             f"{data['threads']} threads)", "",
             "| case | input | images | memory budget | wall | peak RSS | output MSE "
             "before -> after |", "|---|---|---:|---|---:|---:|---|"]
    for r in data["rows"]:
        budget = r.get("memory_budget") or "default"
        lines.append(f"| {r['case']} | {'x'.join(map(str, r['input'][1:]))} | {r['images']} | "
                     f"{budget} | {r['seconds']:.0f} s | {r['peak_rss_bytes'] / 2**30:.1f} GiB | "
                     f"{r['output_mse_before']:.2g} -> {r['output_mse_after']:.2g} |")
    lines += ["", "`recover(..., ['lsq', 'bn'])` on random weights pruned at 0.5 (L2), each "
              "case in its own process; errors on the held-out check samples; the load "
              "average is in the JSON. `python benchmarks/recover_time.py`."]
    return "\n".join(lines)


def sequential_cost() -> str:
    data = load("sequential_cost_issue24.json")
    if not data:
        return ""
    lines = [f"## Sequential selection's cost ({data['machine'].get('cpu', '?')}, "
             f"{data['threads']} thread{'s' if data['threads'] > 1 else ''})", "",
             "| model | ratio | MACs kept | selection, dense model run again per group | "
             "selection, dense rows kept | saved | then lsq,bn recovery | same model |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        fastest = r["select_seconds"]
        lines.append(f"| {r['model']} | {r['ratio']:g} | {r['macs_kept']:.0%} | "
                     f"{fastest['dense_rerun']:.1f} s | {fastest['rows_kept']:.1f} s | "
                     f"{r['select_saved']:.0%} | {r['recover_seconds']:.1f} s | "
                     f"{'yes' if r['identical'] else 'no'} |")
    lines += ["", "A user's whole task, `prune(..., criterion='obs', sequential=True)` then "
              "`recover(..., ['lsq', 'bn'])`, run both ways in one process on the label-free "
              "benchmark's models and 512 unlabeled images (YOLOv8n: 256 at 192 px), "
              f"alternating which goes first, the fastest of {data['repeats']} rounds each; "
              "\"same model\": every pruned weight equal. The load average is in the JSON. "
              "`python benchmarks/sequential_cost.py`."]
    return "\n".join(lines)


def auto_allocation() -> str:
    data = load("auto_allocation_issue24.json")
    if not data:
        return ""
    lines = [f"## --auto against the uniform ratio ({data['machine'].get('cpu', '?')})", "",
             "| model | ratio | allocation | MACs kept | accuracy after lsq,bn | dense | "
             "planning |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['ratio']:g} | {r['allocation']} | "
                     f"{r['macs_kept']:.1%} | {r['accuracy']:.2f} | {r['dense_accuracy']:.2f} | "
                     f"{r['plan_seconds']:.0f} s |")
    lines += ["", "`--auto` at the MACs the uniform ratio keeps, its sensitivity measured on "
              f"the {data['calibration_samples']} unlabeled calibration samples (top-1 "
              "agreement with the dense model): each trial as it is (raw), or after its "
              "BatchNorm statistics are re-estimated on them (recalibrated, what `prune "
              "--auto` does when `bn` recovery follows). Every plan is recovered with lsq,bn "
              "and evaluated on the labeled validation split; `obs` selection, sequential. "
              "Planning: wall time of the plan, measured beside other jobs on the same cores "
              "(the load average is in the JSON); recalibration takes two to three times as long. "
              "`python benchmarks/auto_allocation.py`."]
    return "\n".join(lines)


def capacity_ceiling() -> str:
    data = load("capacity_ceiling_issue24.json")
    if not data:
        return ""
    lines = [f"## How accurate the pruned architectures can be ({data['machine'].get('cpu', '?')})",
             "", "| model | ratio | MACs kept | calibration only | trained with labels, from "
             "the recovered weights | from a fresh initialisation | epochs | dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    pairs: dict[tuple, dict] = {}
    for r in data["rows"]:
        pairs.setdefault((r["model"], r["ratio"]), {})[r["start"]] = r
    for (model, ratio), by in pairs.items():
        first = next(iter(by.values()))
        cell = {k: f"{by[k]['accuracy']:.2f}" if k in by else "" for k in ("recovered", "fresh")}
        lines.append(f"| {model} | {ratio:g} | {first['macs_kept']:.1%} | "
                     f"{first['calibration_only_accuracy']:.2f} | {cell['recovered']} | "
                     f"{cell['fresh']} | {first['epochs']} | {first['dense_accuracy']:.2f} |")
    lines += ["", "The pruned architectures of the label-free benchmark (`obs` selection, "
              "sequential) trained with labels on the whole training split (6,000 images, "
              "twelve times the calibration samples) for twice the dense model's epochs, by "
              "its recipe: with twelve times the samples, and their labels, a practical "
              "ceiling for label-free distillation on the 512 unlabeled ones. "
              "`python benchmarks/capacity_ceiling.py`."]
    return "\n".join(lines)


def quantize() -> str:
    data = load("quantize_issue26.json")
    if not data:
        return ""
    lines = [f"## INT8 on top of pruning ({data['machine'].get('cpu', '?')}, ONNX Runtime, "
             f"{data['setup']['threads']} thread, batch {data['setup']['batch']})", "",
             "| model | MACs kept | dense INT8 | pruned FP32 | pruned INT8 |",
             "|---|---:|---:|---:|---:|"]
    for r in data["latency"]:
        x = r["speedup_over_dense_fp32"]
        lines.append(f"| {r['model']} (ratio {r['ratio']}) | {100 * r['macs_ratio']:.1f}% | "
                     f"{x['dense_int8']:.2f}x | {x['pruned_fp32']:.2f}x | "
                     f"**{x['pruned_int8']:.2f}x** |")
    digits = data.get("digits", {})
    if digits.get("pruned"):
        p = digits["pruned"]
        lines += ["", f"Digits demo, pruned: {100 * p['fp32_accuracy']:.2f}% FP32, "
                  f"{100 * p['int8_accuracy']:.2f}% INT8 (drop {p['drop_points']:.2f} points)."]
    lines += ["", "Speed-ups over the dense FP32 model, interleaved as `bench` times them; "
              f"quantizer: {data['setup']['quantizer']}. `python benchmarks/quantize.py`."]
    return "\n".join(lines)

SPEED_VARIANTS = [("structprune", "structprune"), ("structprune_auto", "round_to auto"),
                  ("structprune_target", "--target ort-cpu"),
                  ("torch_pruning", "Torch-Pruning"), ("torch_pruning_r8", "TP round_to 8")]


def prediction_errors(rows: list[dict]) -> list[str]:
    """The latency model's whole-model prediction (the plain sum over layers, no calibration)
    against `prune`'s measurements, per model and thread count, over the ratio cells."""
    lines = ["The latency model's prediction of the whole model (the sum of the table's layer "
             "times, not calibrated) against `prune`'s own measurements in the ratio cells "
             "above. Dense: one prediction, measured once per cell (median and p10-p90 over "
             "the cells). Pruned: the error of each cell's prediction (median and p10-p90).", "",
             "| model | threads | dense predicted | dense measured (p10-p90) | error | "
             "pruned error (p10-p90) | cells |", "|---|---:|---:|---:|---:|---:|---:|"]
    by: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if "target_latency_model" in r:
            by.setdefault((r["model"], r["threads"]), []).append(r["target_latency_model"])
    for (model, threads), found in sorted(by.items()):
        measured = np.array([f["dense_measured_ms"] for f in found])
        predicted = found[0]["dense_predicted_ms"]
        pruned = np.array([f["pruned_error"] for f in found])
        lines.append(
            f"| {model} | {threads} | {predicted:.1f} ms | {np.median(measured):.1f} ms "
            f"({np.percentile(measured, 10):.1f}-{np.percentile(measured, 90):.1f}) | "
            f"{100 * (predicted / np.median(measured) - 1):+.0f}% | "
            f"{100 * np.median(pruned):+.0f}% ({100 * np.percentile(pruned, 10):+.0f}% to "
            f"{100 * np.percentile(pruned, 90):+.0f}%) | {len(found)} |")
    return lines


def speed_targets() -> str:
    """Speed-ups over dense on ONNX Runtime CPU by ratio, and speed targets met or not."""
    data = load("speed_targets_cpu2.json")
    if not data or not data.get("rows"):
        return ""
    m = data["machine"]
    sizes = sorted({r["size"] for r in data["rows"]})
    lines = [f"## Pruning to a speed on ONNX Runtime CPU ({m['cpu']}, {m['cores']} cores, "
             f"onnxruntime {m['onnxruntime']}, batch 1, inputs "
             f"{' and '.join(f'{s}x{s}' for s in sizes)})", "",
             "Speed-up over dense, median of the per-round ratios of interleaved rounds; in "
             "round brackets the MACs kept, in square brackets the p10-p90 of the per-round "
             "ratios (every column's are in the JSON). Bold: slower than dense. The dense "
             "column shows how loaded the shared machine was during each cell.", "",
             "| model | threads | ratio | dense | "
             + " | ".join(label for _, label in SPEED_VARIANTS) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(SPEED_VARIANTS)]
    slower = {key: 0 for key, _ in SPEED_VARIANTS}
    at_least_tp = cells = dominates = 0
    for r in sorted(data["rows"], key=lambda r: (r["model"], r["threads"], r["ratio"])):
        lat, macs = r["latency"], r["macs"]
        row = []
        for key, _ in SPEED_VARIANTS:
            if key not in lat:
                row.append("refused")
                continue
            s = lat[key]["speedup"]
            slower[key] += s < 1
            text = f"{s:.2f}x ({100 * macs[key] / macs['dense']:.0f}%)"
            if key == "structprune_target":  # the spread the never-slower claim rests on
                text += f" [{lat[key]['speedup_p10']:.2f}-{lat[key]['speedup_p90']:.2f}]"
            row.append(f"**{text}**" if s < 1 else text)
        if "structprune_target" in lat:
            cells += 1
            faster = lat["structprune_target"]["speedup"] >= lat["torch_pruning"]["speedup"]
            at_least_tp += faster
            # as fast while keeping as many MACs (within 2 points): better at equal MACs
            dominates += faster and macs["structprune_target"] >= macs["torch_pruning"] \
                - 0.02 * macs["dense"]
        lines.append(f"| {r['model']} {r['size']}px | {r['threads']} | {r['ratio']:.1f} | "
                     f"{lat['dense']['ms']:.1f} ms | " + " | ".join(row) + " |")
    n = len(data["rows"])
    lines += ["", "Cells slower than dense: " + ", ".join(
        f"{label} {slower[key]} of {n}" for key, label in SPEED_VARIANTS)
        + f". `--target ort-cpu` at least as fast as Torch-Pruning in {at_least_tp} of {cells} "
        f"cells, and in {dominates} of them while keeping at least as many MACs (within 2 "
        "points of the dense model's)."]
    lines += ["", *prediction_errors(data["rows"])]
    targets = data.get("targets", [])
    if targets:
        lines += ["", "`--target-speedup X --target ort-cpu`: the speed-up measured in "
                  "`prune`'s own interleaved pairs (p10-p90), the MACs kept, and the latency "
                  "model's whole-model prediction (sum over layers, and calibrated on the dense "
                  "measurement) against the measurement.", "",
                  "| model | threads | goal | measured (p10-p90) | MACs kept | met | "
                  "dense predicted / measured | pruned predicted (calibrated) / measured |",
                  "|---|---:|---:|---:|---:|---|---:|---:|"]
        for t in sorted(targets, key=lambda t: (t["model"], t["threads"], t["goal"])):
            if "measured" not in t:
                best = max(t["attempts"], key=lambda a: a["speedup"]) if t["attempts"] else None
                got = (f"best {best['speedup']:.2f}x ({best['speedup_p10']:.2f}-"
                       f"{best['speedup_p90']:.2f})" if best else "-")
                lines.append(f"| {t['model']} | {t['threads']} | {t['goal']:g}x | {got} | "
                             f"{100 * best['macs_ratio']:.0f}% | no (refused) | - | - |"
                             if best else f"| {t['model']} | {t['threads']} | {t['goal']:g}x "
                             "| - | - | no | - | - |")
                continue
            ms, lm = t["measured"], t["latency_model"]
            lines.append(
                f"| {t['model']} | {t['threads']} | {t['goal']:g}x | {ms['speedup']:.2f}x "
                f"({ms['speedup_p10']:.2f}-{ms['speedup_p90']:.2f}) | "
                f"{100 * t['macs_ratio']:.0f}% | {'yes' if t['met'] else 'no'} | "
                f"{lm['dense_predicted_ms']:.1f} / {lm['dense_measured_ms']:.1f} ms | "
                f"{lm['pruned_predicted_ms']:.1f} ({lm['pruned_predicted_calibrated_ms']:.1f})"
                f" / {lm['pruned_measured_ms']:.1f} ms |")
    single = load("target_resnet50_speedup2_cpu2.json")
    if single:
        cell = single["bench"]["cells"][0]
        lines += ["", f"`{single['commands'][0]}` then `{single['commands'][1]}`: "
                  f"{cell['speedup']:.2f}x (p10-p90 {cell['speedup_p10']:.2f}-"
                  f"{cell['speedup_p90']:.2f}) over dense on {cell['threads']} thread, "
                  f"{100 * single['macs_ratio']:.1f}% of the MACs kept (prune's own pairs: "
                  f"{single['target']['measured']['speedup']:.2f}x after "
                  f"{len(single['target']['attempts'])} measured attempts)."]
    runs = data.get("runs", [])
    if runs:
        lines += ["", "Run: " + "; ".join("`python benchmarks/speed_targets.py "
                                          + " ".join(r["argv"]) + "`" for r in runs) + "."]
    return "\n".join(lines)


def yolo_latency() -> str:
    data = load("yolo_latency_cpu2.json")
    if not data:
        return ""
    m = data["machine"]
    lines = [f"## YOLO on ONNX Runtime CPU ({m.get('cpu', 'CPU')}, {m.get('cores', '?')} cores, "
             f"{data['size']}x{data['size']}, batch 1, {data['repeats']} interleaved rounds)", "",
             "ultralytics' yaml models with random weights, head in export form. *plain*: "
             "`prune --ratio R`; *--target ort-cpu*: the same ratio with widths snapped to ones "
             "the measured latency table says are fast, checked never slower than dense "
             "(`benchmarks/yolo_latency.py`). Speed-up over dense: median of the per-round "
             "ratios (p10-p90); the 2-thread cells ran beside other work on this 2-core "
             "machine, hence their spread.", "",
             "| model | ratio | threads | dense ms | plain: MACs kept, speed-up | "
             "--target ort-cpu: MACs kept, speed-up |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        t, macs = r["timing"], r["macs_ratio"]
        cells = [f"{macs[k]:.1%}, {t[k]['speedup']:.2f}x ({t[k]['speedup_p10']:.2f}-"
                 f"{t[k]['speedup_p90']:.2f})" for k in ("structprune", "structprune_target")]
        lines.append(f"| {r['model']} | {r['ratio']} | {r['threads']} | "
                     f"{t['dense']['ms']:.1f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def gpu_section() -> str:
    text = gpu_latency()
    if text and (RESULTS / "latency_h100.png").exists():
        text += "\n\n![speed-up against ratio on the H100](latency_h100.png)"
    return text


CPU_NOTE = ("At ratio 0.5, VGG16 and ResNet-50 keep the same power-of-two widths under every "
            "tool, so differences between their columns are run-to-run noise; the 16-thread "
            "cells were noisy on the GPU host (dense ResNet-50 ran slower on 16 threads than "
            "on 1), which is why `structprune bench` reports p10-p90 beside each median.")


def cpu_16_section() -> str:
    text = cpu_latency("latency_ort_cpu16_h100host.json", False)
    return f"{text}\n\n{CPU_NOTE}" if text else ""


def speed_section() -> str:
    text = speed_targets()
    if text and (RESULTS / "speed_targets_cpu2.png").exists():
        text += ("\n\n![speed-up against MACs kept on ONNX Runtime CPU]"
                 "(speed_targets_cpu2.png)")
    return text


# the result pages of the docs site: file, title, and its sections (a stable anchor each, so
# that other pages can link to a table whatever machine its heading names)
PAGES = [
    ("pass-time.md", "Pass time and scale", [
        ("pass-time", pass_time), ("capture-paths", capture_paths), ("scale", scale),
        ("collector", collector)]),
    ("coverage.md", "Coverage", [
        ("torchvision-zoo", coverage), ("outside-model-zoos", coverage_external)]),
    ("latency.md", "Latency", [
        ("gpu-latency", gpu_section),
        ("cpu-latency", lambda: cpu_latency("latency_ort_cpu2.json", True)),
        ("cpu-latency-16-cores", cpu_16_section),
        ("speed-targets", speed_section), ("yolo-latency", yolo_latency)]),
    ("accuracy.md", "Accuracy", [
        ("criteria", criteria_table), ("macs-budgets", budget), ("demo", demo),
        ("recovery", recovery), ("label-free", label_free),
        ("label-free-patient", lambda: label_free(
            "label_free_patient_issue24.json",
            "Accuracy without labels, with patient distillation")),
        ("label-free-patient-more", lambda: label_free(
            ["label_free_patient_mobilenetv2s_issue24.json",
             "label_free_patient_yolo_digits_issue24.json"],
            "Accuracy without labels, with patient distillation: more models and ratios")),
        ("label-free-sequential", lambda: label_free(
            ["label_free_sequential_issue24.json", "label_free_sequential_yolo_issue24.json"],
            "Accuracy without labels: sequential and global selection, calibration only")),
        ("label-free-pitch", lambda: label_free(
            "label_free_pitch_issue24.json",
            "Accuracy without labels: CREPE's pitch network, trained here")),
        ("sequential-cost", sequential_cost),
        ("auto-allocation", auto_allocation),
        ("capacity-ceiling", capacity_ceiling),
        ("yolo-map", yolo_map),
        ("recovery-time", recover_time),
        ("int8", quantize)]),
]
IMAGES = ["latency_h100.png", "speed_targets_cpu2.png"]


def anchored(text: str, anchor: str) -> str:
    """``text`` with an explicit id on its first (heading) line."""
    heading, _, rest = text.partition("\n")
    return f"{heading} {{#{anchor}}}\n{rest}"


def pages() -> dict[str, str]:
    """The result pages as markdown, by file name; the images they show are :data:`IMAGES`."""
    out = {}
    for name, title, sections in PAGES:
        parts = [anchored(text, anchor) for anchor, make in sections if (text := make())]
        body = "\n\n".join(parts) if parts else "No results are recorded for this page yet."
        out[name] = (f"# {title}\n\nGenerated by `benchmarks/tables.py` from "
                     "`benchmarks/results/*.json`, which the scripts in `benchmarks/` write.\n\n"
                     f"{body}\n")
    return out


def images() -> dict[str, Path]:
    """The plots the result pages show, by file name (those that exist)."""
    return {name: RESULTS / name for name in IMAGES if (RESULTS / name).exists()}


def render() -> str:
    """Every result section, one after another, as markdown."""
    return "\n\n".join(make() for _, _, sections in PAGES for _, make in sections
                        if make()) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plots", action="store_true",
                        help="redraw the plots in benchmarks/results/ from their JSON")
    parser.add_argument("--docs", metavar="DIR", type=Path,
                        help="write the docs site's result pages and their plots into DIR "
                             "(the docs build makes them itself; this is for a look)")
    args = parser.parse_args()
    if args.plots:
        plot_gpu_latency(RESULTS / "latency_h100.png")
        plot_speed_targets(RESULTS / "speed_targets_cpu2.png")
    if args.docs is None:
        print(render(), end="")
        return 0
    args.docs.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (args.docs / name).write_text(text)
    for name, path in images().items():
        shutil.copyfile(path, args.docs / name)
    print(f"wrote {len(PAGES)} pages and {len(images())} plots into {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
