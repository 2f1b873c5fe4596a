"""Read pickled ``.npy`` files (the reference ``cls_labels.npy``) without running arbitrary code.

``np.load(allow_pickle=True)`` unpickles whatever the file names, so a crafted label file could run
any function on load. :func:`load_pickled_npy` reads the same files with an unpickler that resolves
only the NumPy names an array or a dict of arrays needs, and refuses every other global.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "load_pickled_npy"]

#: Globals a pickled dict of NumPy arrays refers to (NumPy 1.x and 2.x module names; ``_codecs.encode``
#: carries the raw bytes of arrays pickled with protocol 2).
ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.dtypes", "Float32DType"), ("numpy.dtypes", "Float64DType"), ("numpy.dtypes", "ObjectDType"),
    ("_codecs", "encode"),
})


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED_GLOBALS`."""


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(f"refusing to load {module}.{name}: only NumPy arrays and plain "
                                    "containers are allowed in a pickled .npy file")
        return super().find_class(module, name)


def load_pickled_npy(path: str | Path) -> Any:
    """The object inside a pickled (object-dtype) ``.npy`` file, unwrapped from its 0-d array.

    Raises:
        UnsafePickleError: the file names a function or class that is not a NumPy array part.
        ValueError: not a ``.npy`` file, or not an object array.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            _, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            _, _, dtype = np.lib.format._read_array_header(f, version)  # noqa: SLF001 - 3.0 headers
        if not dtype.hasobject:
            arr = np.load(path, allow_pickle=False)
            return arr.item() if arr.ndim == 0 else arr
        obj = _ArrayUnpickler(f, encoding="latin1").load()
    if isinstance(obj, np.ndarray) and obj.ndim == 0:
        return obj.item()
    return obj
