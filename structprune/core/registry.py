"""The op registry: everything structprune knows about an op, declared in one place.

A leaf module: it imports nothing of structprune. The built-in declarations live in
:mod:`structprune.core.rules`; the engine that reads them knows no op by name.

An op is a module type, a function (``F.conv2d``, ``torch.ops.aten.conv2d.default``) or a
method name (``"view"``). Its one declaration, :meth:`RuleRegistry.op`, says:

- ``rule``: how channels flow through it (called by the analysis with a ``RuleContext``
  and the op's arguments, each tensor as a ``TensorInfo``; module rules get the module
  first), returning the output's TensorInfo(s);
- ``macs``: how many multiply-accumulates it does, ``(capture, node, module) -> int``;
- ``shape``: its output's shape and dtype from its inputs', ``(module, args, kwargs) ->
  (shape, dtype)`` or None where it cannot say; capture then need not run the op on meta
  tensors, which costs up to a millisecond for an activation or a norm;
- ``resize``: how a module's attributes (``in_channels``, ``num_features``) follow its
  sliced tensors, with ``maintains`` naming lists of sizes (a mixed conv's ``splits``) the
  resizer recomputes.

Module types with a rule are leaves of the trace. Declare your own::

    from structprune.core.rules import register_rule, passthrough

    @register_rule(MyGate)              # forward(x) keeps channels one to one
    def my_gate(ctx, module, x):
        return passthrough(ctx, x)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn

Rule = Callable[..., Any]
Resizer = Callable[[nn.Module], None]
# (capture, node, module or None) -> multiply-accumulates of that node on the example inputs
MacCounter = Callable[[Any, fx.Node, "nn.Module | None"], int]
# (module or None, args, kwargs) -> (shape, dtype) of the output, or None
ShapeFn = Callable[["nn.Module | None", tuple, dict], "tuple[tuple[int, ...], Any] | None"]


@dataclass(frozen=True)
class Op:
    """What the registry knows about one op; None where it knows nothing."""

    rule: Rule | None = None
    macs: MacCounter | None = None
    shape: ShapeFn | None = None
    resize: Resizer | None = None
    maintains: tuple[str, ...] = ()


class RuleRegistry:
    """Op declarations by module type, function or method name."""

    def __init__(self) -> None:
        self.ops: dict[Any, Op] = {}
        self.unknown_rule: Rule | None = None  # for ops without a rule
        # package name -> declarations waiting until that package is imported
        self.pending: dict[str, list[Callable[[RuleRegistry], None]]] = {}

    def copy(self) -> RuleRegistry:
        other = RuleRegistry()
        other.ops = dict(self.ops)
        other.unknown_rule = self.unknown_rule
        other.pending = {name: list(fns) for name, fns in self.pending.items()}
        return other

    # declaration
    def op(self, *targets: Any, rule: Rule | None = None, macs: MacCounter | None = None,
           shape: ShapeFn | None = None, resize: Resizer | None = None,
           maintains: tuple[str, ...] = (), replace: bool = False) -> None:
        """Declare ``targets`` (module types, functions or method names) in one go.

        A target is declared once; ``replace=True`` overrides an existing declaration (your
        own rule for a built-in layer)."""
        declared = Op(rule, macs, shape, resize, tuple(maintains))
        for target in dict.fromkeys(targets):
            if target in self.ops and not replace:
                raise ValueError(f"{target!r} is declared already: pass replace=True to "
                                 "override its declaration")
            self.ops[target] = declared

    def rule(self, *targets: Any, **declaration: Any) -> Callable[[Rule], Rule]:
        """Decorator form of :meth:`op` for a rule: ``@registry.rule(MyGate)``."""
        def add(fn: Rule) -> Rule:
            self.op(*targets, rule=fn, **declaration)
            return fn
        return add

    def when_imported(self, package: str, declare: Callable[[RuleRegistry], None]) -> None:
        """Call ``declare(registry)`` once ``package`` is imported (now, if it already is):
        declarations for an optional library's layers, without importing the library for
        users who do not use it. Module lookups run what is pending first."""
        if package in sys.modules:
            declare(self)
        else:
            self.pending.setdefault(package, []).append(declare)

    # lookup
    def _module_op(self, module: nn.Module, field: str) -> Op | None:
        """The nearest declaration along the module's class hierarchy that has ``field``; a
        rule only from a base class whose ``forward`` the module's class does not override."""
        for package in [p for p in self.pending if p in sys.modules]:
            for declare in self.pending.pop(package):
                declare(self)
        cls = type(module)
        for base in cls.__mro__:
            op = self.ops.get(base)
            if op is None or getattr(op, field) is None:
                continue
            if field == "rule" and base is not cls and \
                    getattr(cls, "forward", None) is not getattr(base, "forward", None):
                continue
            return op
        return None

    def _op_of(self, node: fx.Node, module: nn.Module | None, field: str) -> Any:
        if node.op == "call_module":
            op = self._module_op(module, field)
        elif node.op in ("call_method", "call_function"):
            op = self.ops.get(node.target)
        else:
            op = None
        return getattr(op, field) if op is not None else None

    def rule_for(self, node: fx.Node, module: nn.Module | None) -> Rule | None:
        """The node's rule, taking the op's arguments (a module rule gets its module bound)."""
        rule = self._op_of(node, module, "rule")
        if rule is None or node.op != "call_module":
            return rule
        return lambda ctx, *args, **kwargs: rule(ctx, module, *args, **kwargs)

    def macs_for(self, node: fx.Node, module: nn.Module | None) -> MacCounter | None:
        return self._op_of(node, module, "macs")

    def shape_for(self, node: fx.Node, module: nn.Module | None) -> ShapeFn | None:
        """The node's shape function; a module's only from its own class, whose forward a
        subclass may change."""
        if node.op == "call_module":
            op = self.ops.get(type(module))
            return op.shape if op is not None else None
        return self._op_of(node, module, "shape")

    def resizer_for(self, module: nn.Module) -> Resizer | None:
        op = self._module_op(module, "resize")
        return op.resize if op is not None else None

    def maintained_attributes(self, module: nn.Module) -> tuple[str, ...]:
        """The size lists that the module's resizer recomputes."""
        op = self._module_op(module, "resize")
        return op.maintains if op is not None else ()

    def is_leaf(self, module: nn.Module) -> bool:
        return self._module_op(module, "rule") is not None

    def unknown(self, ctx: Any, args: tuple, kwargs: dict) -> Any:
        return self.unknown_rule(ctx, args, kwargs)


DEFAULT_REGISTRY = RuleRegistry()
