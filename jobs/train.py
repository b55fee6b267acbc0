"""`ray job submit` entrypoint: train (or resume) a run on the cluster the job runs on.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/train.py --config configs/vitb16_t5base.yaml data.train=s3://bucket/cc12m/train
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir

from clippy_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
