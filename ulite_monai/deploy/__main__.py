# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""``python -m ulite_monai.deploy -i INPUT -o OUTPUT [-m MODEL]``: run the MONAI Deploy application locally."""

from ulite_monai.deploy.app import main

if __name__ == "__main__":
    main()
