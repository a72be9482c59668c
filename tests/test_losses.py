import pytest
import torch

from anodiff.losses import per_sample, reduce


def test_mse_per_sample():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert torch.equal(per_sample(pred, target, "mse"), torch.tensor([2.5, 4.5]))
    assert torch.equal(per_sample(pred, target, "lts"), torch.tensor([2.5, 4.5]))


def test_huber_is_half_squared_error_below_delta():
    pred = torch.tensor([[0.1, -0.3, 0.5]]).view(1, 1, 1, 3)
    target = torch.zeros_like(pred)
    expected = 0.5 * pred.pow(2).mean()
    assert per_sample(pred, target, "huber", delta=0.5).item() == pytest.approx(expected.item(), rel=1e-6)
    # below delta everywhere, Huber is exactly half the MSE
    assert per_sample(pred, target, "huber", delta=1.0).item() == pytest.approx(
        0.5 * per_sample(pred, target, "mse").item(), rel=1e-6)


def test_huber_is_linear_above_delta():
    delta = 0.5
    e = torch.tensor([[2.0, -3.0]])
    got = per_sample(e, torch.zeros_like(e), "huber", delta=delta)
    expected = (delta * (e.abs() - delta / 2)).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # slope: one more unit of error adds exactly delta
    bigger = per_sample(torch.tensor([[3.0]]), torch.zeros(1, 1), "huber", delta=delta)
    smaller = per_sample(torch.tensor([[2.0]]), torch.zeros(1, 1), "huber", delta=delta)
    assert (bigger - smaller).item() == pytest.approx(delta)


def test_mean_reduction_for_mse_and_huber():
    losses = torch.tensor([1.0, 2.0, 6.0])
    assert reduce(losses, "mse").item() == 3.0
    assert reduce(losses, "huber", keep=0.1).item() == 3.0  # keep only matters for lts


def test_lts_keep_one_equals_mean():
    losses = torch.tensor([5.0, 1.0, 3.0, 7.0])
    assert reduce(losses, "lts", keep=1.0).item() == reduce(losses, "mse").item()


def test_lts_keep_half_averages_exactly_lower_half():
    losses = torch.tensor([5.0, 1.0, 3.0, 7.0, 100.0, 2.0])
    assert reduce(losses, "lts", keep=0.5).item() == pytest.approx((1.0 + 2.0 + 3.0) / 3)


def test_lts_rounds_up_and_survives_float_rounding():
    losses = torch.arange(10.0)
    # 0.7 * 10 is 7.000000000000001 in floats: must keep 7 samples, not 8
    assert reduce(losses, "lts", keep=0.7).item() == pytest.approx(sum(range(7)) / 7)
    # ceil: 0.5 * 5 = 2.5 -> keep 3
    assert reduce(torch.arange(5.0), "lts", keep=0.5).item() == pytest.approx(1.0)
    # a tiny keep still keeps one sample
    assert reduce(losses, "lts", keep=0.01).item() == 0.0


def test_lts_gradient_flows_only_through_kept_samples():
    pred = torch.tensor([[1.0], [3.0], [0.5], [4.0]], requires_grad=True)
    loss = reduce(per_sample(pred, torch.zeros(4, 1), "lts"), "lts", keep=0.5)
    loss.backward()
    grad = pred.grad.squeeze(1)
    assert grad[1].item() == 0.0 and grad[3].item() == 0.0  # trimmed (largest errors)
    # kept: d/dp of mean(p^2 over 2 samples) = p
    assert grad[0].item() == pytest.approx(1.0) and grad[2].item() == pytest.approx(0.5)


def test_bad_kind_and_keep():
    x = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="unknown loss kind"):
        per_sample(x, x, "l1")
    with pytest.raises(ValueError, match="unknown loss kind"):
        reduce(torch.zeros(2), "l1")
    with pytest.raises(ValueError, match="keep"):
        reduce(torch.zeros(2), "lts", keep=0.0)
