"""U-Lite as a MONAI Label model: this folder is the MONAI Label app (``main.py``; see README.md).

Importing this package needs no MONAI Label; ``lib.infers``, ``lib.trainers`` and ``main`` do, and run in the
Label environment (``make label-venv``).
"""
