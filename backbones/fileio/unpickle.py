"""A pickle reader that builds containers, numbers, strings and numpy arrays, and runs no other code."""

from __future__ import annotations

import codecs
import collections
import pickle
from typing import Any

import numpy as np


class ForbiddenGlobal(pickle.UnpicklingError):
    """A global outside the numpy-only allow-list: unpickling it could run code."""


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, strings and numpy arrays (detectron2 .pkl files, the CIFAR batches) and
    nothing else: any other global raises `ForbiddenGlobal` before it can run."""

    _ndarray_rebuild = np.ndarray.__reduce__(np.zeros(1))[0]
    _scalar_rebuild = np.float32(0).__reduce__()[0]
    _frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # how pickle protocol 5 stores an array
    ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _ndarray_rebuild,
        ("numpy._core.multiarray", "_reconstruct"): _ndarray_rebuild,
        ("numpy.core.multiarray", "scalar"): _scalar_rebuild,
        ("numpy._core.multiarray", "scalar"): _scalar_rebuild,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise ForbiddenGlobal(f"{module}.{name}")
        return self.ALLOWED[module, name]
