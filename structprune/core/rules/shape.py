"""Ops that move channels around without arithmetic: reshape, permute, cat, split, index."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from structprune.core.registry import DEFAULT_REGISTRY as R
from structprune.core.rules.base import (
    filled,
    merge_elementwise,
    passthrough,
    project,
    size_query,
    size_sources,
)
from structprune.types import ChannelMap, RuleContext, TensorInfo

HARD_CODED = "a size in view/reshape is hard-coded in forward()"


def reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dims with equal products (row-major reshape blocks)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ia, jb = [i], [j]
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ia.append(i)
                pa *= a[i]
                i += 1
            elif j < len(b):
                jb.append(j)
                pb *= b[j]
                j += 1
            else:
                break
        groups.append((ia, jb))
    if groups:
        groups[-1][0].extend(range(i, len(a)))
        groups[-1][1].extend(range(j, len(b)))
    else:
        groups.append((list(range(len(a))), list(range(len(b)))))
    return groups


def _varying_axes(ids: np.ndarray) -> list[int]:
    axes = []
    for axis in range(ids.ndim):
        if ids.shape[axis] > 1:
            first = np.take(ids, [0], axis=axis)
            if not np.array_equal(np.broadcast_to(first, ids.shape), ids):
                axes.append(axis)
    return axes


def reshape(ctx: RuleContext, x: TensorInfo, literal_dims: set[int],
            why: str = HARD_CODED) -> TensorInfo:
    """Carry maps through a row-major reshape to ``ctx.out_shape``.

    ``literal_dims`` are output dims whose size is a literal in the traced code: they cannot
    shrink, so atoms along them are merged. A map left with no free dim to shrink is blocked
    (``why``: where the literal comes from).
    """
    out_shape = ctx.out_shape
    groups = reshape_groups(x.shape, out_shape)
    maps = []
    taken: set[int] = set()
    for m in x.maps:
        touched = [g for g in groups if set(g[0]) & set(m.dims)]
        in_dims = list(range(min(touched[0][0]), max(touched[-1][0]) + 1))
        out_dims = list(range(min(touched[0][1]), max(touched[-1][1]) + 1))
        expand = [x.shape[d] if d in m.dims else 1 for d in in_dims]
        ids = np.broadcast_to(m.ids.reshape(expand), [x.shape[d] for d in in_dims])
        ids = ids.reshape([out_shape[d] for d in out_dims])
        literal_axes = [i for i, d in enumerate(out_dims) if d in literal_dims and out_shape[d] > 1]
        ids = ctx.unify_along(ids, literal_axes)
        ids = np.broadcast_to(ids, [out_shape[d] for d in out_dims])
        varying = _varying_axes(ids)
        free = [a for a in varying if a not in literal_axes]
        if not free:
            ctx.block(m, why)
            continue
        if len(free) > 1:
            ctx.block(m, "reshape scatters channels over several axes")
            continue
        axis = free[0]
        if out_dims[axis] in taken:  # another map already lives there: they would mix
            ctx.block(m, "reshape merges two channel axes")
            for other in [o for o in maps if out_dims[axis] in o.dims]:
                ctx.block(other, "reshape merges two channel axes")
                maps.remove(other)
            continue
        taken.add(out_dims[axis])
        index = tuple(slice(None) if a == axis else 0 for a in range(ids.ndim))
        maps.append(ChannelMap((out_dims[axis],), np.ascontiguousarray(ids[index])))
    return ctx.result(maps)


def _size_args(args: tuple) -> tuple[list[Any], bool]:
    if len(args) == 1 and isinstance(args[0], (list, tuple, torch.Size)):
        return list(args[0]), True
    return list(args), False


def _size_dims(ctx: RuleContext, x: TensorInfo, first: int, packed: bool,
               ) -> tuple[set[int], dict[int, np.ndarray]]:
    """Output dims whose size cannot follow the channels of ``x`` (literals, and sizes
    computed from another tensor's channel axis, which is then kept too), and dims whose
    size is another tensor's channel count read as is: those channels go together."""
    raw = ctx.node.args[first] if packed else ctx.node.args[first:]
    if packed and isinstance(raw, fx.Node):  # the whole shape is computed at run time
        return set(), {}
    literal: set[int] = set()
    ties: dict[int, np.ndarray] = {}
    own = [m.ids.ravel() for m in x.maps]
    for i, r in enumerate(raw):
        if not isinstance(r, fx.Node):
            if r != -1:
                literal.add(i)
            continue
        direct = size_query(ctx, r)
        for source, dim in size_sources(ctx, r):
            cmap = source.map_on(dim)
            if cmap is None or any(np.array_equal(cmap.ids.ravel(), ids) for ids in own):
                continue
            if direct is not None and cmap.dims == (dim,):
                ties[i] = cmap.ids
            else:
                ctx.block(cmap, "a size computed from it sets a reshape of another tensor")
                literal.add(i)
    return literal, ties


def _sized_reshape(ctx: RuleContext, x: TensorInfo, first: int, packed: bool) -> TensorInfo:
    literal, ties = _size_dims(ctx, x, first, packed)
    out = reshape(ctx, x, literal)
    for dim, ids in ties.items():
        cmap = out.map_on(dim)
        if cmap is not None and cmap.dims == (dim,) and cmap.ids.size == ids.size:
            ctx.unify(cmap.ids, ids)  # the size read from one tensor shapes the other
        else:
            ctx.block(ids, "its size sets a reshape of another tensor")
            ctx.block(cmap, "reshaped to a size read from another tensor")
    return out


@R.rule("view_as", "reshape_as")
def _view_as(ctx: RuleContext, x: TensorInfo, other: TensorInfo) -> TensorInfo:
    """Sizes come from ``other``: its axes without channel maps keep their size."""
    literal = {d for d in range(other.ndim) if other.map_on(d) is None and other.shape[d] > 1}
    return reshape(ctx, x, literal)


@R.rule("view", "reshape")
def _view(ctx: RuleContext, x: TensorInfo, *shape: Any) -> TensorInfo:
    sizes, packed = _size_args(shape)
    if len(sizes) == 1 and isinstance(sizes[0], torch.dtype):
        return passthrough(ctx, x)
    return _sized_reshape(ctx, x, 1, packed)


@R.rule(torch.reshape)
def _reshape_fn(ctx: RuleContext, input: TensorInfo, shape: Any) -> TensorInfo:
    return _sized_reshape(ctx, input, 1, True)


@R.rule(torch.flatten)
@R.rule("flatten")
def _flatten(ctx: RuleContext, input: TensorInfo, start_dim: int = 0, end_dim: int = -1):
    return reshape(ctx, input, set())


@R.rule(nn.Flatten)
def _flatten_module(ctx: RuleContext, module: nn.Flatten, x: TensorInfo) -> TensorInfo:
    return reshape(ctx, x, set())


@R.rule("unflatten")
@R.rule(torch.unflatten)
def _unflatten(ctx: RuleContext, input: TensorInfo, dim: int, sizes: Sequence[int]) -> TensorInfo:
    dim = dim % input.ndim
    literal = {dim + i for i, s in enumerate(sizes) if s != -1}
    return reshape(ctx, input, literal)


@R.rule(nn.Unflatten)
def _unflatten_module(ctx: RuleContext, module: nn.Unflatten, x: TensorInfo) -> TensorInfo:
    dim = module.dim % x.ndim
    return reshape(ctx, x, {dim + i for i, s in enumerate(module.unflattened_size) if s != -1})


@R.rule(torch.squeeze, torch.unsqueeze)
@R.rule("squeeze", "unsqueeze", "squeeze_", "unsqueeze_")
def _squeeze(ctx: RuleContext, input: TensorInfo, *dims: Any) -> TensorInfo:
    return reshape(ctx, input, set())


def permute(ctx: RuleContext, x: TensorInfo, order: Sequence[int]) -> TensorInfo:
    order = [d % x.ndim for d in order]
    where = {src: dst for dst, src in enumerate(order)}
    maps = []
    for m in x.maps:
        new_dims = [where[d] for d in m.dims]
        sort = np.argsort(new_dims)
        maps.append(ChannelMap(tuple(sorted(new_dims)), np.transpose(m.ids, sort)))
    return ctx.result(maps)


@R.rule("permute")
def _permute(ctx: RuleContext, x: TensorInfo, *dims: Any) -> TensorInfo:
    order, _ = _size_args(dims)
    return permute(ctx, x, order)


@R.rule(torch.permute)
def _permute_fn(ctx: RuleContext, input: TensorInfo, dims: Sequence[int]) -> TensorInfo:
    return permute(ctx, input, dims)


@R.rule(torch.transpose, torch.swapaxes, torch.swapdims)
@R.rule("transpose", "swapaxes", "swapdims")
def transpose(ctx: RuleContext, input: TensorInfo, dim0: int, dim1: int) -> TensorInfo:
    order = list(range(input.ndim))
    a, b = dim0 % input.ndim, dim1 % input.ndim
    order[a], order[b] = order[b], order[a]
    return permute(ctx, input, order)


@R.rule(torch.movedim, torch.moveaxis)
@R.rule("movedim", "moveaxis")
def _movedim(ctx: RuleContext, input: TensorInfo, source: Any, destination: Any) -> TensorInfo:
    src = [source] if isinstance(source, int) else list(source)
    dst = [destination] if isinstance(destination, int) else list(destination)
    n = input.ndim
    src, dst = [s % n for s in src], [d % n for d in dst]
    rest = [d for d in range(n) if d not in src]
    order = [None] * n
    for s, d in zip(src, dst, strict=True):
        order[d] = s
    it = iter(rest)
    order = [o if o is not None else next(it) for o in order]
    return permute(ctx, input, order)


def cat_shape(module: Any, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], Any] | None:
    """Tensors of one dtype and rank joined along ``dim``; None for anything else (the op
    then runs on meta tensors). Declared because concatenation's meta kernel is Python
    reference code, about 450 us a call: a fifth of capturing DenseNet-201."""
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    if len(args) > 2 or set(kwargs) - {"tensors", "dim", "axis"} or not isinstance(dim, int) \
            or not isinstance(tensors, (list, tuple)) or not tensors \
            or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    first = tensors[0]
    if first.ndim == 0 or not -first.ndim <= dim < first.ndim:
        return None
    dim %= first.ndim
    before, after = first.shape[:dim], first.shape[dim + 1:]
    if any(t.dtype != first.dtype or t.ndim != first.ndim or t.shape[:dim] != before
           or t.shape[dim + 1:] != after for t in tensors):
        return None
    return (*first.shape[:dim], sum(t.shape[dim] for t in tensors), *first.shape[dim + 1:]), \
        first.dtype


