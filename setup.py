"""Build of prefopt._core: the C core in csrc/, linked against scipy-openblas32.

Debian's libopenblas 0.3.21 misdetects recent CPUs as "Prescott" and runs sgemm
4-5x too slowly, so we link the current OpenBLAS shipped in the
``scipy-openblas32`` wheel (symbols prefixed ``scipy_``). At import time
prefopt/__init__.py loads that library first, so the extension finds it even in
an editable install.
"""
import glob
import os

import numpy
import scipy_openblas32
from setuptools import Extension, setup

sources = sorted(glob.glob(os.path.join("csrc", "*.c")))
extra_compile_args = ["-O3", "-std=c11", "-march=x86-64-v2", "-fno-math-errno",
                      "-Wall", "-Wextra", "-Wno-unused-parameter",
                      "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
extra_link_args = []
if os.environ.get("PREFOPT_ASAN"):
    extra_compile_args = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-std=c11"]
    extra_link_args = ["-fsanitize=address"]
if os.environ.get("PREFOPT_NATIVE"):
    extra_compile_args.append("-march=native")

core = Extension(
    "prefopt._core",
    sources=sources,
    include_dirs=["csrc", numpy.get_include(), scipy_openblas32.get_include_dir()],
    library_dirs=[scipy_openblas32.get_lib_dir()],
    libraries=[scipy_openblas32.get_library()],
    runtime_library_dirs=["$ORIGIN/../scipy_openblas32/lib"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
    depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
)

setup(ext_modules=[core])
