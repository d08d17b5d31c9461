"""fit: one step is a hand-written Adam step, distillation matches its formula, a regularizer
reaches the weights, the digits CNN learns."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from structprune.accuracy.data import digits
from structprune.accuracy.train import cosine_lr, distillation_loss, fit
from structprune.errors import StructPruneError
from structprune.front.models import digits_cnn


def _tiny(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    y = torch.tensor([0, 3, 1, 1, 2])
    return model, x, y


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ce_and_grads(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Mean cross-entropy of a linear model and its gradients, by hand (no autograd)."""
    p = _softmax(x @ w.T + b)
    n = len(y)
    loss = -np.log(p[np.arange(n), y]).mean()
    d = p.copy()
    d[np.arange(n), y] -= 1.0
    d /= n
    return loss, d.T @ x, d.sum(axis=0)


def _adam_first_step(param: np.ndarray, grad: np.ndarray, lr: float, wd: float,
                     betas=(0.9, 0.999), eps=1e-8) -> np.ndarray:
    """AdamW's first step: decoupled decay, then the bias-corrected moment ratio."""
    m = (1 - betas[0]) * grad
    v = (1 - betas[1]) * grad * grad
    m_hat, v_hat = m / (1 - betas[0]), v / (1 - betas[1])
    return param * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_step_is_a_hand_written_adam_step(weight_decay):
    model, x, y = _tiny()
    w0 = model.weight.detach().double().numpy().copy()
    b0 = model.bias.detach().double().numpy().copy()
    loss, gw, gb = _ce_and_grads(w0, b0, x.double().numpy(), y.numpy())

    history = fit(model, [(x, y)], 1, lr=0.01, weight_decay=weight_decay, progress=False)

    assert history == [{"epoch": 1, "loss": pytest.approx(loss, rel=1e-5)}]
    np.testing.assert_allclose(model.weight.detach().numpy(),
                               _adam_first_step(w0, gw, 0.01, weight_decay), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bias.detach().numpy(),
                               _adam_first_step(b0, gb, 0.01, weight_decay), rtol=1e-5, atol=1e-6)


def test_cosine_schedule():
    assert cosine_lr(0.1, 0, 4) == pytest.approx(0.1)
    assert cosine_lr(0.1, 2, 4) == pytest.approx(0.05)
    assert cosine_lr(0.1, 4, 4) == pytest.approx(0.0)


def test_distillation_loss_matches_the_formula():
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    t = 3.0
    p_s = _softmax(student.double().numpy() / t)
    p_t = _softmax(teacher.double().numpy() / t)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean()
    got = float(distillation_loss(student, teacher, t))
    assert got == pytest.approx(t * t * kl, rel=1e-5)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_fit_with_a_teacher_mixes_hard_and_soft_losses():
    model, x, y = _tiny()
    teacher, _, _ = _tiny(seed=5)
    teacher.train()
    w, t = 0.3, 2.0
    with torch.no_grad():
        logits, teacher_logits = model(x), teacher(x)
    expected = (1 - w) * F.cross_entropy(logits, y) \
        + w * distillation_loss(logits, teacher_logits, t)
    before = copy.deepcopy(teacher.state_dict())

    history = fit(model, [(x, y)], 1, teacher=teacher, temperature=t, distill_weight=w,
                  progress=False)

    assert history[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert not teacher.training  # run in eval mode
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])  # and never trained


def test_a_student_equal_to_its_teacher_has_nothing_to_learn_from_it():
    model, x, y = _tiny()
    teacher = copy.deepcopy(model)
    history = fit(model, [(x, y)], 1, teacher=teacher, distill_weight=1.0, progress=False)
    assert history[0]["loss"] == pytest.approx(0.0, abs=1e-6)
    logits = teacher(x).detach().requires_grad_()
    distillation_loss(logits, logits.detach(), 4.0).backward()
    assert float(logits.grad.abs().max()) < 1e-6


def test_a_regularizer_gradient_reaches_the_weights():
    def planted_l1(model: nn.Module) -> torch.Tensor:
        return 10.0 * model.weight[0, 0].abs()

    plain, x, y = _tiny()
    with torch.no_grad():
        plain.weight[0, 0] = 0.5
    regularised = copy.deepcopy(plain)
    batches = [(x, y)] * 20
    fit(plain, batches, 2, lr=0.05, progress=False)
    fit(regularised, batches, 2, lr=0.05, regularizer=planted_l1, progress=False)
    assert abs(float(regularised.weight[0, 0])) < 0.05
    assert abs(float(plain.weight[0, 0])) > 0.3


def test_fit_is_seeded():
    def run() -> torch.Tensor:
        torch.manual_seed(123)  # a different global state before each call
        torch.randn(7)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 4))
        _, x, y = _tiny()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for p in model.parameters():
                nn.init.normal_(p)
        fit(model, [(x, y)] * 3, 2, seed=7, progress=False)
        return model[0].weight.detach()

    torch.testing.assert_close(run(), run(), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": -1}, "epochs"), ({"epochs": 1, "lr": 0.0}, "learning rate"),
    ({"epochs": 1, "distill_weight": 1.5}, "distillation weight"),
    ({"epochs": 1, "temperature": 0.0}, "temperature"),
])
def test_bad_settings_are_refused(kwargs, message):
    model, x, y = _tiny()
    epochs = kwargs.pop("epochs")
    with pytest.raises(StructPruneError, match=message):
        fit(model, [(x, y)], epochs, progress=False, **kwargs)


def test_empty_and_malformed_batches_are_refused():
    model, x, y = _tiny()
    with pytest.raises(StructPruneError, match="empty"):
        fit(model, [], 1, progress=False)
    with pytest.raises(StructPruneError, match="pair"):
        fit(model, [x], 1, progress=False)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_one_epoch_on_digits_lowers_the_loss():
    train = digits().train.dataset
    subset = Subset(train, range(300))
    loader = DataLoader(subset, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    x, y = train[:128]  # a fixed part of the subset, to measure the loss on
    torch.manual_seed(0)
    model = digits_cnn()
    before = _loss(model, x, y)
    history = fit(model, loader, 1, progress=False)
    after = _loss(model, x, y)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    assert after < 0.85 * before
