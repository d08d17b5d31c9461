"""Stage 1, capture: trace a model with torch.fx and record every node's output shape.

``capture(model, example_inputs)`` returns a :class:`Capture`: a ``GraphModule`` over the
user's own submodules (no weights are copied) and, for every node, what it produced on the
example inputs: a :class:`TensorSpec` for each tensor, plain Python values (sizes, ints) as
they are.

Shapes are propagated on the ``meta`` device, so no real arithmetic runs and the user's
model is never touched. Ops the rule registry declares shape-preserving or broadcasting
(activations, norms, elementwise arithmetic) skip the dispatcher altogether: on meta tensors
they cost up to a millisecond each, which would dominate the whole pass on large graphs.

Tracing treats as leaves the modules torch.fx treats as leaves (``torch.nn`` layers), plus
every module type that has a rule in the registry and any type the caller names. The tracer
is fx's, with its per-trace overheads trimmed (tested to give fx's own graph): module calls
are routed through the model's own classes rather than by patching ``nn.Module``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import threading
import traceback
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as fx_trace
import torch.nn as nn
from torch.nn.utils import stateless

from .errors import CaptureError


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor a node produced."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Capture:
    """A traced model and what each of its nodes produced on the example inputs."""

    model: nn.Module
    graph_module: nn.Module  # holds ``.graph``; its targets resolve to the user's objects
    example_inputs: tuple[Any, ...]
    values: dict[str, Any]
    method: str = "fx"
    leaf_types: tuple[type, ...] = field(default_factory=tuple)
    # the same model traced in the other train/eval mode, when that mode runs parameters
    # this trace never touches (auxiliary training heads): analysed for coupling only
    other_modes: list[Capture] = field(default_factory=list)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def spec(self, node: fx.Node) -> Any:
        return self.values[node.name]

    def tensor_spec(self, arg: Any) -> TensorSpec | None:
        """The TensorSpec a node argument produced, or None for a constant or non-tensor."""
        value = self.values.get(arg.name) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, TensorSpec) else None


_LITERAL_ARGS = frozenset((int, float, bool, str, type(None)))


_MISSING = object()
# fx internals the fast trace needs; on a torch without them, fx's own trace runs
_FAST_TRACE = all(hasattr(fx_trace, name) for name in (
    "_orig_module_call", "_orig_module_getattr", "_patch_wrapped_functions", "_autowrap_check"))
try:  # what fx collects as tensor attributes; torch < 2.6 names no tuple for it
    _CONSTANT_TYPES = fx_trace._constant_attribute_types
except AttributeError:
    from torch._library.fake_class_registry import FakeScriptObject
    _CONSTANT_TYPES = (torch.Tensor, torch.ScriptObject, FakeScriptObject)
# fx reads the return annotation through inspect.unwrap from torch 2.6 on, directly before
_UNWRAPS_ANNOTATIONS = "unwrap" in fx.Tracer.trace.__code__.co_names
# attribute values that are never tensor constants: skipped before fx's costly isinstance
_NOT_CONSTANTS = frozenset((bool, int, float, str, type(None), dict, OrderedDict, set, tuple,
                            list))


def _patchable_classes(modules: Iterable[nn.Module]) -> list[type] | None:
    """The classes of ``modules``, when every one takes ``__call__`` and ``__getattr__``
    from ``nn.Module`` unchanged (else None: fx's own trace handles it). GraphModules go to
    fx too (recompiling during the trace sets their class's ``__call__``), and so does a bare
    ``nn.Module`` instance, whose class is the one fx patches anyway."""
    classes = list(dict.fromkeys(type(m) for m in modules))
    for cls in classes:
        if cls is nn.Module or issubclass(cls, fx.GraphModule) \
                or cls.__call__ is not fx_trace._orig_module_call \
                or cls.__getattr__ is not fx_trace._orig_module_getattr:
            return None
    return classes


@contextlib.contextmanager
def _patched_classes(classes: list[type], call: Any, getattr_: Any):
    """Route module calls and attribute reads of ``classes`` through the tracer. fx patches
    ``nn.Module`` itself, and setting an attribute on a class updates every subclass: with a
    large zoo imported (timm) that is 0.3 ms a patch, four a trace."""
    saved = [(cls, name, cls.__dict__.get(name, _MISSING))
             for cls in classes for name in ("__call__", "__getattr__")]
    try:
        for cls in classes:
            cls.__call__ = call
            cls.__getattr__ = getattr_
        yield
    finally:
        for cls, name, value in reversed(saved):
            if value is _MISSING:
                if name in cls.__dict__:
                    delattr(cls, name)
            else:
                setattr(cls, name, value)


@contextlib.contextmanager
def _fx_tracing():
    """Set fx's "is tracing" flag, which models read through ``is_fx_tracing()``."""
    if hasattr(fx_trace, "_set_is_fx_tracing"):
        previous = fx_trace._get_is_fx_tracing()
        fx_trace._set_is_fx_tracing(True)
        try:
            yield
        finally:
            fx_trace._set_is_fx_tracing(previous)
    else:  # torch < 2.6 keeps a module global
        previous = fx_trace._is_fx_tracing_flag
        fx_trace._is_fx_tracing_flag = True
        try:
            yield
        finally:
            fx_trace._is_fx_tracing_flag = previous


def _tensor_attributes(root: nn.Module) -> dict[Any, str]:
    """Tensors held as plain module attributes, by qualified name, as fx collects them at
    the start of a trace (a forward that reassigns one must not change what was traced)."""
    found: dict[Any, str] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for key, value in module.__dict__.items():
            if type(value) not in _NOT_CONSTANTS and isinstance(value, _CONSTANT_TYPES):
                found[value] = prefix + key
        seen: set[int] = set()  # as named_children: each child once per parent
        for key, child in module._modules.items():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                visit(child, f"{prefix}{key}.")

    visit(root, "")
    return found


class _Tracer(fx.Tracer):
    # buffers read in forward (FrozenBatchNorm2d's statistics) become get_attr nodes, so they
    # are sliced like parameters instead of being frozen into constants
    proxy_buffer_attributes = True

    def __init__(self, leaf_types: tuple[type, ...], registry: Any):
        super().__init__()
        self.leaf_types = leaf_types
        self.registry = registry
        self.num_calls: dict[str, int] = {}  # fx's own Tracer has it only from torch 2.6

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """fx's ``Tracer.trace`` for a module, with module calls and attribute reads routed
        through the model's own classes instead of ``nn.Module`` (see ``_patched_classes``).
        Anything else goes to fx's own trace."""
        if not (_FAST_TRACE and concrete_args is None and isinstance(root, nn.Module)):
            return super().trace(root, concrete_args)
        paths = {mod: name for name, mod in root.named_modules()}
        classes = _patchable_classes(paths)
        if classes is None:
            return super().trace(root, concrete_args)
        with _fx_tracing():
            self.root = root
            fn = getattr(type(root), self.traced_func_name)
            self.root_module_name = root._get_name()
            self.submodule_paths = paths
            self.graph = fx.Graph(tracer_cls=type(self))
            code = fn.__code__
            self.graph._co_fields = {"co_name": code.co_name, "co_filename": code.co_filename,
                                     "co_firstlineno": code.co_firstlineno}
            self.tensor_attrs = _tensor_attributes(root)
            fn_globals = fn.__globals__  # before it gets patched
            fn, args = self.create_args_for_root(fn, True, None)
            proxies: dict[str, fx.Proxy] = {}
            original_call = fx_trace._orig_module_call
            original_getattr = fx_trace._orig_module_getattr
            wrapped_ids = self._autowrap_function_ids
            tracing_thread = threading.get_ident()

            # a trace started inside this one (fx's own) patches nn.Module: defer to it
            def module_getattr(mod: nn.Module, attr: str) -> Any:
                if nn.Module.__getattr__ is not original_getattr:
                    return nn.Module.__getattr__(mod, attr)
                return self.getattr(attr, original_getattr(mod, attr), proxies)

            def module_call(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
                if nn.Module.__call__ is not original_call:
                    return nn.Module.__call__(mod, *args, **kwargs)

                def forward(*args: Any, **kwargs: Any) -> Any:
                    return original_call(mod, *args, **kwargs)

                fx_trace._autowrap_check(
                    patcher, getattr(getattr(mod, "forward", mod), "__globals__", {}), wrapped_ids)
                return self.call_module(mod, forward, args, kwargs)

            def unregistered(mod: nn.Module, args: tuple) -> None:
                # a module outside the tree whose class was not patched: fail as fx does
                if mod not in self.submodule_paths and threading.get_ident() == tracing_thread \
                        and nn.Module.__call__ is original_call:
                    raise NameError("module is not installed as a submodule")

            new_patcher = getattr(fx_trace, "_new_patcher", None) or fx_trace._Patcher
            with new_patcher() as patcher, \
                    _patched_classes(classes, module_call, module_getattr), \
                    nn.modules.module.register_module_forward_pre_hook(unregistered):
                fx_trace._patch_wrapped_functions(patcher)
                fx_trace._autowrap_check(patcher, fn_globals, wrapped_ids)
                for module in self._autowrap_search:
                    fx_trace._autowrap_check(patcher, module.__dict__, wrapped_ids)
                annotated = inspect.unwrap(fn) if _UNWRAPS_ANNOTATIONS else fn
                returns = getattr(annotated, "__annotations__", {}).get("return")
                self.create_node("output", "output", (self.create_arg(fn(*args)),), {},
                                 type_expr=returns)
            self.submodule_paths = None
        return self.graph

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if not isinstance(attr_val, torch.Tensor):  # submodules, mostly: nothing to proxy
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        # the common arguments (proxies, numbers, tuples of them) skip the base class's
        # isinstance chain and opaque-type lookups, which cost a tenth of the whole trace
        cls = type(a)
        if cls is fx.Proxy:
            return a.node
        if cls in _LITERAL_ARGS:
            return a
        if cls is tuple:
            return tuple(self.create_arg(v) for v in a)
        if cls is list:
            return [self.create_arg(v) for v in a]
        if cls is dict and all(type(k) is str for k in a):  # keyword arguments
            return {k: self.create_arg(v) for k, v in a.items()}
        return super().create_arg(a)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict,
                    name: str | None = None, type_expr: Any = None) -> fx.Node:
        # the base class also records deprecated scopes, checks for mutation, copies node
        # meta under fx_traceback.preserve_node_meta, records stack traces when asked and
        # copies the module stack through copy.copy; only the module stack is read here.
        # Arguments are attached after creation: Graph.create_node walks them with pytree
        # looking for raw SymInts, which symbolic tracing never passes (a sixth of a trace).
        node = self.graph.create_node(kind, target, (), {}, name, type_expr)
        if args:
            node.args = args
        if kwargs:
            node.kwargs = kwargs
        if self.module_stack:
            node.meta["nn_module_stack"] = self.module_stack.copy()
        return node

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        # the base class, without its scope context manager (a copy.copy per call)
        path = self.path_of_module(m)
        calls = self.num_calls.get(path, 0)
        key = f"{path}@{calls}" if calls else path
        scope = self.scope
        outer = scope.module_path, scope.module_type
        scope.module_path, scope.module_type = path, type(m)
        self.module_stack[key] = (path, type(m))
        self.num_calls[path] = calls + 1
        try:
            if self.is_leaf_module(m, path):
                return self.create_proxy("call_module", path, args, kwargs)
            return forward(*args, **kwargs)
        finally:
            self.module_stack.popitem(last=True)
            scope.module_path, scope.module_type = outer

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) in self.leaf_types:
            return True
        if self.registry is not None and self.registry.is_leaf(m):
            return True
        return super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the failing call that lies outside torch: the user's code."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and "/structprune/" not in path:
            line = (frame.line or "").strip()
            return f"{frame.filename}:{frame.lineno} `{line}`"
    return "unknown location"


class _GraphHolder(nn.Module):
    """The traced graph over the user's own modules, for the stages to interpret node by node.

    It holds the root's children, parameters and buffers under their own names, and the
    tensor constants fx parked on the root, so every ``get_attr`` and ``call_module`` target
    resolves to the user's own object. Unlike an ``fx.GraphModule`` it generates no forward()
    (a fifth of a ResNet's pass) and copies no module tree: it is never called.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph):
        super().__init__()
        self.training = root.training
        self._modules.update(root._modules)
        self._parameters.update(root._parameters)
        self._buffers.update(root._buffers)
        object.__setattr__(self, "graph", graph)  # plain attribute, even beside a child "graph"
        for node in graph.nodes:
            target = node.target
            if node.op == "get_attr" and "." not in target and not hasattr(self, target):
                value = getattr(root, target)
                if isinstance(value, torch.Tensor):
                    self.register_buffer(target, value)  # as GraphModule keeps constants
                else:
                    setattr(self, target, value)


def trace(model: nn.Module, leaf_types: Iterable[type] = (), registry: Any = None,
          ) -> nn.Module:
    """Symbolically trace ``model``; raise :class:`CaptureError` naming the offending line."""
    before = set(vars(model))
    tracer = _Tracer(tuple(leaf_types), registry)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any trace failure is reported the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"cannot trace {type(model).__name__} with torch.fx at {_user_frame(exc)}: {first}. "
            "Mark the module that does this as a leaf (leaf_modules=[...]) and register a rule for it, "
            "or use the torch.export capture"
        ) from exc
    holder = _GraphHolder(tracer.root, graph)
    for attr in set(vars(model)) - before:  # fx parks tensor constants on the root: undo
        if attr.startswith("_tensor_constant"):
            delattr(model, attr)
    return holder


def _first_tensor(args: tuple) -> torch.Tensor | None:
    """The first tensor among ``args`` or inside a list/tuple argument (``torch.cat``)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


# in-place methods that change a tensor's shape or strides: where a graph calls one, an
# op's meta output must be a tensor of its own, not its input standing in for it
_RESHAPES_IN_PLACE = frozenset(("unsqueeze_", "squeeze_", "transpose_", "t_", "swapdims_",
                                "swapaxes_", "resize_", "resize_as_", "as_strided_", "set_"))


def _fast_shape(node: fx.Node, module: nn.Module | None, kind: Any, args: tuple,
                kwargs: dict, share: bool = False) -> torch.Tensor | None:
    """A meta tensor of the output's shape when the registry says how it follows from the
    inputs (``kind`` "same", "broadcast" or a shape function), else None. With ``share``, a
    shape-preserving op's meta input stands for its output: meta tensors carry no data."""
    if kind is None:
        return None
    if callable(kind):
        template = _first_tensor(args)
        shape = kind(module, args, kwargs) if template is not None else None
        return None if shape is None else \
            torch.empty(shape, dtype=template.dtype, device="meta")
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor):
        return None
    if kind == "same":
        if kwargs.get("inplace", False) or (node.op == "call_method" and kwargs):
            return None
        if share and first.is_meta:
            return first
        return torch.empty(first.shape, dtype=first.dtype, device="meta")
    if len(args) != 2 or kwargs:
        return None
    other = args[1]
    if isinstance(other, torch.Tensor):
        if other.dtype != first.dtype:
            return None
        shape = first.shape if first.shape == other.shape else \
            torch.broadcast_shapes(first.shape, other.shape)  # a slow Python function
    elif isinstance(other, (int, float)) and first.is_floating_point():
        shape = first.shape  # a Python scalar keeps a float tensor's dtype
    else:
        return None
    return torch.empty(shape, dtype=first.dtype, device="meta")


