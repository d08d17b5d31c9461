"""Stage 1, capture: trace a model into an ``fx.GraphModule`` and record what each node makes.

``capture(model, example_inputs)`` returns a :class:`Capture`: an fx graph whose targets name
the user's own submodules and tensors (no weights are copied), and whose every node carries,
in ``node.meta["val"]``, what it produced on the example inputs: meta tensors for tensors,
plain Python values (sizes, ints) as they are; ``Capture.graph_module`` is that graph as an
``fx.GraphModule``. Both capture paths give that one representation:

- ``fx``: symbolic tracing with :class:`LeafTracer`, an ``fx.Tracer`` that keeps every
  module type the rule registry declares (and any the caller names) as a leaf; then
  :class:`ShapePropagation`, an ``fx.Interpreter`` that runs the graph on meta tensors (no
  real arithmetic, the model's weights are never read), falling back to the real inputs
  for a graph that cannot run on meta;
- ``export``: ``torch.export``'s ATen graph, for models symbolic tracing cannot handle; its
  nodes come with ``node.meta["val"]`` already.

The model is traced in eval mode, the graph one deploys; parameters only the training-mode
forward reads (auxiliary heads) are traced in that mode too, in ``Capture.other_modes``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call

from structprune.core.registry import RuleRegistry
from structprune.core.rules import DEFAULT_REGISTRY
from structprune.errors import CaptureError, first_line
from structprune.tree import evaluation, resolve_target, training_mode
from structprune.types import TensorSpec, to_spec


@dataclass
class Capture:
    """A traced model and what each of its nodes produced on the example inputs.

    The graph's ``call_module`` and ``get_attr`` targets name attributes of ``root``: the
    user's model itself for an fx trace, the exported ``GraphModule`` for torch.export;
    the tensor constants fx made targets for are in ``constants`` (fx parks them on the
    traced module, and the user's model is left as it was). :meth:`resolve` looks both up.
    """

    model: nn.Module
    graph: fx.Graph
    example_inputs: tuple[Any, ...]
    method: str = "fx"
    leaf_types: tuple[type, ...] = ()
    root: nn.Module | None = None  # None: the model
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    # the same model traced in the other train/eval mode, when that mode runs parameters
    # this trace never touches (auxiliary training heads): analysed for coupling only
    other_modes: list[Capture] = field(default_factory=list)
    values: dict[str, Any] = field(init=False)  # node name -> TensorSpecs and plain values

    def __post_init__(self) -> None:
        if self.root is None:
            self.root = self.model
        self.values = {node.name: to_spec(node.meta.get("val")) for node in self.graph.nodes}

    def resolve(self, target: str) -> Any:
        """What a ``call_module`` or ``get_attr`` target of the graph names."""
        if target in self.constants:
            return self.constants[target]
        module = self.modules.get(target)
        return module if module is not None else resolve_target(self.root, target)

    @functools.cached_property
    def modules(self) -> dict[str, nn.Module]:
        """``root``'s submodules by qualified name."""
        return dict(self.root.named_modules(remove_duplicate=False))

    @functools.cached_property
    def graph_module(self) -> fx.GraphModule:
        """The graph as an ``fx.GraphModule`` over the user's own objects, built when first
        asked for: the pass reads the graph only, and fx's code generation for a
        ``GraphModule`` costs as much as propagating shapes (DenseNet-201: 45 ms)."""
        if isinstance(self.root, fx.GraphModule) and self.root.graph is self.graph:
            return self.root
        for name, value in self.constants.items():  # where fx parked them, for the build only
            setattr(self.root, name, value)
        try:
            return fx.GraphModule(self.root, self.graph)
        finally:
            for name in self.constants:
                delattr(self.root, name)

    def tensor_spec(self, arg: Any) -> TensorSpec | None:
        """The TensorSpec a node argument produced, or None for a constant or non-tensor."""
        value = self.values.get(arg.name) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, TensorSpec) else None


class LeafTracer(fx.Tracer):
    """fx's tracer, keeping as leaves the module types the registry has rules for and
    the ones the caller names, besides fx's own (``torch.nn`` layers)."""

    def __init__(self, leaf_types: tuple[type, ...] = (),
                 registry: RuleRegistry = DEFAULT_REGISTRY):
        super().__init__()
        # buffers read in forward (FrozenBatchNorm2d's statistics) become get_attr nodes,
        # so they are sliced like parameters instead of being frozen into constants
        self.proxy_buffer_attributes = True
        self.leaf_types = leaf_types
        self.registry = registry

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or self.registry.is_leaf(m) \
            or super().is_leaf_module(m, module_qualified_name)


