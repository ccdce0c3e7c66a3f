"""MedDiff-FM: the 3D diffusion foundation model (to come; see docs/architecture.md)."""

__all__: list[str] = []
