"""Building blocks shared by the rules: aligning, projecting and merging channel maps."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from structprune.types import ChannelMap, RuleContext, TensorInfo, spec_to_info, tensor_infos


def shifted(cmap: ChannelMap, offset: int) -> ChannelMap:
    return ChannelMap(tuple(d + offset for d in cmap.dims), cmap.ids)


def project(ctx: RuleContext, info: TensorInfo | None, dim: int, why: str) -> np.ndarray | None:
    """The 1-D atom ids along ``dim``; atoms a map spreads over other dims are merged first.

    Returns None when no map lives on ``dim``. Maps that do not touch ``dim`` are left alone.
    """
    if info is None or not isinstance(info, TensorInfo) or not info.shape:
        return None
    dim = dim % info.ndim
    cmap = info.map_on(dim)
    if cmap is None:
        return None
    if cmap.ids.ndim == 1:
        return cmap.ids  # the map's own array: rules may tell it apart by identity
    axis = cmap.dims.index(dim)
    ids = ctx.unify_along(cmap.ids, [i for i in range(cmap.ids.ndim) if i != axis])
    return ids.reshape(-1)


def block_except(ctx: RuleContext, info: Any, keep_dims: Iterable[int], why: str) -> None:
    """Block every map of ``info`` that lives on a dim outside ``keep_dims``."""
    for t in tensor_infos(info):
        keep = {d % t.ndim for d in keep_dims} if t.ndim else set()
        for m in t.maps:
            if not set(m.dims) <= keep:
                ctx.block(m, why)


def filled(ctx: RuleContext, ids: np.ndarray | None, size: int, why: str) -> np.ndarray:
    """``ids``, or fresh blocked atoms where a tensor has no map (a constant, a model input)."""
    if ids is not None:
        return ids
    fresh = ctx.fresh((size,))
    ctx.block(fresh, why)
    return fresh


def passthrough(ctx: RuleContext, x: TensorInfo, keep_dims: Sequence[int] | None = None,
                why: str = "spatial op over a channel-carrying axis") -> TensorInfo:
    """Output keeps the input's maps (those on ``keep_dims`` when given; others are blocked)."""
    if keep_dims is None:
        return ctx.result(x.maps)
    keep = {d % x.ndim for d in keep_dims}
    maps = []
    for m in x.maps:
        if set(m.dims) <= keep:
            maps.append(m)
        else:
            ctx.block(m, why)
    return ctx.result(maps)


def channel_passthrough(ctx: RuleContext, x: TensorInfo, spatial: int | None = None) -> TensorInfo:
    """Pooling-like ops: batch and channel maps pass, maps on the spatial dims are blocked."""
    spatial = x.ndim - 2 if spatial is None else spatial
    return passthrough(ctx, x, keep_dims=range(x.ndim - spatial))


def merge_elementwise(ctx: RuleContext, operands: Sequence[Any],
                      out_shape: tuple[int, ...]) -> list[ChannelMap]:
    """Broadcast the operands' maps to ``out_shape`` and unify those sharing a dim.

    A tensor operand that spans a channel dim at full size but carries no map there (a
    constant, a model input) pins those channels: they are blocked.
    """
    n = len(out_shape)
    tensors = [t for t in operands if isinstance(t, TensorInfo)]
    entries: list[tuple[tuple[int, ...], np.ndarray]] = []
    for t in tensors:
        off = n - t.ndim
        entries.extend((tuple(d + off for d in m.dims), m.ids) for m in t.maps)
    if not entries:
        return []
    # cluster maps whose dims overlap
    clusters: list[tuple[set[int], list[tuple[tuple[int, ...], np.ndarray]]]] = []
    for dims, ids in entries:
        hit = [c for c in clusters if c[0] & set(dims)]
        merged_dims = set(dims).union(*[c[0] for c in hit])
        merged = [(dims, ids)] + [e for c in hit for e in c[1]]
        clusters = [c for c in clusters if c not in hit] + [(merged_dims, merged)]
    maps = []
    for dims_set, members in clusters:
        dims = tuple(sorted(dims_set))
        shape = tuple(out_shape[d] for d in dims)
        full = []
        for mdims, ids in members:
            expand = [1] * len(dims)
            for i, d in enumerate(mdims):
                expand[dims.index(d)] = ids.shape[i]
            full.append(np.broadcast_to(ids.reshape(expand), shape))
        first = full[0]
        for other in full[1:]:
            if other is not first:
                ctx.unify(first, other)
        cmap = ChannelMap(dims, np.ascontiguousarray(first))
        for t in tensors:
            off = n - t.ndim
            for d in dims:
                td = d - off
                if td < 0 or t.shape[td] == 1:
                    continue
                if t.map_on(td) is None:
                    ctx.block(cmap, "combined with a tensor of fixed size on the channel axis")
                    break
        maps.append(cmap)
    return maps


