"""train_robust_ddpm: train the same DDPM with a robust loss (RDDPM), so hidden anomalies are not learned.

From scratch, with the same budget and data as pretrain_ddpm, and `robust.loss` (Huber or least
trimmed squares)."""

from _common import ROOT, run_stage
from _ddpm import train_stage
from anodiff import distributed

if __name__ == "__main__":
    run_stage(lambda p: train_stage(p, "train_robust_ddpm", p.robust.loss, ROOT / "data/models/rddpm.pt",
                                    huber_delta=p.robust.huber_delta, lts_keep=p.robust.lts_keep), setup=distributed.setup)
