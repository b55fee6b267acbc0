"""The seg task's wall time on 1 vs N Ray workers;
the logic is in clippy_ray/benchmarks/eval_scaling.py.

    python bench/eval_scaling.py [--rows 1024] [--workers 2] [--resolution 128] [--json PATH]
"""

from clippy_ray.benchmarks.eval_scaling import main

if __name__ == "__main__":
    main()
