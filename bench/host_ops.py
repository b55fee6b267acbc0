"""The operators a training step dispatches, grouped gradients vs DeepSpeed's BF16_Optimizer;
the logic is in clippy_ray/benchmarks/host_ops.py.

    python bench/host_ops.py --config configs/vitb16_t5base.yaml --batch 4 --threads 1 \\
        'model.image.timm_kwargs={embed_dim: 64, num_heads: 2}' model.embed_dim=64 model.image.img_size=64 \\
        'model.text.hf_config={num_layers: 12, num_heads: 2, d_model: 64, d_kv: 32, d_ff: 128, vocab_size: 512}'
    python bench/host_ops.py --config configs/vitb16_t5base.yaml --batch 128   # a GPU, the paper's model
"""

from clippy_ray.benchmarks.host_ops import main

if __name__ == "__main__":
    main()
