"""prepare: data.source (the embedded marble set or a folder) -> data/prepared/ and its sample grid.

data/prepared/ holds the images, masks and manifest.csv; plots/prepare_samples.png the grid. Bad input fails before data/prepared changes.
Photographs larger than data.image_size are also kept at patchcore.image_size (features/), for
the pretrained features."""

from _common import ROOT, run_stage

from anodiff import data, io, plots


def main(p):
    out = ROOT / "data" / "prepared"
    with io.atomic_dir(out) as tmp:  # replaced whole on success, untouched on any error
        manifest = data.prepare(tmp, data_cfg=p.data, synth_cfg=p.synth, seed=p.seed,
                                feature_size=p.patchcore.image_size)
    images, masks, labels = data.grid_samples(out, manifest, p.data.image_size)
    plots.sample_grid(images, masks, labels, ROOT / "plots" / "prepare_samples.png")
    print(data.describe(manifest))


if __name__ == "__main__":
    run_stage(main)
