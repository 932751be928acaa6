"""kdforge: distil vision foundation models into small, fast students."""

from kdforge.plugins import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
