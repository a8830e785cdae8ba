"""medi-fast: metadata-guided diffusion (MeDi) for computational pathology, made fast."""
from .errors import MediFastError
from .version import __version__

__all__ = ["MediFastError", "__version__", "load"]


def load(path, backend: str = "auto", **options):
    """Open a checkpoint (.pt/.safetensors) or engine (.onnx/.engine) for generation.

    Returns a :class:`medi_fast.api.Pipeline` with ``.generate(class_=..., tss=..., n=..., seed=...)``.
    """
    from .api import Pipeline

    return Pipeline.open(path, backend=backend, **options)