@R.rule(torch.cat, torch.concat, torch.concatenate, shape=cat_shape)
def cat(ctx: RuleContext, tensors: Sequence[Any], dim: int = 0, axis: int | None = None):
    dim = axis if axis is not None else dim
    parts = [t for t in tensors if isinstance(t, TensorInfo) and t.shape != (0,)]
    n = len(ctx.out_shape)
    dim = dim % n
    pieces, others = [], []
    for t in parts:
        own = t.map_on(dim)
        if own is not None and len(own.dims) > 1:
            ids = project(ctx, t, dim, "cat")
        else:
            ids = own.ids if own is not None else None
        pieces.append(filled(ctx, ids, t.shape[dim], "concatenated with a tensor that cannot be pruned"))
        others.append(TensorInfo(t.shape[:dim] + (1,) + t.shape[dim + 1:],
                                 tuple(m for m in t.maps if dim not in m.dims)))
    shape = ctx.out_shape[:dim] + (1,) + ctx.out_shape[dim + 1:]
    maps = merge_elementwise(ctx, others, shape)
    maps.append(ChannelMap((dim,), np.concatenate(pieces)))
    return ctx.result(maps)


@R.rule(torch.stack)
def stack(ctx: RuleContext, tensors: Sequence[Any], dim: int = 0) -> TensorInfo:
    n = len(ctx.out_shape)
    dim = dim % n
    lifted = []
    for t in tensors:
        if isinstance(t, TensorInfo):
            maps = tuple(ChannelMap(tuple(d + (d >= dim) for d in m.dims), m.ids) for m in t.maps)
            lifted.append(TensorInfo(t.shape[:dim] + (1,) + t.shape[dim:], maps))
    return ctx.result(merge_elementwise(ctx, lifted, ctx.out_shape))