def _to_spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_spec(v) for v in value) if not hasattr(value, "_fields") \
            else type(value)(*(_to_spec(v) for v in value))
    if isinstance(value, dict):
        return {k: _to_spec(v) for k, v in value.items()}
    return value


def _run_graph(gm: nn.Module, inputs: Sequence[Any], device: str, registry: Any,
               ) -> dict[str, Any]:
    """Run ``gm`` node by node. On meta, ops whose output shape the registry knows are not
    run at all, and a module that must run gets meta copies of its own tensors only."""
    modules = dict(gm.named_modules())
    env: dict[fx.Node, Any] = {}
    values: dict[str, Any] = {}
    placeholders = iter(inputs)
    meta = device == "meta"
    share = meta and not any(n.op == "call_method" and n.target in _RESHAPES_IN_PLACE
                             for n in gm.graph.nodes)

    def load(a):
        return env[a]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            try:
                value = next(placeholders)
            except StopIteration:
                value = node.args[0] if node.args else None
        elif node.op == "output":
            break
        elif node.op == "get_attr":
            value = resolve_target(gm, node.target)
            if meta and isinstance(value, torch.Tensor):
                value = torch.empty_like(value, device="meta")
        else:
            args = fx.node.map_arg(node.args, load)
            kwargs = fx.node.map_arg(node.kwargs, load)
            module = modules.get(node.target) if node.op == "call_module" else None
            value = _fast_shape(node, module, registry.shape_kind(node, module), args, kwargs,
                                share) if meta else None
            if value is None:
                if meta and module is not None:
                    with stateless._reparametrize_module(module, _state(module, device)):
                        value = _execute(node, module, args, kwargs)
                else:
                    value = _execute(node, module, args, kwargs)
        env[node] = value
        values[node.name] = _to_spec(value)
    return values


