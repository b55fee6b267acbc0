"""clippy-ray: distributed training of CLIPpy (perceptual grouping in contrastive VLMs)."""

__version__ = "0.1.0"