def split_equal(ctx: RuleContext, x: TensorInfo, chunks: int, dim: int, why: str) -> tuple:
    """``chunks`` equal parts along ``dim``: part k's channel i goes with every part's i."""
    dim = dim % x.ndim
    specs = ctx.output
    own = x.map_on(dim)
    size = x.shape[dim]
    rest = [m for m in x.maps if dim not in m.dims]
    if own is None:
        return tuple(ctx.result(rest, spec) for spec in specs)
    ids = project(ctx, x, dim, why)
    sizes = [s.shape[dim] for s in specs]
    if len(set(sizes)) != 1 or sizes[0] * len(sizes) != size:
        ctx.block(ids, f"{why}: parts of unequal size")
        return tuple(ctx.result(rest, spec) for spec in specs)
    parts = ids.reshape(len(sizes), sizes[0])
    ctx.unify_along(parts, [0])
    return tuple(ctx.result(rest + [ChannelMap((dim,), parts[k])], spec)
                 for k, spec in enumerate(specs))


def literal_split(ctx: RuleContext, x: TensorInfo, sizes: Any, dim: int, why: str) -> tuple:
    """Split with sizes fixed in the code: the channels stay, unless the module the split runs
    in keeps the sizes as an attribute its resizer recomputes (a mixed conv's ``splits``);
    then each part is pruned on its own and keeps at least one channel."""
    dim = dim % x.ndim
    own = x.map_on(dim)
    rest = [m for m in x.maps if dim not in m.dims]
    parts = [spec.shape[dim] for spec in ctx.output]
    if own is None or len(parts) < 2 or ctx.maintained_sizes(sizes) is None:
        ctx.block(own, why)
        return tuple(ctx.result(rest, spec) for spec in ctx.output)
    ids = project(ctx, x, dim, why)
    bounds = np.cumsum([0, *parts])
    results = []
    for k, spec in enumerate(ctx.output):
        part = ids[bounds[k]:bounds[k + 1]]
        ctx.block(part[:1], "each part of a split keeps a channel")
        results.append(ctx.result(rest + [ChannelMap((dim,), part)], spec))
    return tuple(results)


