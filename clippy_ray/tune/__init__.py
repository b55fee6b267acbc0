"""Ray Tune sweeps over the paper's ablation axes."""
