# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Clinical batch inference (``ulite-dicom``, ``python -m ulite_monai.batch``)."""

from ulite_monai.batch.runner import BatchOptions, run_batch

__all__ = ["BatchOptions", "run_batch"]
