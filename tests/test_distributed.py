"""Data-parallel training under torchrun (anodiff.distributed): two CPU ranks over gloo train the
weights one process trains over the same global batches (the DDPM, and the GAN's G and D)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anodiff import distributed
from anodiff.errors import ConfigError
from anodiff.losses import per_sample, reduce

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("b,ranks", [(16, 2), (5, 2), (7, 3), (1, 2)])
def test_shards_cover_the_global_batch_once(b, ranks):
    seen = []
    for rank in range(ranks):
        pos, valid = distributed.shard(b, rank, ranks)
        assert len(pos) == len(valid) == -(-b // ranks)  # equal shares: DDP needs every rank to step
        seen += pos[valid].tolist()
    assert sorted(seen) == list(range(b))


def test_shares_of_a_mean_loss_sum_to_the_global_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    losses = per_sample(pred, target, "huber", delta=0.5)
    total = sum(distributed.share(losses[pos], valid, pos, 5, "huber") for pos, valid in
                (distributed.shard(5, r, 2) for r in range(2)))
    torch.testing.assert_close(total, reduce(losses, "huber"))


def test_nproc_from_env(monkeypatch):
    monkeypatch.delenv("ANODIFF_NPROC", raising=False)
    assert distributed.nproc_from_env() == 1
    monkeypatch.setenv("ANODIFF_NPROC", "2")
    assert distributed.nproc_from_env() == 2
    monkeypatch.setenv("ANODIFF_NPROC", "two")
    with pytest.raises(ConfigError, match="ANODIFF_NPROC"):
        distributed.nproc_from_env()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{ranks: {job: result}}: tests/ddp_worker.py's jobs as one plain process and under torchrun
    with two gloo ranks (one launch each: every launch costs seconds of imports)."""
    found = {}
    for ranks in (1, 2):
        out = tmp_path_factory.mktemp(f"ranks{ranks}")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("ANODIFF_NPROC", None)
        launch = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        res = subprocess.run([sys.executable, *launch, str(WORKER), str(out)], env=env, timeout=600,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        found[ranks] = {f.stem: torch.load(f, weights_only=True) for f in out.glob("*.pt")}
    return found


def test_two_gloo_ranks_give_the_global_batch_gradient(runs):
    """7 images over 2 ranks (4 and 3, one padding sample): after DDP's all-reduce every parameter's
    gradient is the one-process gradient of the same global batch; lts keeps the global lowest 60%."""
    # lts: the hardest loss to split (huber and mse: test_shares_of_a_mean_loss_sum_to_the_global_loss)
    one, two = runs[1]["grad-lts"], runs[2]["grad-lts"]
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-7, msg=name)


def test_two_gloo_ranks_under_torchrun_train_the_single_process_network(runs):
    """Six steps (batches of 5, 5 and 1 image, twice; the last leaves one rank all padding): the same
    global losses, and the trained networks compute the same function. Weights are compared through
    the network's output: Adam turns the float noise of a gradient that is zero in exact arithmetic
    (a bias just before a GroupNorm) into steps of size lr, which moves such a weight but not the output."""
    a, b = runs[1]["train-mse"], runs[2]["train-mse"]
    assert len(a["loss"]) == len(b["loss"]) == 6
    torch.testing.assert_close(torch.tensor(b["loss"]), torch.tensor(a["loss"]), rtol=1e-5, atol=1e-6)
    from anodiff.unet import UNet

    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    t = torch.tensor([1, 10, 25, 49])
    torch.manual_seed(0)
    start = UNet(1, 8, (1, 2), 1, (), 16)
    with torch.no_grad():
        before = start(x, t)
        for part in ("model", "ema"):
            one, two = UNet(1, 8, (1, 2), 1, (), 16), UNet(1, 8, (1, 2), 1, (), 16)
            one.load_state_dict(a[part])
            two.load_state_dict(b[part])
            y1, y2 = one(x, t), two(x, t)
            assert (y1 - y2).abs().max() < 1e-4, part
            assert (y1 - before).abs().max() > 1e-2, part  # and the networks did train


def test_two_gloo_ranks_train_the_single_process_gan(runs):
    """train_gan under torchrun: four generator steps (batches of 3 and 2, one rank padded in the
    first), two critic steps each with their gradient penalty, MSE through the frozen DDPM. The
    global batch's losses are the one process's at every step, and G and D compute the same
    functions after training (compared through their outputs, as above)."""
    a, b = runs[1]["gan"], runs[2]["gan"]
    # columns critic_loss, wasserstein, grad_norm, gen_loss, mse; one row per generator step
    assert len(a["history"]) == len(b["history"]) == 4
    torch.testing.assert_close(torch.tensor(b["history"]), torch.tensor(a["history"]), rtol=1e-4, atol=1e-5)
    from anodiff.noisegen import Critic, NoiseGenerator

    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    torch.manual_seed(0)
    start = NoiseGenerator(1, 8, 2, 1.5, residual=False)
    with torch.no_grad():
        before = start(x)
        nets = []
        for result in (a, b):
            g, d = NoiseGenerator(1, 8, 2, 1.5, residual=False), Critic(1, 8)
            g.load_state_dict(result["net"])
            d.load_state_dict(result["critic"])
            nets.append((g.eval(), d.eval()))
        (g1, d1), (g2, d2) = nets
        assert (g1(x) - g2(x)).abs().max() < 1e-4
        assert (d1(x) - d2(x)).abs().max() < 1e-4
        assert (g1(x) - before).abs().max() > 1e-3  # and G did train
