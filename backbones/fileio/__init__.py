"""File I/O that loses nothing and runs nothing: all-or-nothing writes, and a numpy-only unpickler."""

from .atomic import atomic_write, staged
from .unpickle import ForbiddenGlobal, NumpyUnpickler

__all__ = ["ForbiddenGlobal", "NumpyUnpickler", "atomic_write", "staged"]
