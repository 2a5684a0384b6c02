"""warp-ray: WARP and WARM on Ray."""

import os

__version__ = "0.1.0"

# Safe default: a Ray cluster that warp-ray starts itself (no RAY_ADDRESS to join) listens on
# loopback only. Ray reads this when it is first imported, so it is set before any of our
# modules imports Ray; without it Ray binds every interface of the machine.
if "RAY_ADDRESS" not in os.environ:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
