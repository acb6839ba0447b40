# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Benchmarks: U-Lite against MONAI's segmentation networks (``python -m ulite_monai.bench``).

See :mod:`ulite_monai.bench.cli` for the modes and options; ``docs/benchmarks/`` for committed results.
"""
