"""The settings of a pruning run, each declared once and validated once.

Four small frozen configs, each accepted whole by the functions that honour every field of
it, so that no function is handed a setting it would have to drop:

- :class:`PruneConfig`, the pass itself: which units go (selection), how they are scored
  (scoring), and how the model is captured and the result checked. ``structprune.prune``,
  ``make_plan``, ``fastest_rounding``, ``prune_for_target`` and ``auto_plan`` take it;
  ``plan.json``'s ``settings`` block is its :meth:`~PruneConfig.to_json`.
- :class:`TargetConfig`, a speed target: the runtime latency is measured on and what it must
  reach. ``prune_for_target`` takes it beside a :class:`PruneConfig`.
- :class:`RunConfig`, what happens around the pass in a run into a folder (``prune_to_dir``,
  the CLI's ``prune``): steps with fine-tuning between them, ``--auto``, recovery and the
  ONNX files.
- :class:`QuantizeConfig`, INT8 of the ONNX files (``structprune.deploy.quantize``, the CLI's
  ``quantize`` and ``prune --quantize int8``, where it is the run's ``quantize``).

They are siblings rather than one object because each consumer honours all of its own
config and none of the others': ``prune`` cannot fine-tune between steps or time a runtime,
and a single object would make it refuse (or strip) those fields on every call. Each
config's values are checked in its ``__post_init__`` (one :class:`PlanError` line per bad
value); the rules that tie two configs together, or a config to the call's objects (a plan,
data), are :meth:`TargetConfig.check` and :meth:`RunConfig.check`. Rules about the names
of criteria, normalisations, runtimes and recovery methods stay with the stage that owns
those names (this module imports nothing of the pass).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from structprune.errors import PlanError

DEFAULT_RATIO = 0.5  # what goes when no ratio, threshold, budget or speed goal is given
CAPTURE_METHODS = ("auto", "fx", "export")
IF_SLOWER = ("fix", "fail")
SELECTION_MODES = ("threshold", "macs_budget", "params_budget")  # besides "ratio"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _is_count(x: Any, least: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least


MEMORY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_size(value: int | str | None) -> int | None:
    """A memory size in bytes: an integer, or a string such as ``"8G"``, ``"512M"`` or
    ``"1.5GiB"`` (K, M, G and T are powers of 1024); None stays None."""
    if value is None:
        return None
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text and text[-1] in "KMGT" else ""
    try:
        size = float(text[:len(text) - len(unit)]) * MEMORY_UNITS[unit]
    except ValueError:
        size = math.nan
    if isinstance(value, bool) or not (math.isfinite(size) and size >= 1):
        raise PlanError(f"memory budget {value!r} is not a size: give bytes, or a number with "
                        "K, M, G or T, such as 8G")
    return int(size)


def _fraction(value: Any, what: str) -> None:
    """A fraction of units to remove: in [0, 1)."""
    if not (_is_number(value) and 0 <= value < 1):
        raise PlanError(f"{what} {value} is outside [0, 1): pass a fraction such as 0.5")


class _Config:
    """``replace`` and ``to_json`` shared by the configs (all frozen dataclasses)."""

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (field names) applied, validated again."""
        names = [f.name for f in fields(self)]
        unknown = [name for name in changes if name not in names]
        if unknown:
            raise PlanError(f"unknown setting {unknown[0]!r}: {type(self).__name__} has "
                            + ", ".join(names))
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data: tuples as lists, a callable by its name."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, _Config):
        return value.to_json()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(value):
        return getattr(value, "__name__", type(value).__name__)
    return value