class ShapePropagation(fx.Interpreter):
    """Run a graph and store each node's result in ``node.meta["val"]``, as fx's own
    ``ShapeProp`` stores tensor metadata: on meta tensors when ``meta``, else for real.

    On meta, an op whose output shape the registry declares is not run at all; a module is
    run with meta stand-ins for its own parameters and buffers (``functional_call``), and a
    ``get_attr`` gives a meta tensor, so the model's weights are never read or changed."""

    def __init__(self, module: nn.Module, meta: bool, registry: RuleRegistry,
                 graph: fx.Graph | None = None,
                 resolve: Callable[[str], Any] | None = None):
        super().__init__(module, graph=graph)
        self.meta = meta
        self.registry = registry
        self.resolve = resolve  # how targets resolve, when not as attributes of ``module``

    def fetch_attr(self, target: str) -> Any:
        return self.resolve(target) if self.resolve else super().fetch_attr(target)

    def run_node(self, n: fx.Node) -> Any:
        result = self._declared(n) if self.meta else None
        if result is None:
            result = super().run_node(n)
        n.meta["val"] = fx.node.map_aggregate(result, _as_meta)
        return result

    def _declared(self, n: fx.Node) -> torch.Tensor | None:
        """A meta tensor of the output's shape, when the registry says how it follows."""
        if n.op not in ("call_module", "call_function", "call_method"):
            return None
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        shape_of = self.registry.shape_for(n, module)
        if shape_of is None:
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        known = shape_of(module, args, kwargs)
        return None if known is None else torch.empty(known[0], dtype=known[1], device="meta")

    def placeholder(self, target: str, args: tuple, kwargs: dict) -> Any:
        value = super().placeholder(target, args, kwargs)
        return fx.node.map_aggregate(value, _as_meta) if self.meta else value

    def get_attr(self, target: str, args: tuple, kwargs: dict) -> Any:
        value = super().get_attr(target, args, kwargs)  # graph constants stay real otherwise
        return _as_meta(value) if self.meta else value

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        if not self.meta:
            return super().call_module(target, args, kwargs)
        module = self.fetch_attr(target)
        tensors = dict(module.named_parameters(remove_duplicate=False))
        tensors.update(module.named_buffers(remove_duplicate=False))
        stand_ins: dict[int, torch.Tensor] = {}  # one per tensor: tied weights stay tied
        meta = {k: stand_ins.setdefault(id(v), _as_meta(v)) for k, v in tensors.items()}
        return functional_call(module, meta, args, kwargs, strict=False)


def _as_meta(value: Any) -> Any:
    """A meta tensor of ``value``'s shape, strides and dtype (other values as they are).
    ``empty_strided``, not ``empty_like``: on meta, empty_like goes through Python reference
    code, about 250 us a call, a quarter of capturing ResNet-50."""
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


class _Propagate(nn.Module):
    """Holds the graph module so that ``functional_call`` can swap its tensors for a real run."""

    def __init__(self, gm: fx.GraphModule, registry: RuleRegistry):
        super().__init__()
        self.gm = gm
        self.registry = registry

    def forward(self, *inputs: Any) -> Any:
        return ShapePropagation(self.gm, False, self.registry).run(*inputs)


def propagate(cap: Capture, registry: RuleRegistry = DEFAULT_REGISTRY) -> None:
    """Fill ``node.meta["val"]`` for every node of ``cap``'s graph, and ``cap.values``: on meta
    tensors, else (for a graph that cannot run on meta, such as one reading plain tensor
    attributes) on the real inputs, with the model's buffers copied so that nothing of the
    user's model changes."""
    with torch.no_grad():
        try:
            ShapePropagation(cap.root, True, registry, cap.graph, cap.resolve) \
                .run(*cap.example_inputs)
        except Exception:  # noqa: BLE001 - retried on real tensors, then reported
            _propagate_for_real(cap, registry)
    cap.values = {node.name: to_spec(node.meta.get("val")) for node in cap.graph.nodes}


def _propagate_for_real(cap: Capture, registry: RuleRegistry) -> None:
    runner = _Propagate(cap.graph_module, registry)
    state = dict(runner.named_parameters(remove_duplicate=False))
    state.update(runner.named_buffers(remove_duplicate=False))
    copies: dict[int, torch.Tensor] = {}  # one per tensor: tied buffers stay tied
    swapped = {k: v if isinstance(v, nn.Parameter) else copies.setdefault(id(v), v.clone())
               for k, v in state.items()}
    try:
        functional_call(runner, swapped, cap.example_inputs, strict=False)
    except Exception as exc:  # noqa: BLE001 - reported with the user's location
        raise CaptureError(
            f"the model's forward fails on the example inputs at {_user_frame(exc)}: "
            f"{type(exc).__name__}: {first_line(exc)}. Check --input-shape (one per "
            "forward() input)") from exc


