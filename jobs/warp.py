"""Ray job entry point: WARP on a cluster (Algorithm 1: M learners per iteration, SLERP, LITI).

    ray job submit --working-dir . -- python jobs/warp.py --config configs/gemma-7b-gpu.yaml [--resume]

Arguments are those of `warp-ray warp`.
"""

import sys

from warp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["warp", *sys.argv[1:]]))
