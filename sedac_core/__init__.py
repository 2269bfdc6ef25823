"""SEDAC core: the adaptive-depth decoding engine (no UI imports)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .pipeline import SedacPipeline, create_pipeline


def __getattr__(name: str) -> Any:
    # lazy, so that `import sedac_core` (e.g. for the CLI's --help) does not import torch
    if name in ("create_pipeline", "SedacPipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["create_pipeline", "SedacPipeline", "__version__"]