def resolve_target(root: nn.Module, target: str) -> Any:
    """The object a ``get_attr`` or ``call_module`` target names, from ``root`` down."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _execute(node: fx.Node, module: nn.Module | None, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_module":
        return module(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise AssertionError(node.op)


def _state(module: nn.Module, device: str) -> dict[str, torch.Tensor]:
    state = {}
    named = list(module.named_parameters(remove_duplicate=False)) + \
        list(module.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if device == "meta":
            state[name] = torch.empty_like(tensor, device="meta")
        else:  # a real run must not update the user's BN statistics
            state[name] = tensor.detach().clone()
    return state


def _as_device(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta") if device == "meta" else value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_as_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _as_device(v, device) for k, v in value.items()}
    return value


def propagate(gm: nn.Module, example_inputs: Sequence[Any], registry: Any = None,
              ) -> dict[str, Any]:
    """Record what every node of ``gm`` produces: on meta tensors, else on the real inputs."""
    from .rules import DEFAULT_REGISTRY

    registry = registry or DEFAULT_REGISTRY
    errors = []
    for device in ("meta", "real"):
        try:
            # on meta, each module that runs is given meta tensors of its own as it runs
            state = _state(gm, device) if device == "real" else {}
            with torch.no_grad(), stateless._reparametrize_module(gm, state):
                return _run_graph(gm, _as_device(tuple(example_inputs), device), device,
                                  registry)
        except Exception as exc:  # noqa: BLE001 - retried on real tensors, then reported
            errors.append(exc)
    exc = errors[-1]
    raise CaptureError(
        f"the model's forward fails on the example inputs at {_user_frame(exc)}: "
        f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
        "Check --input-shape (one per forward() input)"
    ) from exc


def _check_input_count(gm: nn.Module, example_inputs: Sequence[Any]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = sum(1 for n in placeholders if not n.args)
    if not required <= len(example_inputs) <= len(placeholders):
        wanted = f"{required}" if required == len(placeholders) else \
            f"{required} to {len(placeholders)}"
        raise CaptureError(f"the model's forward() takes {wanted} inputs but {len(example_inputs)} "
                           "example inputs were given: pass one --input-shape per input")


def export_graph(model: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """The ATen-level graph of ``torch.export`` (params as get_attr under their own names)."""
    from .verify import evaluation

    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))  # export logs every guard it gives up on
    try:
        with evaluation(model), warnings.catch_warnings(), \
                contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.export.export(model, tuple(example_inputs), strict=False)
        return program.module()
    except Exception as exc:  # noqa: BLE001 - reported as one line with the user's location
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.export cannot capture {type(model).__name__} at "
                           f"{_user_frame(exc)}: {first}") from exc
    finally:
        logging.disable(previous)


def _meta_values(gm: fx.GraphModule) -> dict[str, Any]:
    values = {}
    for node in gm.graph.nodes:
        if "val" in node.meta:
            values[node.name] = _to_spec(node.meta["val"])
        elif node.op == "get_attr":
            values[node.name] = _to_spec(resolve_target(gm, node.target))
        else:
            values[node.name] = None
    return values


METHODS = ("auto", "fx", "export")


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any] | Any,
    leaf_modules: Iterable[type] = (),
    registry: Any = None,
    method: str = "auto",
) -> Capture:
    """Trace ``model`` and record what every node produces on ``example_inputs``.

    ``method`` is ``"fx"`` (symbolic tracing, keeps module calls and size arithmetic),
    ``"export"`` (torch.export's ATen graph, for models fx cannot trace) or ``"auto"``
    (fx, then torch.export when tracing fails).

    The model is traced in eval mode, whatever its own flags (they are restored): that is the
    graph one deploys and the one the check runs, and tracing in training mode would bake
    ``training=True`` into dropout calls. Parameters that only the training-mode forward uses
    (auxiliary heads) are traced in that mode too, in ``other_modes``.
    """
    from .rules import DEFAULT_REGISTRY

    if method not in METHODS:
        raise CaptureError(f"unknown capture method {method!r}: use one of {', '.join(METHODS)}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    with _mode(model, False):
        return _capture(model, example_inputs, tuple(leaf_modules), registry or DEFAULT_REGISTRY,
                        method)


def _capture(model: nn.Module, example_inputs: Sequence[Any], leaf_types: tuple[type, ...],
             registry: Any, method: str) -> Capture:
    if method in ("auto", "fx"):
        try:
            gm = trace(model, leaf_types, registry)
        except CaptureError as fx_error:
            if method == "fx":
                raise
            try:
                return _capture_export(model, example_inputs, leaf_types)
            except CaptureError as export_error:
                raise CaptureError(f"{fx_error}; the torch.export fallback failed too: "
                                   f"{export_error}") from export_error
        _check_input_count(gm, example_inputs)
        values = propagate(gm, example_inputs, registry)
        result = Capture(model, gm, tuple(example_inputs), values, "fx", leaf_types)
        unused = unused_parameters(model, gm)
        if unused:
            result.other_modes.append(
                _other_mode(model, example_inputs, leaf_types, registry, unused))
        return result
    return _capture_export(model, example_inputs, leaf_types)


def graph_parameters(cap: Capture) -> dict[str, torch.Tensor]:
    """The parameters ``cap``'s graph reads, by name: those of the modules it calls and the
    ones it reads by ``get_attr`` (an exported graph reads all of its own)."""
    gm = cap.graph_module
    if cap.method != "fx":
        return dict(gm.named_parameters())
    params: dict[str, torch.Tensor] = {}
    modules = dict(gm.named_modules())
    for node in cap.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            if module._modules:
                params.update(module.named_parameters(prefix=node.target))
            else:  # a leaf layer: its own parameters, without named_parameters' generators
                for attr, tensor in module._parameters.items():
                    if tensor is not None:
                        params[f"{node.target}.{attr}"] = tensor
        elif node.op == "get_attr":
            value = resolve_target(gm, node.target)
            if isinstance(value, nn.Parameter):
                params[node.target] = value
    return params


Holders = dict[int, list[tuple[nn.Module, str, bool]]]


class TensorIndex(NamedTuple):
    """Every parameter and buffer of a model, from one walk of its module tree."""

    # by each of its names, in the order of ``state_dict()`` (which leaves out
    # non-persistent buffers)
    named: dict[str, torch.Tensor]
    # every (module, attribute, is a parameter) holding each tensor (tied weights have several)
    holders: Holders
    # each tensor's canonical name: its first as a parameter (a state_dict key, and scored),
    # else its first at all
    canonical: dict[int, str]


def tensor_index(model: nn.Module) -> TensorIndex:
    """Index ``model``'s parameters and buffers (see :class:`TensorIndex`)."""
    named: dict[str, torch.Tensor] = {}
    holders: Holders = defaultdict(list)
    first_param: dict[int, str] = {}
    first_any: dict[int, str] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> None:  # named_modules(remove_duplicate=False)
        first = id(module) not in seen
        seen.add(id(module))
        for is_param, table in ((True, module._parameters), (False, module._buffers)):
            for attr, t in table.items():
                if t is not None:
                    name = prefix + attr
                    named[name] = t
                    first_any.setdefault(id(t), name)
                    if is_param:
                        first_param.setdefault(id(t), name)
                    if first:
                        holders[id(t)].append((module, attr, is_param))
        for key, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}{key}.")

    visit(model, "")
    return TensorIndex(named, holders, {**first_any, **first_param})