@R.rule(torch.chunk)
@R.rule("chunk")
def _chunk(ctx: RuleContext, input: TensorInfo, chunks: int, dim: int = 0) -> tuple:
    return split_equal(ctx, input, chunks, dim, "chunk")


@R.rule(torch.split)
@R.rule("split")
def _split(ctx: RuleContext, tensor: TensorInfo, split_size_or_sections: Any, dim: int = 0):
    raw = ctx.raw_arg(1, ctx.node.kwargs.get("split_size_or_sections",
                                              ctx.node.kwargs.get("split_size")))
    if isinstance(raw, fx.Node):  # computed from sizes at run time: parts stay equal
        return split_equal(ctx, tensor, len(ctx.output), dim, "split")
    sizes = [split_size_or_sections] if isinstance(split_size_or_sections, int) \
        else list(split_size_or_sections)
    return literal_split(ctx, tensor, split_size_or_sections, dim,
                         f"split sizes {sizes} are hard-coded in forward()")


@R.rule("split_with_sizes")
def _split_sizes(ctx: RuleContext, tensor: TensorInfo, split_sizes: Any, dim: int = 0):
    return literal_split(ctx, tensor, split_sizes, dim, "split sizes are hard-coded in forward()")


@R.rule(torch.unbind)
@R.rule("unbind")
def _unbind(ctx: RuleContext, input: TensorInfo, dim: int = 0) -> tuple:
    dim = dim % input.ndim
    ctx.block(input.map_on(dim), "unbind over a channel axis")
    maps = [ChannelMap(tuple(d - (d > dim) for d in m.dims), m.ids)
            for m in input.maps if dim not in m.dims]
    return tuple(ctx.result(maps, spec) for spec in ctx.output)


