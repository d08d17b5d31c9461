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

from collections.abc import Callable
from typing import Any

import torch.fx as fx
import torch.nn as nn

Rule = Callable[..., Any]
Resizer = Callable[[nn.Module], None]


class RuleRegistry:
    """Rules by function object, method name and module type, and resizers by module type."""

    def __init__(self) -> None:
        self.functions: dict[Any, Rule] = {}
        self.methods: dict[str, Rule] = {}
        self.modules: dict[type, Rule] = {}
        self.resizers: dict[type, Resizer] = {}
        self.unknown_rule: Rule | None = None

    def copy(self) -> RuleRegistry:
        other = RuleRegistry()
        other.functions = dict(self.functions)
        other.methods = dict(self.methods)
        other.modules = dict(self.modules)
        other.resizers = dict(self.resizers)
        other.unknown_rule = self.unknown_rule
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

    def resizer(self, *types: type) -> Callable[[Resizer], Resizer]:
        def add(fn: Resizer) -> Resizer:
            for cls in types:
                self.resizers[cls] = fn
            return fn
        return add

    # lookup
    def module_rule(self, module: nn.Module) -> Rule | None:
        """The rule of the module's type, or of a base type whose forward it does not override."""
        cls = type(module)
        rule = self.modules.get(cls)
        if rule is not None:
            return rule
        for base in cls.__mro__[1:]:
            rule = self.modules.get(base)
            if rule is not None and getattr(cls, "forward", None) is getattr(base, "forward", None):
                return rule
        return None

    def resizer_for(self, module: nn.Module) -> Resizer | None:
        for cls in type(module).__mro__:
            if cls in self.resizers:
                return self.resizers[cls]
        return None

    def lookup(self, node: fx.Node, module: nn.Module | None) -> Rule | None:
        if node.op == "call_module":
            rule = self.module_rule(module)
            if rule is None:
                return None
            return lambda ctx, *args, **kwargs: rule(ctx, module, *args, **kwargs)
        if node.op == "call_method":
            return self.methods.get(node.target)
        return self.functions.get(node.target)

    def is_leaf(self, module: nn.Module) -> bool:
        return self.module_rule(module) is not None

    def unknown(self, ctx: Any, args: tuple, kwargs: dict) -> Any:
        return self.unknown_rule(ctx, args, kwargs)


DEFAULT_REGISTRY = RuleRegistry()
