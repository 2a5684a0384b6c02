"""Weight merging for WARP and WARM: pure torch on state dicts (dict[str, Tensor]), no Ray.

Every operation works per tensor, in float32 or better, and returns the reference model's
dtype; integer and bool tensors are copied, never interpolated. `warp_ray.merge.folders`
applies the same functions to Hugging Face model folders, streaming tensor by tensor.
"""

from warp_ray.merge.ema import ema_update_
from warp_ray.merge.linear import average, liti
from warp_ray.merge.slerp import slerp, slerp_coefficients
from warp_ray.merge.soup import simplex_grid, slerp_soup, soup
from warp_ray.merge.state_dict import combine_task_vectors, task_vector_grams

__all__ = [
    "average",
    "combine_task_vectors",
    "ema_update_",
    "liti",
    "slerp",
    "slerp_coefficients",
    "simplex_grid",
    "slerp_soup",
    "soup",
    "task_vector_grams",
]
