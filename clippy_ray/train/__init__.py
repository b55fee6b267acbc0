"""Training: Ray Train workers each running DeepSpeed around the plain CLIPpy model."""
