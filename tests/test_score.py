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
