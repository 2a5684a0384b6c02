"""Ray job entry point: train M reward models as Ray Tune trials and merge them (WARM).

    ray job submit --working-dir . -- python jobs/train_rm.py --config configs/tiny.yaml

Arguments are those of `warp-ray train-rm`.
"""

import sys

from warp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-rm", *sys.argv[1:]]))
