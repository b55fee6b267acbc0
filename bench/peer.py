"""clippy-ray beside OpenCLIP: the loss on the same features, the training step on the same model,
and the largest contrastive batch each fits in a memory budget; the logic is in
clippy_ray/benchmarks/peer.py.

    python bench/peer.py [--sections loss step fits] [--reps 3] [--json PATH]
"""

from clippy_ray.benchmarks.peer import main

if __name__ == "__main__":
    main()
