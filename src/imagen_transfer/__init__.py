"""imagen-transfer: transfer learning with Imagen-style text-to-image diffusion cascades.

The Python API is the same as the CLI's, one function per job (see README, "Python API"):

    from imagen_transfer import load_cascade, sample_cascade, load_config, extract_dense, run_dense
    from imagen_transfer.train import train          # `train` and `evaluate` are also module names, so they
    from imagen_transfer.evaluate import evaluate    # are imported from their modules, not re-exported here

Importing the package is cheap and offline: each name below is imported from its module on first use, so torch,
diffusers and transformers load only when a function that needs them is touched.
"""

from __future__ import annotations

import importlib

from . import openmp as _openmp

__version__ = "0.1.0"
_openmp.configure()  # before torch loads libgomp: how its threads wait beside other programs (openmp.py)

# public name -> module that defines it
_API = {
    # models
    "init_cascade": "cascade", "load_cascade": "cascade", "open_model": "interop", "save_cascade": "cascade", "describe": "cascade",
    # sampling and training
    "sample_cascade": "sampling", "save_grid": "sampling", "load_config": "config",
    # data
    "load_dataset": "datasets", "open_source": "sources", "load_dense": "dense",
    # features and probes
    "extract": "features", "extract_dense": "features", "load_features": "features", "open_features": "features", "run_probe": "probe",
    "run_dense": "dense_probe",
    # fusion and interop
    "merge_cascades": "fusion", "import_if": "interop", "export_diffusers": "interop",
}
__all__ = sorted(_API)


def __getattr__(name: str):  # only for names that are not submodules, so `imagen_transfer.train` stays the module
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imagen_transfer' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + __all__)
