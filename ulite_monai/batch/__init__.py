# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Clinical batch inference (``ulite-dicom``, ``python -m ulite_monai.batch``)."""

__all__ = ["BatchOptions", "run_batch"]


def __getattr__(name):  # lazy: ``ulite-dicom --help`` should not import torch and MONAI
    if name in __all__:
        from ulite_monai.batch import runner

        return getattr(runner, name)
    raise AttributeError(name)
