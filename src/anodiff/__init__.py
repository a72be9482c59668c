"""anodiff: defect segmentation with diffusion models (DDPM, RDDPM, SemanticDiffGAN)."""

__version__ = "0.1.0"
