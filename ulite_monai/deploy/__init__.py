# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""The ulite segmentation as a MONAI Deploy App SDK application (``pip install 'ulite-monai[deploy]'``).

``python -m ulite_monai.deploy -i DICOM_FOLDER -o OUTPUT [-m MODEL]`` runs the application graph locally;
``python -m ulite_monai.deploy.package`` assembles the MAP inputs and calls ``monai-deploy package``.
See ``ulite_monai/deploy/README.md``.
"""
