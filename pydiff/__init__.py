"""pydiff: a compiled sampling engine for conditional diffusion models."""
from __future__ import annotations

__version__ = "0.1.0"
