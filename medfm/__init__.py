"""medfm: synthetic medical images, SAM segmentation and 3D diffusion foundation models."""

from medfm.errors import MedfmError
from medfm.threads import set_wait_policy

set_wait_policy()  # idle OpenMP threads sleep, also for library use (see medfm.threads)

__version__ = "0.1.0"
__all__ = ["MedfmError", "__version__"]
