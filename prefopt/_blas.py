"""Loads the OpenBLAS that prefopt._core was linked against (scipy-openblas32).

The library is opened with RTLD_GLOBAL before the extension is imported, so the
dynamic linker resolves ``libscipy_openblas.so`` whether prefopt is installed
into site-packages (where the rpath also finds it) or used from a source tree.
"""
import ctypes
import os


def preload():
    import scipy_openblas32

    path = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True))
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
