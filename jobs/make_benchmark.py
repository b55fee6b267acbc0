"""`ray job submit` entrypoint: generate the offline grouping benchmark on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/make_benchmark.py --out s3://bucket/bench --rows 200000
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir

from clippy_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["data", "make-benchmark", *sys.argv[1:]]))
