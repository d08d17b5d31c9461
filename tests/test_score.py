import os

import numpy as np
import pytest
import torch

from structprune.score import _slice_norms


def reference_norms(tensor: torch.Tensor, dim: int, p: int) -> np.ndarray:
    t = tensor.detach().double().movedim(dim, 0).reshape(tensor.shape[dim], -1)
    return torch.linalg.vector_norm(t, ord=p, dim=1).numpy()


@pytest.mark.parametrize("shape", [(7,), (5, 3), (2048, 300), (64, 48, 3, 3), (300, 1024, 1, 1),
                                   (4, 6, 2, 3, 3), (1, 6, 1, 1)])
@pytest.mark.parametrize("p", [1, 2])
def test_slice_norms_match_a_direct_reduction(shape, p):
    gen = torch.Generator().manual_seed(0)
    tensor = torch.randn(*shape, generator=gen)
    for dim in range(min(len(shape), 3)):
        got = _slice_norms(tensor, dim, p)
        assert got.shape == (shape[dim],)
        np.testing.assert_allclose(got, reference_norms(tensor, dim, p), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_slice_norms_of_other_dtypes_and_strides(dtype):
    tensor = torch.randn(16, 12, 3, 3).to(dtype)
    transposed = tensor.transpose(0, 1)  # not contiguous
    for t in (tensor, transposed):
        for dim in (0, 1):
            np.testing.assert_allclose(_slice_norms(t, dim, 2), reference_norms(t, dim, 2),
                                       rtol=1e-3)


def test_scores_equal_a_direct_mean_of_member_slice_norms():
    """Each unit's score is the mean over the group's parameter members of the norms of the
    slices it owns, divided by the group's mean: recomputed here member by member."""
    import torchvision

    from structprune import analyse, capture, score

    model = torchvision.models.resnext50_32x4d().eval()  # grouped convs: several slots a unit
    analysis = analyse(capture(model, (torch.randn(1, 3, 32, 32),)))
    params = dict(model.named_parameters())
    groups = [g for g in analysis.groups if (~g.blocked).any()]
    scores = score(analysis, "l2", groups)
    for group in groups:
        unit_of = {int(c): i for i, c in enumerate(group.units)}
        total, members = np.zeros(group.size), 0
        for name, dim in group.members:
            if name not in params:
                continue  # buffers do not count
            members += 1
            norms = reference_norms(params[name], dim, 2)
            for slot, comp in enumerate(analysis.component[analysis.slots[(name, dim)]]):
                if int(comp) in unit_of:
                    total[unit_of[int(comp)]] += norms[slot]
        want = total / members
        np.testing.assert_allclose(scores[group.index], want / want.mean(), rtol=1e-6)


def _wide_linear() -> torch.nn.Module:
    # a (70000, 1) weight: one value a slice, large enough for the threaded path's size
    return torch.nn.Sequential(torch.nn.Linear(1, 70000), torch.nn.ReLU(),
                               torch.nn.Linear(70000, 4)).eval()


@pytest.mark.parametrize("build, shape", [
    (lambda: __import__("torchvision").models.resnet18().eval(), (1, 3, 32, 32)),
    (_wide_linear, (1, 1)),
])
def test_scores_do_not_depend_on_the_thread_count(build, shape):
    """Large tensors are reduced in worker threads when torch may use several: the scores
    must be bit for bit those of the one-thread pass, or plans would differ by machine."""
    from structprune import analyse, capture, score
    from structprune.score import _Norms

    torch.manual_seed(0)
    model = build()
    analysis = analyse(capture(model, (torch.randn(*shape),)))
    groups = [g for g in analysis.groups if (~g.blocked).any()]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = score(analysis, "l2", groups)
        norms = _Norms(analysis)
        norms.prefetch([m for g in groups for m in g.members], 2)
        assert not norms.cache  # one thread: nothing is prefetched
        torch.set_num_threads(2)
        norms.prefetch([m for g in groups for m in g.members], 2)
        if (os.cpu_count() or 1) >= 2:
            assert norms.cache  # the large weights were reduced in threads
        threaded = score(analysis, "l2", groups)
    finally:
        torch.set_num_threads(before)
    for index, values in single.items():
        np.testing.assert_array_equal(threaded[index], values)


def test_large_tensors_reduce_in_blocks_the_same_for_any_thread_count():
    from structprune.score import _blocks, _in_threads, _l2_norms

    tensor = torch.randn(3000, 512, 2, 2, generator=torch.Generator().manual_seed(0))
    assert len(_blocks(tensor, 0)) > 1 and len(_blocks(tensor, 1)) > 1
    single = _l2_norms(tensor, [0, 1])
    for dim, norms in zip((0, 1), single, strict=True):
        np.testing.assert_allclose(norms, reference_norms(tensor, dim, 2), rtol=1e-5)
    for threads in (1, 2, 3):
        threaded = _in_threads({"w": (tensor, [0, 1])}, threads)
        np.testing.assert_array_equal(threaded[("w", 0)], single[0])
        np.testing.assert_array_equal(threaded[("w", 1)], single[1])