def elementwise(ctx: RuleContext, *operands: Any, **kwargs: Any) -> TensorInfo:
    """Same-shape or broadcasting arithmetic: channels at one position go together."""
    pin_counted_channels(ctx)
    tensors = [*operands, *(v for v in kwargs.values() if isinstance(v, TensorInfo))]
    return ctx.result(merge_elementwise(ctx, tensors, ctx.out_shape))


def pin_counted_channels(ctx: RuleContext) -> None:
    """A number computed from a channel count (``x * C ** -0.5``) would change with pruning:
    those channels are kept."""
    for raw in [*ctx.node.args, *ctx.node.kwargs.values()]:
        if isinstance(raw, fx.Node) and not isinstance(ctx.info_of(raw), TensorInfo):
            for source, dim in size_sources(ctx, raw):
                ctx.block(source.map_on(dim), "its channel count is used as a number")


def size_sources(ctx: RuleContext, raw: Any) -> list[tuple[TensorInfo, int]]:
    """The (tensor, axis) pairs whose sizes a computed size was derived from: the size
    queries (``x.size(1)``, ``x.shape[1]``) behind it, through integer arithmetic."""
    found: list[tuple[TensorInfo, int]] = []
    stack, seen = [raw], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if isinstance(ctx.info_of(node), TensorInfo):
            continue  # a tensor's data, not its sizes
        query = size_query(ctx, node)
        if query is not None:
            found.append(query)
            continue
        stack.extend(_node_args(node))
    return found


def _node_args(node: fx.Node) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), nodes.append)
    return nodes


def _shape_of(ctx: RuleContext, node: Any) -> TensorInfo | None:
    """The tensor whose whole shape ``node`` is (``x.shape``, ``x.size()``), if it is one."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    is_shape = (node.op == "call_method" and node.target == "size" and len(node.args) == 1
                and not node.kwargs) or \
        (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",))
    info = ctx.info_of(node.args[0]) if is_shape else None
    return info if isinstance(info, TensorInfo) else None


def size_query(ctx: RuleContext, node: fx.Node) -> tuple[TensorInfo, int] | None:
    """The (tensor, axis) a node reads the size of (``x.size(1)``, ``x.shape[1]``), or None."""
    if node.op == "call_method" and node.target == "size" and node.args:
        info = ctx.info_of(node.args[0])
        dim = node.args[1] if len(node.args) == 2 else node.kwargs.get("dim")
        if isinstance(info, TensorInfo) and isinstance(dim, int):
            return info, dim % info.ndim
    if node.op == "call_function" and node.target is operator.getitem:
        whole = _shape_of(ctx, node.args[0])
        if whole is not None and isinstance(node.args[1], int):
            return whole, node.args[1] % whole.ndim
    return None


# Output shapes, for capture (see RuleRegistry.op)


def only_tensor_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The call's one positional tensor, or None when it has other arguments: the shape
    declarations of single-input layers compute nothing else."""
    x = args[0] if len(args) == 1 and not kwargs else None
    return x if isinstance(x, torch.Tensor) else None


def same_shape(module: Any, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], Any] | None:
    """The first input's shape and dtype: activations, norms, dropout."""
    x = args[0] if args else None
    return (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None


def broadcast_shape(module: Any, args: tuple, kwargs: dict,
                    ) -> tuple[tuple[int, ...], Any] | None:
    """Two operands of one dtype broadcast, or a float tensor and a Python number; None for
    anything that type promotion could change."""
    if len(args) != 2 or kwargs or not isinstance(args[0], torch.Tensor):
        return None
    first, other = args
    if isinstance(other, torch.Tensor):
        if other.dtype != first.dtype:
            return None
        return tuple(torch.broadcast_shapes(first.shape, other.shape)), first.dtype
    if isinstance(other, (int, float)) and not isinstance(other, bool) \
            and first.is_floating_point():
        return tuple(first.shape), first.dtype
    return None


def unknown(ctx: RuleContext, args: tuple, kwargs: dict) -> Any:
    """No rule: every channel that reaches this op is kept, and the output carries no map."""
    target = ctx.node.target
    name = getattr(target, "__name__", None) or str(target)
    if ctx.module is not None:
        name = f"{type(ctx.module).__name__} module"
    ctx.block(tensor_infos((args, kwargs)), f"no channel rule for {name}")
    return spec_to_info(ctx.output)


def metadata(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
    """Size and dtype queries read no data: the result is the captured value."""
    return spec_to_info(ctx.output)
