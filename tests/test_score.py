import numpy as np
import pytest
import torch

from structprune.core.criteria import slice_norms


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
        got = slice_norms(tensor, dim, p)
        assert got.shape == (shape[dim],)
        np.testing.assert_allclose(got, reference_norms(tensor, dim, p), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_slice_norms_of_other_dtypes_and_strides(dtype):
    tensor = torch.randn(16, 12, 3, 3).to(dtype)
    transposed = tensor.transpose(0, 1)  # not contiguous
    for t in (tensor, transposed):
        for dim in (0, 1):
            np.testing.assert_allclose(slice_norms(t, dim, 2), reference_norms(t, dim, 2),
                                       rtol=1e-3)


def test_scores_equal_a_direct_mean_of_memberslice_norms():
    """Each unit's score is the mean over the group's parameter members of the norms of the
    slices it owns, divided by the group's mean: recomputed here member by member."""
    import torchvision

    from structprune.core.analyse import analyse
    from structprune.core.capture import capture
    from structprune.core.score import score

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


@pytest.mark.parametrize("criterion", ["l2", "l1", "lamp", "fpgm", "bn"])
def test_a_group_scores_the_same_alone_and_among_all(criterion):
    """Criteria sum every group in one pass over the slots; a group's raw scores must not
    depend, even in the last bit, on which other groups are scored with it (DenseNet: a
    consumer's input axis spans many groups)."""
    import torchvision

    from structprune.core.analyse import analyse
    from structprune.core.capture import capture
    from structprune.core.score import make_criterion

    model = torchvision.models.densenet121().eval()
    analysis = analyse(capture(model, (torch.randn(1, 3, 32, 32),)))
    groups = [g for g in analysis.groups if (~g.blocked).any()]
    together = make_criterion(criterion, analysis).scores(groups)
    alone = make_criterion(criterion, analysis)
    for group in groups[::-1]:
        np.testing.assert_array_equal(alone(analysis, group), together[group.index])
    assert len(groups) > 50


def test_a_subclass_that_measures_its_own_way_is_used():
    """score() batches only the built-in criteria: a Magnitude subclass overriding measure()
    gets its own scores."""
    import torchvision

    from structprune.core.analyse import analyse
    from structprune.core.capture import capture
    from structprune.core.criteria import Magnitude
    from structprune.core.score import score

    class Doubled(Magnitude):
        def measure(self, group):
            return 2 * super().measure(group) + np.arange(group.size)

    analysis = analyse(capture(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),)))
    groups = [g for g in analysis.groups if (~g.blocked).any()]
    plain = Magnitude(analysis, 2).scores(groups)
    got = score(analysis, Doubled(analysis, 2), groups, normalize="none")
    for group in groups:
        np.testing.assert_array_equal(got[group.index], 2 * plain[group.index] + np.arange(group.size))
