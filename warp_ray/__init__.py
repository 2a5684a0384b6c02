"""warp-ray: WARP and WARM on Ray."""

__version__ = "0.1.0"