@dataclass(frozen=True)
class PruneConfig(_Config):
    """Every setting of the pass (capture -> analyse -> score -> plan -> apply -> verify).

    Selection, what goes: ``ratio`` of each group's units (over all groups with
    ``global_ranking``; ``ratios`` overrides it per module name or glob), or ``threshold``
    (units whose normalised score is below it), or ``macs_budget`` / ``params_budget`` (the
    fraction of the dense MACs or parameters to keep, least importance per MAC or parameter
    saved first). At most one of the four is set; none means a ratio of 0.5. ``round_to``:
    kept channel counts become multiples of it (``"auto"``: the multiple that times fastest,
    chosen by ``structprune.deploy.tune.fastest_rounding``). ``min_width``: fewest channels a
    group keeps. ``max_group_ratio``: most of a group's units that global ranking, a threshold
    or a budget removes. ``ignore``: module names or globs whose parameters stay untouched.
    ``exact_only``: prune only groups whose removal equals masking.

    Scoring: ``criterion`` names a criterion of ``structprune.core.score.IMPORTANCE`` or is a
    callable ``(analysis, group) -> scores``; ``normalize`` scales each group's scores;
    ``calibration_batches`` batches of the data feed the data-driven criteria (None: all of a
    list, 8 of anything else); ``seed`` seeds the ``random`` criterion. ``sequential``
    (``obs`` only): once the widths are chosen, each group's channels are chosen again on the
    inputs the model pruned so far gives its consumers, group by group in the order the
    model calls them (:meth:`structprune.core.obs.OBS.rescore`).

    Capture and check: ``capture_method`` (fx, torch.export, or fx falling back to export);
    ``check`` compares the pruned model with the masked dense one within ``tolerance``.
    """

    # selection
    ratio: float | None = None
    ratios: Mapping[str, float] = field(default_factory=dict)
    threshold: float | None = None
    macs_budget: float | None = None
    params_budget: float | None = None
    global_ranking: bool = False
    round_to: int | str = 1
    min_width: int = 1
    max_group_ratio: float = 0.9
    ignore: tuple[str, ...] = ()
    exact_only: bool = False
    # scoring
    criterion: str | Callable[..., Any] = "l2"
    normalize: str = "mean"
    calibration_batches: int | None = None
    seed: int = 0
    sequential: bool = False
    # capture and check
    capture_method: str = "auto"
    check: bool = True
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        ignore = (self.ignore,) if isinstance(self.ignore, str) else tuple(self.ignore)
        object.__setattr__(self, "ignore", ignore)
        object.__setattr__(self, "ratios", dict(self.ratios))
        if _is_number(self.round_to) and int(self.round_to) == self.round_to:
            object.__setattr__(self, "round_to", int(self.round_to))
        self._check_selection()
        self._check_scoring_and_capture()

    def _check_selection(self) -> None:
        if self.ratio is not None:
            _fraction(self.ratio, "ratio")
        for pattern, value in self.ratios.items():
            _fraction(value, f"ratio for {pattern!r}:")
        for name in ("macs_budget", "params_budget"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 < value <= 1):
                raise PlanError(f"{name} {value} is outside (0, 1]: pass the fraction to "
                                "keep, such as 0.4")
        if self.threshold is not None and not (_is_number(self.threshold)
                                               and self.threshold >= 0):
            raise PlanError(f"threshold {self.threshold} must be a number >= 0: units scoring "
                            "below it are removed")
        chosen = [name for name in ("ratio", *SELECTION_MODES)
                  if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise PlanError(f"{' and '.join(chosen)} are both set: pass only one of ratio, "
                            "threshold, macs_budget and params_budget")
        if self.mode != "ratio" and self.ratios:
            raise PlanError(f"per-module ratios apply to ratio pruning, not to {self.mode}: "
                            "drop the ratio overrides or use --ignore")
        if self.global_ranking and self.ratios:
            raise PlanError("per-module ratios apply to per-group ranking: drop either the "
                            "ratio overrides or global ranking")
        if self.global_ranking and self.mode != "ratio":
            raise PlanError(f"global ranking ranks units for a ratio; {self.mode} already "
                            "ranks them over all groups: drop global ranking")
        if self.round_to != "auto" and not _is_count(self.round_to, 1):
            raise PlanError(f"round_to {self.round_to} must be an integer >= 1 or 'auto' "
                            "(--round-to N|auto)")
        if not _is_count(self.min_width, 1):
            raise PlanError(f"min_width {self.min_width} must be an integer >= 1")
        if not (_is_number(self.max_group_ratio) and 0 <= self.max_group_ratio <= 1):
            raise PlanError(f"max_group_ratio {self.max_group_ratio} is outside [0, 1]")
        if not all(isinstance(pattern, str) for pattern in (*self.ignore, *self.ratios)):
            raise PlanError("ignore and ratio overrides name modules: pass strings such as "
                            "'features.0' or 'layer1.*'")

    def _check_scoring_and_capture(self) -> None:
        if not (isinstance(self.criterion, str) or callable(self.criterion)):
            raise PlanError(f"criterion {self.criterion!r} must be a criterion's name, such "
                            "as 'l2', or a callable (analysis, group) -> scores")
        if not isinstance(self.normalize, str):
            raise PlanError(f"normalize {self.normalize!r} must be a name, such as 'mean'")
        if self.calibration_batches is not None and not _is_count(self.calibration_batches, 1):
            raise PlanError(f"calibration_batches {self.calibration_batches} must be 1 or more")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise PlanError(f"seed {self.seed!r} must be an integer")
        if self.sequential and self.criterion != "obs":
            raise PlanError("sequential selection re-measures obs's reconstruction on the "
                            "pruned inputs: pass criterion 'obs' (--criterion obs) or drop "
                            "sequential")
        if self.capture_method not in CAPTURE_METHODS:
            raise PlanError(f"unknown capture method {self.capture_method!r}: use one of "
                            + ", ".join(CAPTURE_METHODS))
        if not (_is_number(self.tolerance) and self.tolerance > 0):
            raise PlanError(f"tolerance {self.tolerance} must be a number above 0")

    @property
    def mode(self) -> str:
        """``ratio``, ``threshold``, ``macs_budget`` or ``params_budget``."""
        for name in SELECTION_MODES:
            if getattr(self, name) is not None:
                return name
        return "ratio"

    @property
    def removal_ratio(self) -> float:
        """The fraction ratio pruning removes (``ratio``, or 0.5 when it is not set)."""
        return DEFAULT_RATIO if self.ratio is None else self.ratio


def make_config(config: PruneConfig | None = None, ratio: float | None = None,
                **settings: Any) -> PruneConfig:
    """``config`` (default: :class:`PruneConfig`'s defaults) with ``ratio`` (when given) and
    the named ``settings`` (field names; an unknown one is refused) replaced: what the
    functions taking ``(..., ratio=None, *, config=None, **settings)`` prune with."""
    changes = dict(settings)
    if ratio is not None:
        changes["ratio"] = ratio
    config = config or PruneConfig()
    return config.replace(**changes) if changes else config


@dataclass(frozen=True)
class TargetConfig(_Config):
    """A speed target: the runtime every latency decision is measured on (``runtime``, one of
    ``structprune.deploy.runtimes.RUNTIMES``, with ``threads`` for a CPU runtime and
    ``batch``), the goal (``speedup`` over dense, or ``latency_ms``; neither: the pass
    config's ratio, threshold or budget with widths snapped to fast ones), what to do with
    a model that measures not faster than dense (``if_slower``: ``fix`` or ``fail``) and
    whether the pruned model is timed in INT8 against the dense one in FP32 (``quantize``).
    The runtime, threads and batch are checked when the runtime is made
    (``structprune.deploy.runtimes.make_target``)."""

    runtime: str
    threads: int | None = None
    batch: int = 1
    speedup: float | None = None
    latency_ms: float | None = None
    if_slower: str = "fix"
    quantize: bool = False

    def __post_init__(self) -> None:
        if self.speedup is not None and self.latency_ms is not None:
            raise PlanError("give --target-speedup or --target-latency, not both")
        if self.speedup is not None and not (_is_number(self.speedup) and self.speedup > 1):
            raise PlanError(f"--target-speedup {self.speedup} must be above 1 (2 means twice "
                            "as fast as dense)")
        if self.latency_ms is not None and not (_is_number(self.latency_ms)
                                                and self.latency_ms > 0):
            raise PlanError(f"--target-latency {self.latency_ms} must be a positive number of "
                            "milliseconds")
        if self.if_slower not in IF_SLOWER:
            raise PlanError(f"unknown --if-slower {self.if_slower!r}: use fix or fail")

    @property
    def goal(self) -> bool:
        """Whether a speed-up or latency is asked for (else widths are only snapped)."""
        return self.speedup is not None or self.latency_ms is not None

    def check(self, config: PruneConfig) -> None:
        """Refuse a pass config this target cannot honour, in one line."""
        if config.sequential:
            raise PlanError("a speed target times many plans; sequential selection refines "
                            "one: drop sequential (--sequential)")
        if self.goal and (config.ratio is not None or config.mode != "ratio"):
            goal = "target speedup" if self.speedup is not None else "target latency"
            raise PlanError(f"{goal} and {config.mode} both say how much goes: give one of ratio, "
                            "threshold, macs_budget, params_budget, target speedup and target "
                            "latency, not 2")
        if config.round_to == "auto" and config.ratio is None:
            raise PlanError("--round-to auto times whole candidates at a --ratio: give "
                            "--ratio, or drop --round-to auto to search widths per group")


@dataclass(frozen=True)
class OnnxSignature(_Config):
    """How the ONNX files of a model are written when it came from an ONNX file: the
    original graph's ``input_names`` and ``output_names``, its ``opset`` and its
    ``dynamic_axes`` (tensor name -> {axis: axis name}, as ``torch.onnx.export`` takes
    them). ``structprune.front.models.export_signature`` reads them from the source."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_names", tuple(self.input_names))
        object.__setattr__(self, "output_names", tuple(self.output_names))
        axes = {str(name): {int(axis): str(dim) for axis, dim in dims.items()}
                for name, dims in self.dynamic_axes.items()}
        object.__setattr__(self, "dynamic_axes", axes)
        names = [*self.input_names, *self.output_names]
        if not self.input_names or not self.output_names or len(set(names)) != len(names):
            raise PlanError(f"an ONNX signature needs distinct input and output names, not "
                            f"{names}")
        if not _is_count(self.opset, 1):
            raise PlanError(f"opset {self.opset!r} must be an integer >= 1")
        unknown = sorted(set(axes) - set(names))
        if unknown:
            raise PlanError(f"dynamic axes name {unknown[0]!r}, which is no input or output")

    def batch_dynamic(self) -> bool:
        """Whether every input's first axis is dynamic (a file that runs at any batch)."""
        return all(0 in self.dynamic_axes.get(name, {}) for name in self.input_names)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> OnnxSignature | None:
        """The signature :meth:`to_json` wrote (None stays None)."""
        if data is None:
            return None
        return cls(data["input_names"], data["output_names"], data["opset"],
                   data.get("dynamic_axes", {}))


QUANTIZE_PRECISIONS = ("int8",)


@dataclass(frozen=True)
class QuantizeConfig(_Config):
    """INT8 of an ONNX file (``structprune.deploy.quantize.quantize_onnx``).

    ``runtime``: the runtime the INT8 file is made for, whose quantizer makes it (``ort-cpu``:
    ONNX Runtime's static QDQ quantizer; ``openvino-cpu``: NNCF); ``method``: how activation
    ranges are calibrated (``minmax``, ``entropy`` or ``percentile``; ONNX Runtime's); ``samples``:
    how many input samples calibrate them; ``per_channel``: weights quantized per output
    channel; ``max_drop``: the most points of accuracy (of top-1 agreement with the FP32 model
    when the data has no labels) INT8 may cost, else the layers costing most stay in FP32
    (None: no limit). The runtime and method names are checked by the quantize stage.
    """

    precision: str = "int8"
    runtime: str = "ort-cpu"
    method: str = "minmax"
    samples: int = 64
    per_channel: bool = True
    max_drop: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in QUANTIZE_PRECISIONS:
            raise PlanError(f"unknown --quantize {self.precision!r}: use "
                            + ", ".join(QUANTIZE_PRECISIONS))
        if not _is_count(self.samples, 1):
            raise PlanError(f"--calibration-samples {self.samples} must be 1 or more")
        if self.max_drop is not None and not (_is_number(self.max_drop) and self.max_drop >= 0):
            raise PlanError(f"--max-drop {self.max_drop} must be a number of points >= 0 "
                            "(0.5 allows half a point of accuracy)")


@dataclass(frozen=True)
class RunConfig(_Config):
    """What happens around the pass in a run into a folder (``prune_to_dir``).

    ``steps`` > 1 reaches the ratio in that many steps, with ``finetune_epochs`` of
    fine-tuning between them (``distill``: distilled from the dense model); ``auto`` chooses
    per-group ratios for the MACs budget from each group's measured sensitivity; ``recover``
    names the recovery methods run after surgery (None: ``bn`` when data is given, none
    without; a string may list them comma-separated); ``tune_batch`` is the batch size
    ``round_to="auto"`` times candidates at; ``exporter``, ``simplify`` and ``onnx`` say how
    (and whether) ``dense.onnx`` and ``pruned.onnx`` are written; ``quantize`` (a
    :class:`QuantizeConfig`) writes their INT8 twins, calibrated on the data.
    ``memory_budget`` bounds what recovery allocates (bytes, or a string such as ``"8G"``;
    None: half of the memory available when it starts). ``signature`` (an
    :class:`OnnxSignature`, for a model that came from an ONNX file) gives the ONNX files
    that file's input and output names, opset and dynamic axes.
    """

    steps: int = 1
    finetune_epochs: int = 0
    distill: bool = False
    auto: bool = False
    recover: tuple[str, ...] | None = None
    tune_batch: int = 1
    exporter: str = "auto"
    simplify: bool = False
    onnx: bool = True
    quantize: QuantizeConfig | None = None
    memory_budget: int | None = None
    signature: OnnxSignature | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_budget", memory_size(self.memory_budget))
        if isinstance(self.recover, str):
            methods = () if self.recover == "none" else tuple(self.recover.split(","))
            object.__setattr__(self, "recover", methods)
        elif self.recover is not None:
            object.__setattr__(self, "recover", tuple(self.recover))
        if not (_is_count(self.steps, 1) and _is_count(self.finetune_epochs, 0)):
            raise PlanError("--steps must be 1 or more and --finetune-epochs 0 or more")
        if self.finetune_epochs and self.steps == 1:
            raise PlanError("--finetune-epochs fine-tunes between steps: give --steps 2 or "
                            "more (or fine-tune the folder with `structprune finetune`)")
        if self.distill and not self.finetune_epochs:
            raise PlanError("--distill distils while fine-tuning between steps: give "
                            "--finetune-epochs")
        if not _is_count(self.tune_batch, 1):
            raise PlanError(f"--batch {self.tune_batch} must be 1 or more")

    def recovery(self, data_given: bool) -> tuple[str, ...]:
        """The recovery methods to run: ``recover``, or ``bn`` with data and none without."""
        if self.recover is not None:
            return self.recover
        return ("bn",) if data_given else ()

    def check(self, config: PruneConfig, target: TargetConfig | None = None, *,
              plan_given: bool = False, data_given: bool = False) -> None:
        """Refuse, in one line, a combination of this run with the pass config, the target,
        a given plan and data that the run cannot honour."""
        if target is not None:
            if plan_given or self.steps > 1 or self.auto:
                raise PlanError("--target chooses the widths itself: it does not combine with "
                                "--plan, --steps or --auto")
            target.check(config)
            if self.quantize is not None and self.quantize.runtime != target.runtime:
                raise PlanError(f"--quantize-runtime {self.quantize.runtime} is not --target "
                                f"{target.runtime}: the INT8 files are made for the runtime "
                                "they are timed on")
            if target.quantize != (self.quantize is not None):
                raise PlanError("the target times the model in INT8 exactly when the run "
                                "writes INT8 files: set both or neither")
        if plan_given and (self.steps > 1 or self.auto):
            raise PlanError("--plan is applied as it is: it does not combine with --steps or "
                            "--auto")
        if plan_given and config.sequential:
            raise PlanError("--plan is applied as it is: --sequential chooses channels for a "
                            "plan being made; drop one")
        if self.steps > 1 and config.ratio is None:
            raise PlanError("--steps reaches a --ratio step by step: give --ratio")
        if self.steps > 1 and config.round_to == "auto":
            raise PlanError("--round-to auto times one plan's widths: it does not combine with "
                            "--steps; give a number")
        if self.auto and not (data_given and config.macs_budget is not None):
            raise PlanError("--auto measures sensitivity on data to meet a MACs budget: give "
                            "--data and --macs-budget")
        if self.finetune_epochs and not data_given:
            raise PlanError("--finetune-epochs needs --data")
        if self.recovery(data_given) and not data_given:
            raise PlanError("--recover needs calibration data: pass --data")
        if self.quantize is not None and not self.onnx:
            raise PlanError("--quantize int8 quantizes the ONNX files: drop --no-onnx")
        if self.quantize is not None and not data_given:
            raise PlanError("--quantize int8 calibrates on the data's inputs: pass --data")


__all__ = ["CAPTURE_METHODS", "DEFAULT_RATIO", "IF_SLOWER", "QUANTIZE_PRECISIONS", "OnnxSignature",
           "PruneConfig",
           "QuantizeConfig", "RunConfig", "TargetConfig", "make_config", "memory_size"]
