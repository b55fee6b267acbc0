"""One worker's steady-state training throughput and its MFU;
the logic is in clippy_ray/benchmarks/throughput.py.

    python bench/throughput.py [--config configs/demo.yaml] [--batch 32] [--compile] [key=value ...] [--json PATH]
    python bench/throughput.py --config configs/vitb16_t5base.yaml --batch 128     # a GPU, the paper's model
"""

from clippy_ray.benchmarks.throughput import main

if __name__ == "__main__":
    main()
