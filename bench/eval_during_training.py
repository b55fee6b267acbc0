"""Training speed with every checkpoint evaluated beside it, against without;
the logic is in clippy_ray/benchmarks/eval_during_training.py.

    python bench/eval_during_training.py [--config configs/demo.yaml] [--reps 3] [key=value ...] [--json PATH]
"""

from clippy_ray.benchmarks.eval_during_training import main

if __name__ == "__main__":
    main()
