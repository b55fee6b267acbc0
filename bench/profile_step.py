"""Where one worker's training step spends its time (torch.profiler);
the logic is in clippy_ray/benchmarks/profile_step.py.

    python bench/profile_step.py [--config configs/demo.yaml] [--batch 32] [key=value ...] [--json PATH]
    python bench/profile_step.py --config configs/vitb16_t5base.yaml --batch 128     # a GPU
"""

from clippy_ray.benchmarks.profile_step import main

if __name__ == "__main__":
    main()
