"""Building blocks shared by the rules: aligning, projecting and merging channel maps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..analyse import ChannelMap, RuleContext, TensorInfo, tensor_infos


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
    tensors = [*operands, *(v for v in kwargs.values() if isinstance(v, TensorInfo))]
    return ctx.result(merge_elementwise(ctx, tensors, ctx.out_shape))


def unknown(ctx: RuleContext, args: tuple, kwargs: dict) -> Any:
    """No rule: every channel that reaches this op is kept, and the output carries no map."""
    target = ctx.node.target
    name = getattr(target, "__name__", None) or str(target)
    if ctx.module is not None:
        name = f"{type(ctx.module).__name__} module"
    ctx.block(tensor_infos((args, kwargs)), f"no channel rule for {name}")
    return _plain(ctx.output)


def _plain(spec: Any) -> Any:
    from ..analyse import _spec_to_info
    return _spec_to_info(spec)


def metadata(ctx: RuleContext, *args: Any, **kwargs: Any) -> Any:
    """Size and dtype queries read no data: the result is the captured value."""
    return _plain(ctx.output)
