"""pretrain_ddpm: train the DDPM with the plain MSE loss (Ho et al. 2020).

It trains on the DDPM's unlabeled training set (normal images plus `data.contamination` hidden
anomalous ones)."""

from _common import ROOT, run_stage
from _ddpm import train_stage
from anodiff import distributed

if __name__ == "__main__":
    run_stage(lambda p: train_stage(p, "pretrain_ddpm", "mse", ROOT / "data/models/ddpm.pt"), setup=distributed.setup)
