"""Ray job entry point for the merge demo (the main job until the WARP coordinator lands).

    ray job submit --working-dir . -- python jobs/merge_demo.py --config configs/tiny.yaml

Arguments are those of `warp-ray demo`.
"""

import sys

from warp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