def _full_slice(s: slice, size: int) -> bool:
    start, stop, step = s.indices(size)
    return start == 0 and stop == size and step == 1


@R.rule(operator.getitem)
def _getitem(ctx: RuleContext, obj: Any, index: Any) -> Any:
    if not isinstance(obj, TensorInfo):
        return obj[index]
    x = obj
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (TensorInfo, list)) for i in index):
        ctx.block(x, "advanced indexing over a channel axis")
        return ctx.result()
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (x.ndim - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (x.ndim - sum(1 for i in expanded if i is not None)))
    new_dim: dict[int, int] = {}
    src = dst = 0
    for i in expanded:
        if i is None:
            dst += 1
            continue
        if isinstance(i, slice):
            if not _full_slice(i, x.shape[src]):
                ctx.block(x.map_on(src), "a slice with fixed bounds over a channel axis")
            new_dim[src] = dst
            dst += 1
        else:
            ctx.block(x.map_on(src), "an integer index into a channel axis")
        src += 1
    maps = []
    for m in x.maps:
        if all(d in new_dim for d in m.dims):
            full = all(_full_slice(expanded_slice(expanded, d), x.shape[d]) for d in m.dims)
            if full:
                maps.append(ChannelMap(tuple(new_dim[d] for d in m.dims), m.ids))
    return ctx.result(maps)


def expanded_slice(expanded: list[Any], dim: int) -> slice:
    real = [i for i in expanded if i is not None]
    return real[dim]


@R.rule("expand")
def expand(ctx: RuleContext, x: TensorInfo, *sizes: Any) -> TensorInfo:
    sizes_list, packed = _size_args(sizes)
    raw = ctx.node.args[1] if packed else ctx.node.args[1:]
    off = len(sizes_list) - x.ndim
    for m in x.maps:
        for d in m.dims:
            r = raw[d + off] if not isinstance(raw, fx.Node) else -1
            if not isinstance(r, fx.Node) and r != -1:
                ctx.block(m, "expand with a hard-coded size over a channel axis")
    return ctx.result([ChannelMap(tuple(d + off for d in m.dims), m.ids) for m in x.maps])


@R.rule("repeat", "tile")
@R.rule(torch.tile)
def _repeat(ctx: RuleContext, x: TensorInfo, *reps: Any) -> TensorInfo:
    reps_list, _ = _size_args(reps)
    off = len(reps_list) - x.ndim
    maps = []
    for m in x.maps:
        ids = m.ids
        for i, d in enumerate(m.dims):
            r = reps_list[d + off] if d + off >= 0 else 1
            if r > 1:
                ids = np.concatenate([ids] * r, axis=i)
        maps.append(ChannelMap(tuple(d + off for d in m.dims), ids))
    return ctx.result(maps)


@R.rule(F.pad)
def pad(ctx: RuleContext, input: TensorInfo, pad: Sequence[int], mode: str = "constant",
         value: float | None = None) -> TensorInfo:
    padded = {input.ndim - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    return passthrough(ctx, input, [d for d in range(input.ndim) if d not in padded],
                       "padding over a channel axis")


_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
         nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
         nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad2d)


@R.rule(*_PADS)
def _pad_module(ctx: RuleContext, module: nn.Module, x: TensorInfo) -> TensorInfo:
    return pad(ctx, x, module.padding)


