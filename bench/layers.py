"""model.layers against the torch layers they replace, each alone and in the training step;
the logic is in clippy_ray/benchmarks/layers.py.

    python bench/layers.py --config configs/vitb16_t5base.yaml --batch 128 --steps 2 \\
        'model.image.timm_kwargs={depth: 2}' \\
        'model.text.hf_config={num_layers: 2, num_heads: 12, d_model: 768, d_kv: 64, d_ff: 3072, vocab_size: 32128}'
"""

from clippy_ray.benchmarks.layers import main

if __name__ == "__main__":
    main()
