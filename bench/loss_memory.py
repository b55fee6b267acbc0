"""Peak memory and time of the fused loss against OpenCLIP's local loss, one rank;
the logic is in clippy_ray/benchmarks/loss_memory.py.

    python bench/loss_memory.py [--batch 32768] [--ranks 8] [--dim 768] [--reps 3] [--json PATH]
"""

from clippy_ray.benchmarks.loss_memory import main

if __name__ == "__main__":
    main()
