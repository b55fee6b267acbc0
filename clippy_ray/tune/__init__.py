"""Ray Tune sweeps: a grid over any dotted config keys and the paper's ablation axes (named presets)."""
