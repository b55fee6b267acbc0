"""`ray job submit` entrypoint: `clippy-ray eval` on the cluster the job runs on.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/eval.py --checkpoint s3://bucket/runs/run/step_00100000 --data s3://bucket/eval/VOCdevkit --out s3://bucket/eval/out
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir

from clippy_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
