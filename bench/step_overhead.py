"""Step time of Ray Train + DeepSpeed against a bare PyTorch loop;
the logic is in clippy_ray/benchmarks/step_overhead.py.

    python bench/step_overhead.py [--steps 30] [--batch 32] [--stages 0 2] [--json PATH]
"""

from clippy_ray.benchmarks.step_overhead import main

if __name__ == "__main__":
    main()