def is_user_file(path: str) -> bool:
    """A source file of the user's, not of torch or structprune."""
    path = path.replace("\\", "/")
    return "/torch/" not in path and "/structprune/" not in path


def innermost_user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the failing call that lies in the user's code."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if is_user_file(frame.filename):
            return frame
    return None


def _user_frame(exc: BaseException) -> str:
    frame = innermost_user_frame(exc)
    if frame is None:
        return "unknown location"
    return f"{frame.filename}:{frame.lineno} `{first_line(frame.line or '', 60)}`"


def trace(model: nn.Module, leaf_types: Iterable[type] = (),
          registry: RuleRegistry = DEFAULT_REGISTRY) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    """Symbolically trace ``model``: its graph, and the tensor constants fx made ``get_attr``
    targets for (taken back off the model). Raise :class:`CaptureError` naming the offending
    line."""
    before = set(vars(model))
    try:
        graph = LeafTracer(tuple(leaf_types), registry).trace(model)
    except Exception as exc:  # noqa: BLE001 - any trace failure is reported the same way
        raise CaptureError(
            f"cannot trace {type(model).__name__} with torch.fx at {_user_frame(exc)}: "
            f"{first_line(exc)}. Mark the module that does this as a leaf "
            "(leaf_modules=[...]) and register a rule for it, or use the torch.export capture"
        ) from exc
    constants = {}
    for attr in set(vars(model)) - before:  # fx parks tensor constants on the root: undo
        if attr.startswith("_tensor_constant"):
            constants[attr] = getattr(model, attr)
            delattr(model, attr)
    return graph, constants


