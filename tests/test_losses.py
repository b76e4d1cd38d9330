import math

import pytest
import torch
import torch.nn.functional as F

from mtrank.losses import TaskLoss, binary_cross_entropy, log_sigmoid_product, total_loss
from tests.conftest import make_batch

CTCVR = TaskLoss("ctcvr", label="ctcvr", outputs=("a", "b"), kind="logit_product")


def naive_bce(a, b, y):
    p = torch.sigmoid(a) * torch.sigmoid(b)
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p))


def test_log_space_loss_equals_naive_bce_where_finite():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g, dtype=torch.float64) * 4
    b = torch.randn(1000, generator=g, dtype=torch.float64) * 4
    y = (torch.rand(1000, generator=g) < 0.3).double()
    got = binary_cross_entropy(CTCVR, {"a": a, "b": b}, y)
    torch.testing.assert_close(got, naive_bce(a, b, y), rtol=1e-9, atol=1e-9)


def test_hand_computed_value():
    # a = b = 0: p = 1/4; y = 1 → -log(1/4); y = 0 → -log(3/4)
    a = torch.zeros(2)
    got = binary_cross_entropy(CTCVR, {"a": a, "b": a}, torch.tensor([1.0, 0.0]))
    assert got.tolist() == pytest.approx([math.log(4), -math.log(0.75)], rel=1e-6)


@pytest.mark.parametrize(
    "a,b", [(60.0, 60.0), (-60.0, -60.0), (60.0, -60.0), (-50.0, -50.0), (200.0, 200.0)]
)
@pytest.mark.parametrize("y", [0.0, 1.0])
def test_finite_at_extreme_logits(a, b, y):
    ta = torch.tensor([a], requires_grad=True)
    tb = torch.tensor([b], requires_grad=True)
    loss = binary_cross_entropy(CTCVR, {"a": ta, "b": tb}, torch.tensor([y])).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(ta.grad).all() and torch.isfinite(tb.grad).all()


# wrong, confident predictions: the loss is large and must still push the logits
@pytest.mark.parametrize(
    "a,b,y",
    [
        (60.0, 60.0, 0.0),
        (200.0, 200.0, 0.0),
        (-60.0, -60.0, 1.0),
        (-50.0, -50.0, 1.0),
        (60.0, -60.0, 1.0),
    ],
)
def test_nonzero_gradient_when_confidently_wrong(a, b, y):
    ta = torch.tensor([a], requires_grad=True)
    tb = torch.tensor([b], requires_grad=True)
    loss = binary_cross_entropy(CTCVR, {"a": ta, "b": tb}, torch.tensor([y])).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(ta.grad).all() and torch.isfinite(tb.grad).all()
    assert (ta.grad.abs() + tb.grad.abs()).item() > 0


def test_pctr_pcvr_exactly_one_and_negative_label_is_finite():
    # float32 sigmoid(200) == 1.0 exactly: a naive BCE would be inf.
    a = torch.tensor([200.0], requires_grad=True)
    assert torch.sigmoid(a).item() == 1.0
    loss = binary_cross_entropy(CTCVR, {"a": a, "b": a}, torch.tensor([0.0])).sum()
    assert math.isfinite(loss.item()) and loss.item() > 100


def test_log1mp_matches_log1p_minus_exp():
    a = torch.linspace(-10, 10, 41, dtype=torch.float64)
    log_p, log_1mp = log_sigmoid_product([a, a.flip(0)])
    torch.testing.assert_close(log_1mp, torch.log1p(-torch.exp(log_p)))


def test_masked_task_ignores_unclicked_rows():
    batch = make_batch(16)
    cvr = TaskLoss("cvr", label="conversion", outputs=("logit_cvr",), space="clicked", mask="click")
    out = {"logit_cvr": torch.randn(16)}
    loss1, _ = total_loss([cvr], out, batch)
    changed = out["logit_cvr"].clone()
    changed[batch.labels["click"] == 0] = 99.0
    loss2, _ = total_loss([cvr], {"logit_cvr": changed}, batch)
    assert loss1.item() == pytest.approx(loss2.item())
    clicked = batch.labels["click"] == 1
    expected = F.binary_cross_entropy_with_logits(
        out["logit_cvr"][clicked], batch.labels["conversion"][clicked]
    )
    assert loss1.item() == pytest.approx(expected.item(), rel=1e-6)
