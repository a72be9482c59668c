"""train_patchcore: the PatchCore reference's memory bank -> data/models/patchcore.pt.

Features of the training images labelled normal (augmented copies left out) from the pretrained
extractor, reduced to a greedy coreset of `patchcore.coreset` of their patches. No training in
the gradient sense: nothing is learned but which patches to keep. infer@patchcore scores val and
test images against it.

Not the DDPMs' training set: that one also hides `data.contamination` defective images, and a
memory keeps what it is shown. PatchCore's coreset even prefers the odd patches, so a hidden
defect's look would become normal (on the embedded marble, seed 0: test image AUROC 0.567 from
the contaminated set, 0.645 from the normal images; CHANGELOG.md).
"""

from __future__ import annotations

import sys
import time

import torch

from _common import ROOT, run_stage, torch_generator, write_timing
from anodiff import data, features, patchcore
from anodiff.config import to_dict
from anodiff.errors import DataError

PREPARED = ROOT / "data/prepared"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(params) -> None:
    cfg = params.patchcore
    rows = data.load_rows(PREPARED)
    rows = rows[(rows["split"] == "train") & (rows["label"] == "normal") & (rows["augmented"] == 0)]
    rows = rows.reset_index(drop=True)
    if rows.empty:
        raise DataError(f"{PREPARED}/manifest.csv: no normal training images for the memory bank")
    images, column = data.load_feature_images(PREPARED, rows, params.data.channels)
    started = time.perf_counter()
    extractor = features.FeatureExtractor(cfg.image_size)
    feats = features.extract(extractor, images, cfg.batch_size)
    bank = patchcore.MemoryBank.fit(feats, cfg.coreset, torch_generator(params.seed, offset=301),
                                    projection=cfg.projection, max_patches=cfg.max_patches, warn=_warn)
    seconds = time.perf_counter() - started
    patchcore.save(ROOT / "data/models/patchcore.pt", bank,
                   {"n_images": len(rows), "taps": list(features.TAPS), "settings": to_dict(cfg),
                    "channels": params.data.channels, "images_from": column})
    write_timing("train_patchcore", {"seconds": round(seconds, 3), "device": "cpu"})
    print(f"train_patchcore: {len(rows)} images ({column}, {images.shape[-1]} px), {bank.n_candidates} patches -> memory bank of "
          f"{bank.patches.shape[0]} x {bank.patches.shape[1]}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_stage(main)
