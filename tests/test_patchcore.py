"""PatchCore's parts on exact small cases: the coreset, the nearest-neighbour distance, the maps."""

import pytest
import torch

from anodiff import features, patchcore


def test_k_centre_greedy_picks_the_farthest_points_in_turn():
    # four clusters on a line; 4 centres must take one point of each cluster
    pts = torch.tensor([[0.0], [0.1], [10.0], [10.1], [20.0], [20.1], [30.0], [30.1]])
    idx = patchcore.greedy_coreset(pts, 4, torch.Generator().manual_seed(0), projection=0)
    assert sorted({int(pts[i, 0] // 10) for i in idx}) == [0, 1, 2, 3]
    # and greedily: the second centre is the point farthest from the first
    first = float(pts[idx[0], 0])
    assert float(pts[idx[1], 0]) == (30.1 if first < 15 else 0.0)


def test_coreset_is_seeded_and_bounded():
    pts = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    a = patchcore.greedy_coreset(pts, 20, torch.Generator().manual_seed(3))
    b = patchcore.greedy_coreset(pts, 20, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) == 20
    assert torch.equal(patchcore.greedy_coreset(pts, 500, torch.Generator()), torch.arange(200))


def test_coreset_equals_the_plain_k_centre_greedy_bit_for_bit():
    import math

    def plain(patches, n, generator, projection):  # the textbook loop the fused one must reproduce
        x = patches @ (torch.randn(patches.shape[1], projection, generator=generator) / math.sqrt(projection))
        sq, chosen = (x * x).sum(1), []
        idx, min_d = int(torch.randint(len(x), (1,), generator=generator)), torch.full((len(x),), float("inf"))
        for _ in range(n):
            chosen.append(idx)
            c = x[idx]
            min_d = torch.minimum(min_d, sq - 2 * (x @ c) + c.dot(c))
            idx = int(min_d.argmax())
        return torch.tensor(chosen)

    pts = torch.randn(3000, 152, generator=torch.Generator().manual_seed(2))
    got = patchcore.greedy_coreset(pts, 300, torch.Generator().manual_seed(5), projection=32)
    assert torch.equal(got, plain(pts, 300, torch.Generator().manual_seed(5), 32))


def test_query_in_the_bank_scores_exactly_zero_and_others_their_distance():
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    q = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [10.0, 1.0]])
    assert patchcore.nearest_distance(q, bank).tolist() == [0.0, 0.0, 5.0, 1.0]


def test_bank_fit_keeps_the_coreset_share_and_subsamples_with_a_warning():
    feats = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(0))  # 48 patches
    bank = patchcore.MemoryBank.fit(feats, 0.25, torch.Generator().manual_seed(0))
    assert bank.patches.shape == (12, 5) and bank.n_candidates == 48
    # every training patch is in the full bank, so each scores zero
    full = patchcore.MemoryBank.fit(feats, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(full.distances(feats), torch.zeros(3, 1, 4, 4))
    warned = []
    small = patchcore.MemoryBank.fit(feats, 1.0, torch.Generator().manual_seed(0), max_patches=10, warn=warned.append)
    assert small.patches.shape == (10, 5) and small.n_candidates == 10
    assert len(warned) == 1 and "patchcore.max_patches" in warned[0]


@pytest.fixture(scope="module")
def extractor():
    return features.FeatureExtractor(64)


def _stripes(n, size=64, seed=0):
    """A uniform texture: vertical stripes with a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(size).float()
    base = (0.6 * torch.sin(x * 2 * torch.pi / 8)).view(1, 1, 1, size).expand(n, 3, size, size)
    return (base + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def test_foreign_texture_patch_scores_above_the_rest(extractor):
    train = _stripes(4, seed=1)
    bank = patchcore.MemoryBank.fit(features.extract(extractor, train), 0.5, torch.Generator().manual_seed(0))
    test = _stripes(1, seed=2)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    test[:, :, 24:40, 24:40] = ((xx + yy) % 4 < 2).float() * 1.2 - 0.6  # a checkerboard patch
    maps = patchcore.anomaly_maps(extractor, bank, test, out_size=64)
    assert maps.shape == (1, 1, 64, 64)
    inside = maps[0, 0, 26:38, 26:38].min()
    outside = torch.cat([maps[0, 0, :12].flatten(), maps[0, 0, 52:].flatten()]).max()
    assert inside > outside
    # and a normal test image of the same texture scores far below the defective one
    assert patchcore.anomaly_maps(extractor, bank, _stripes(1, seed=3), 64).max() < maps.max() / 2
