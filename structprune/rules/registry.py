"""The rule registry: one small function per op, looked up by the analysis engine.

A rule receives a :class:`~structprune.analyse.RuleContext` and the op's arguments, with each
tensor replaced by its :class:`~structprune.analyse.TensorInfo`, and returns the output's
TensorInfo (or a tuple of them). Module rules also receive the module first. A *resizer*
updates a module's attributes (``in_channels``, ``num_features``, ...) after its tensors
were sliced.

Register your own::

    from structprune.rules import register_module

    @register_module(MyGate)
    def my_gate(ctx, module, x):
        return passthrough(ctx, x)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch.fx as fx
import torch.nn as nn

Rule = Callable[..., Any]
Resizer = Callable[[nn.Module], None]
# (capture, node, module or None) -> multiply-accumulates of that node on the example inputs
MacCounter = Callable[[Any, fx.Node, "nn.Module | None"], int]
# (module or None, args, kwargs) -> the output's shape, or None to run the op on meta tensors
ShapeFn = Callable[["nn.Module | None", tuple, dict], "tuple[int, ...] | None"]


class RuleRegistry:
    """Rules by function object, method name and module type, and resizers by module type."""

    def __init__(self) -> None:
        self.functions: dict[Any, Rule] = {}
        self.methods: dict[str, Rule] = {}
        self.modules: dict[type, Rule] = {}
        self.resizers: dict[type, Resizer] = {}
        self.maintained: dict[type, tuple[str, ...]] = {}
        self.counters: dict[Any, MacCounter] = {}  # by function, module type or method name
        # op -> "same", "broadcast" or a ShapeFn: capture's shortcut past the dispatcher
        self.shapes: dict[Any, str | ShapeFn] = {}
        self.unknown_rule: Rule | None = None
        # package name -> registrations waiting until that package is imported
        self.pending: dict[str, list[Callable[[RuleRegistry], None]]] = {}

    def copy(self) -> RuleRegistry:
        other = RuleRegistry()
        other.functions = dict(self.functions)
        other.methods = dict(self.methods)
        other.modules = dict(self.modules)
        other.resizers = dict(self.resizers)
        other.maintained = dict(self.maintained)
        other.counters = dict(self.counters)
        other.shapes = dict(self.shapes)
        other.unknown_rule = self.unknown_rule
        other.pending = {name: list(fns) for name, fns in self.pending.items()}
        return other

    # registration
    def function(self, *targets: Any) -> Callable[[Rule], Rule]:
        def add(rule: Rule) -> Rule:
            for target in targets:
                self.functions[target] = rule
            return rule
        return add

    def method(self, *names: str) -> Callable[[Rule], Rule]:
        def add(rule: Rule) -> Rule:
            for name in names:
                self.methods[name] = rule
            return rule
        return add

    def module(self, *types: type) -> Callable[[Rule], Rule]:
        """Register a module rule; traced models treat these module types as leaves."""
        def add(rule: Rule) -> Rule:
            for cls in types:
                self.modules[cls] = rule
            return rule
        return add

    def resizer(self, *types: type, maintains: tuple[str, ...] = ()) -> Callable[[Resizer], Resizer]:
        """Register a resizer. ``maintains`` names list attributes of sizes (such as a mixed
        conv's ``splits``) that the resizer recomputes: a split whose literal sizes equal one of
        them, inside such a module, may then be pruned part by part."""
        def add(fn: Resizer) -> Resizer:
            for cls in types:
                self.resizers[cls] = fn
                self.maintained[cls] = tuple(maintains)
            return fn
        return add

    def macs(self, *targets: Any) -> Callable[[MacCounter], MacCounter]:
        """Register how many multiply-accumulates an op does (functions, module types, or
        method names as strings); ops without a counter count zero."""
        def add(fn: MacCounter) -> MacCounter:
            for target in targets:
                self.counters[target] = fn
            return fn
        return add

    def same_shape(self, *targets: Any) -> None:
        """Declare ops whose output has their first input's shape and dtype (activations,
        norms): capture then skips shape propagation for them, which is costly per call."""
        for target in targets:
            self.shapes[target] = "same"

    def broadcast_shape(self, *targets: Any) -> None:
        """Declare binary ops whose output is their operands broadcast (add, mul, ...)."""
        for target in targets:
            self.shapes[target] = "broadcast"

    def output_shape(self, *targets: Any) -> Callable[[ShapeFn], ShapeFn]:
        """Register how an op's output shape follows from its module and its inputs' shapes
        (convs, pools, linear maps): capture then computes it instead of running the op.
        The function returns None for any case it does not cover; the op then runs."""
        def add(fn: ShapeFn) -> ShapeFn:
            for target in targets:
                self.shapes[target] = fn
            return fn
        return add

    def when_imported(self, package: str, register: Callable[[RuleRegistry], None]) -> None:
        """Call ``register(registry)`` once ``package`` is imported (now, if it already is):
        rules for an optional library's layers, without importing the library for users who
        do not use it. Module lookups register what is pending first."""
        if package in sys.modules:
            register(self)
        else:
            self.pending.setdefault(package, []).append(register)

    def _register_pending(self) -> None:
        for package in [p for p in self.pending if p in sys.modules]:
            for register in self.pending.pop(package):
                register(self)

    # lookup
    def module_rule(self, module: nn.Module) -> Rule | None:
        """The rule of the module's type, or of a base type whose forward it does not override."""
        if self.pending:
            self._register_pending()
        cls = type(module)
        rule = self.modules.get(cls)
        if rule is not None:
            return rule
        for base in cls.__mro__[1:]:
            rule = self.modules.get(base)
            if rule is not None and getattr(cls, "forward", None) is getattr(base, "forward", None):
                return rule
        return None

    def _registered_type(self, table: dict, module: nn.Module) -> type | None:
        """The module's own type or nearest base type that ``table`` has an entry for."""
        if self.pending:
            self._register_pending()
        return next((cls for cls in type(module).__mro__ if cls in table), None)

    def resizer_for(self, module: nn.Module) -> Resizer | None:
        cls = self._registered_type(self.resizers, module)
        return self.resizers[cls] if cls is not None else None

    def maintained_attributes(self, module: nn.Module) -> tuple[str, ...]:
        cls = self._registered_type(self.resizers, module)
        return self.maintained.get(cls, ()) if cls is not None else ()

    def lookup(self, node: fx.Node, module: nn.Module | None) -> Rule | None:
        if node.op == "call_module":
            rule = self.module_rule(module)
            if rule is None:
                return None
            return lambda ctx, *args, **kwargs: rule(ctx, module, *args, **kwargs)
        if node.op == "call_method":
            return self.methods.get(node.target)
        return self.functions.get(node.target)

    def counter_for(self, node: fx.Node, module: nn.Module | None) -> MacCounter | None:
        if node.op == "call_module":
            cls = self._registered_type(self.counters, module)
            return self.counters[cls] if cls is not None else None
        if node.op in ("call_method", "call_function"):
            return self.counters.get(node.target)
        return None

    def shape_kind(self, node: fx.Node, module: nn.Module | None) -> str | ShapeFn | None:
        """"same", "broadcast", a ShapeFn, or None (propagate shapes by running the op)."""
        if node.op == "call_module":
            return self.shapes.get(type(module))  # exact type: a subclass may change forward
        if node.op in ("call_method", "call_function"):
            return self.shapes.get(node.target)
        return None

    def is_leaf(self, module: nn.Module) -> bool:
        return self.module_rule(module) is not None

    def unknown(self, ctx: Any, args: tuple, kwargs: dict) -> Any:
        return self.unknown_rule(ctx, args, kwargs)


DEFAULT_REGISTRY = RuleRegistry()
