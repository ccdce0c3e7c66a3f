"""medfm: synthetic medical images, SAM segmentation and 3D diffusion foundation models."""

from medfm.errors import MedfmError

__version__ = "0.1.0"
__all__ = ["MedfmError", "__version__"]
