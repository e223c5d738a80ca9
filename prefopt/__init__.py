"""prefopt: LoRA preference tuning (DPO, SimPO, ORPO) of small decoder-only LMs.

The heavy math (model forward/backward, LoRA, losses, AdamW) runs in the C core
``prefopt._core`` on OpenBLAS; this package loads models and data, runs
experiments and decides between objectives.
"""
from . import _blas

_blas.preload()
try:
    from . import _core  # noqa: E402
except ImportError as exc:  # pragma: no cover - depends on how prefopt was installed
    raise ImportError(
        "prefopt's C extension prefopt._core is not built in "
        f"{__path__[0]}. Install with `pip install -e .` (builds it in place) or "
        "`pip install .` and run Python outside the source directory."
    ) from exc

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Set the number of OpenBLAS threads used by the C core."""
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """Number of OpenBLAS threads the C core uses."""
    return int(_core.blas_info()["num_threads"])


def show_config(file=None) -> dict:
    """Print (and return) the BLAS build prefopt runs on: version, core type, threads."""
    import scipy_openblas32

    info = dict(_core.blas_info())
    info["scipy_openblas32"] = scipy_openblas32.__version__
    info["prefopt"] = __version__
    lines = [
        f"prefopt {__version__}",
        f"  OpenBLAS:     {info['config'].strip()}",
        f"  core type:    {info['corename']}",
        f"  threads:      {info['num_threads']}",
        f"  wheel:        scipy-openblas32 {info['scipy_openblas32']}",
    ]
    print("\n".join(lines), file=file)
    return info

from .models import load  # noqa: E402
from .train import TrainConfig  # noqa: E402
from .experiment import ablate  # noqa: E402
