"""Ingest throughput: the Ray Data pipeline (parquet or WebDataset) vs bare decode loops;
the logic is in clippy_ray/benchmarks/ingest.py.

    python bench/ingest.py [--rows 6000] [--copies 4] [--reps 3] [--block-mib 32] [--json PATH] ...   (--help: all)
"""

from clippy_ray.benchmarks.ingest import main

if __name__ == "__main__":
    main()