def unused_parameters(model: nn.Module, gm: nn.Module) -> list[str]:
    """Parameters of ``model`` that the traced graph never reads."""
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}

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


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    saved = [(m, m.training) for m in model.modules()]
    if all(flag == training for _, flag in saved):  # nn.Module.__setattr__ is slow: skip it
        yield
        return
    try:
        model.train(training)  # through the model's own train(), which may override it
        yield
    finally:
        for m, flag in saved:
            if m.training != flag:
                m.training = flag


def _other_mode(model: nn.Module, example_inputs: Sequence[Any], leaf_types: tuple[type, ...],
                registry: Any, unused: list[str]) -> Capture:
    """Trace the other mode too, so pruning cannot break what only it runs."""
    mode = "training" if not model.training else "eval"
    try:
        with _mode(model, not model.training):
            gm = trace(model, leaf_types, registry)
            values = propagate(gm, example_inputs, registry)
    except CaptureError as exc:
        modules = sorted({n.rsplit(".", 1)[0] for n in unused})
        raise CaptureError(
            f"{', '.join(modules[:3])}{' ...' if len(modules) > 3 else ''} run only in {mode} "
            f"mode, and the {mode}-mode forward fails on these example inputs ({exc}); "
            "pass an input shape that mode accepts") from exc
    return Capture(model, gm, tuple(example_inputs), values, "fx", leaf_types)


def _capture_export(model: nn.Module, example_inputs: Sequence[Any],
                    leaf_types: tuple[type, ...]) -> Capture:
    gm = export_graph(model, example_inputs)
    return Capture(model, gm, tuple(example_inputs), _meta_values(gm), "export", leaf_types)


def example_inputs_from_shapes(shapes: Sequence[Sequence[int]], seed: int = 0) -> tuple:
    """Random float inputs of the given shapes."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=gen) for shape in shapes)


__all__: list[str] = ["Capture", "TensorSpec", "capture", "trace", "propagate",
                      "example_inputs_from_shapes"]