def pixel_shuffle(ctx: RuleContext, x: TensorInfo, factor: int) -> TensorInfo:
    """[N, C*r*r, H, W] -> [N, C, H*r, W*r]: the r*r inputs of an output channel go together."""
    cdim = x.ndim - 3
    passthrough(ctx, x, range(cdim + 1))
    ids = project(ctx, x, cdim, "pixel_shuffle")
    if ids is None:
        return ctx.result()
    out = ctx.unify_along(ids.reshape(-1, factor * factor), [1]).reshape(-1)
    return ctx.result([ChannelMap((cdim,), out)])


def pixel_unshuffle(ctx: RuleContext, x: TensorInfo, factor: int) -> TensorInfo:
    cdim = x.ndim - 3
    passthrough(ctx, x, range(cdim + 1))
    ids = project(ctx, x, cdim, "pixel_unshuffle")
    if ids is None:
        return ctx.result()
    return ctx.result([ChannelMap((cdim,), np.repeat(ids, factor * factor))])


@R.rule(F.pixel_shuffle, torch.pixel_shuffle)
def _pixel_shuffle_fn(ctx: RuleContext, input: TensorInfo, upscale_factor: int) -> TensorInfo:
    return pixel_shuffle(ctx, input, upscale_factor)


@R.rule(nn.PixelShuffle)
def _pixel_shuffle_module(ctx: RuleContext, module: nn.PixelShuffle, x: TensorInfo):
    return pixel_shuffle(ctx, x, module.upscale_factor)


@R.rule(F.pixel_unshuffle, torch.pixel_unshuffle)
def _pixel_unshuffle_fn(ctx: RuleContext, input: TensorInfo, downscale_factor: int):
    return pixel_unshuffle(ctx, input, downscale_factor)


@R.rule(nn.PixelUnshuffle)
def _pixel_unshuffle_module(ctx: RuleContext, module: nn.PixelUnshuffle, x: TensorInfo):
    return pixel_unshuffle(ctx, x, module.downscale_factor)


def channel_shuffle(ctx: RuleContext, x: TensorInfo, groups: int) -> TensorInfo:
    """view(g, C/g).transpose: the g channels at one in-group position go together."""
    ids = project(ctx, x, 1, "channel_shuffle")
    rest = [m for m in x.maps if 1 not in m.dims]
    if ids is None:
        return ctx.result(rest)
    grid = ids.reshape(groups, -1)
    ctx.unify_along(grid, [0])
    return ctx.result(rest + [ChannelMap((1,), np.ascontiguousarray(grid.T).reshape(-1))])


@R.rule(F.channel_shuffle, torch.channel_shuffle, torch.native_channel_shuffle)
def _channel_shuffle_fn(ctx: RuleContext, input: TensorInfo, groups: int) -> TensorInfo:
    return channel_shuffle(ctx, input, groups)


@R.rule(nn.ChannelShuffle)
def _channel_shuffle_module(ctx: RuleContext, module: nn.ChannelShuffle, x: TensorInfo):
    return channel_shuffle(ctx, x, module.groups)


def glu(ctx: RuleContext, x: TensorInfo, dim: int) -> TensorInfo:
    """a * sigmoid(b) for the two halves: channel i of a goes with channel i of b."""
    dim = dim % x.ndim
    rest = [m for m in x.maps if dim not in m.dims]
    ids = project(ctx, x, dim, "glu")
    if ids is None:
        return ctx.result(rest)
    halves = ids.reshape(2, -1)
    first = ctx.unify_along(halves, [0]).reshape(-1)
    return ctx.result(rest + [ChannelMap((dim,), first)])


@R.rule(F.glu)
def _glu_fn(ctx: RuleContext, input: TensorInfo, dim: int = -1) -> TensorInfo:
    return glu(ctx, input, dim)


@R.rule(nn.GLU)
def _glu_module(ctx: RuleContext, module: nn.GLU, x: TensorInfo) -> TensorInfo:
    return glu(ctx, x, module.dim)