def export_graph(model: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """The ATen-level graph of ``torch.export`` (params as get_attr under their own names)."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))  # export logs every guard it gives up on
    try:
        with evaluation(model), module_state_kept(model), warnings.catch_warnings(), \
                contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.export.export(model, tuple(example_inputs), strict=False)
        gm = program.module()
    except Exception as exc:  # noqa: BLE001 - reported as one line with the user's location
        raise CaptureError(f"torch.export cannot capture {type(model).__name__} at "
                           f"{_user_frame(exc)}: {first_line(exc)}") from exc
    finally:
        logging.disable(previous)
    for node in gm.graph.nodes:  # the one representation: get_attr nodes carry values too
        if node.op == "get_attr" and "val" not in node.meta:
            node.meta["val"] = _as_meta(resolve_target(gm, node.target))
    return gm


@contextlib.contextmanager
def module_state_kept(model: nn.Module) -> Iterator[None]:
    """Undo what ``forward`` assigns to the model's modules while torch.export traces it.

    A forward that caches a value on its module (a detection head's ``anchors``) would
    otherwise leave a FakeTensor of the trace there, which no later real run can use.
    """
    saved = [(m, dict(vars(m)), dict(m.named_buffers(recurse=False))) for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes, buffers in saved:
            for name in set(vars(module)) - set(attributes):
                delattr(module, name)
            for name, value in attributes.items():
                if vars(module).get(name) is not value:
                    setattr(module, name, value)
            for name, value in buffers.items():
                setattr(module, name, value)


def _exported(model: nn.Module, gm: fx.GraphModule, example_inputs: tuple,
              leaf_types: tuple[type, ...]) -> Capture:
    return Capture(model, gm.graph, example_inputs, "export", leaf_types, root=gm)


def _check_input_count(graph: fx.Graph, example_inputs: Sequence[Any]) -> None:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    named = [n for n in placeholders if not n.target.startswith("*")]  # not *args, **kwargs
    required = sum(1 for n in named if not n.args)
    most = float("inf") if len(named) < len(placeholders) else len(named)
    if not required <= len(example_inputs) <= most:
        wanted = f"{required}" if required == most else \
            f"{required} or more" if most == float("inf") else f"{required} to {most}"
        raise CaptureError(f"the model's forward() takes {wanted} inputs but {len(example_inputs)} "
                           "example inputs were given: pass one --input-shape per input")


METHODS = ("auto", "fx", "export")


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any] | Any,
    leaf_modules: Iterable[type] = (),
    registry: RuleRegistry | None = None,
    method: str = "auto",
) -> Capture:
    """Trace ``model`` and record what every node produces on ``example_inputs``.

    ``method`` is ``"fx"`` (symbolic tracing, keeps module calls and size arithmetic),
    ``"export"`` (torch.export's ATen graph, for models fx cannot trace) or ``"auto"``
    (fx, then torch.export when tracing fails).
    """
    registry = registry or DEFAULT_REGISTRY
    if method not in METHODS:
        raise CaptureError(f"unknown capture method {method!r}: use one of {', '.join(METHODS)}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    leaf_types = tuple(leaf_modules)
    lazy = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if isinstance(t, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        raise CaptureError(f"{lazy[0]} is not initialised yet (a lazy module): run the model "
                           "once on an example input before pruning it")
    with evaluation(model):
        if method == "export":
            return _exported(model, export_graph(model, example_inputs), example_inputs,
                             leaf_types)
        try:
            graph, constants = trace(model, leaf_types, registry)
        except CaptureError as fx_error:
            if method == "fx":
                raise
            try:
                gm = export_graph(model, example_inputs)
            except CaptureError as export_error:
                raise _both_failed(model, fx_error, export_error) from export_error
            return _exported(model, gm, example_inputs, leaf_types)
        _check_input_count(graph, example_inputs)
        result = Capture(model, graph, example_inputs, "fx", leaf_types, constants=constants)
        propagate(result, registry)
        unused = unused_parameters(model, graph)
        if unused:
            result.other_modes.append(_training_mode(model, example_inputs, leaf_types,
                                                     registry, unused))
    return result


def _both_failed(model: nn.Module, fx_error: CaptureError,
                 export_error: CaptureError) -> CaptureError:
    """One line for two failures: where each capture stopped and the start of its message."""
    def where(error: CaptureError) -> str:
        cause = error.__cause__ or error
        return f"at {_user_frame(cause)}: {first_line(cause, 100)}"

    stops = f"torch.fx and torch.export both stop {where(fx_error)}" \
        if where(fx_error) == where(export_error) else \
        f"torch.fx stops {where(fx_error)}; torch.export stops {where(export_error)}"
    return CaptureError(
        f"cannot capture {type(model).__name__}: {stops}. Mark the module that does this as a leaf "
        "(leaf_modules=[...]) and register a rule for it (--verbose prints the full errors)")


def graph_parameters(cap: Capture) -> dict[str, torch.Tensor]:
    """The parameters ``cap``'s graph reads, by name: those of the modules it calls and the
    ones it reads by ``get_attr`` (an exported graph reads all of its own)."""
    if cap.method != "fx":
        return dict(cap.root.named_parameters())
    params: dict[str, torch.Tensor] = {}
    for node in cap.graph.nodes:
        if node.op == "call_module":
            params.update(cap.resolve(node.target).named_parameters(prefix=node.target))
        elif node.op == "get_attr":
            value = cap.resolve(node.target)
            if isinstance(value, nn.Parameter):
                params[node.target] = value
    return params


def unused_parameters(model: nn.Module, graph: fx.Graph) -> list[str]:
    """Parameters of ``model`` that the traced graph never reads."""
    attrs = {n.target for n in graph.nodes if n.op == "get_attr"}
    called = {n.target for n in graph.nodes if n.op == "call_module"}

    def used(name: str) -> bool:
        if name in attrs:
            return True
        owner = name.rpartition(".")[0]  # its module, then each module containing it
        while owner:
            if owner in called:
                return True
            owner = owner.rpartition(".")[0]
        return False

    return [n for n, _ in model.named_parameters() if not used(n)]


def _training_mode(model: nn.Module, example_inputs: tuple, leaf_types: tuple[type, ...],
                   registry: RuleRegistry, unused: list[str]) -> Capture:
    """Trace the training-mode forward too, so pruning cannot break what only it runs."""
    try:
        with training_mode(model, training=True):
            graph, constants = trace(model, leaf_types, registry)
        result = Capture(model, graph, example_inputs, "fx", leaf_types, constants=constants)
        # shapes are those of eval mode, in which batch norm also takes a batch of one
        propagate(result, registry)
    except CaptureError as exc:
        modules = sorted({n.rsplit(".", 1)[0] for n in unused})
        raise CaptureError(
            f"{', '.join(modules[:3])}{' ...' if len(modules) > 3 else ''} run only in training "
            f"mode, and the training-mode forward fails on these example inputs ({exc}); "
            "pass an input shape that mode accepts") from exc
    return result


__all__ = ["Capture", "LeafTracer", "ShapePropagation", "capture", "export_graph",
           "graph_parameters", "propagate", "trace", "unused_parameters"]
