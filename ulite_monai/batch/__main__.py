# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
import sys

from ulite_monai.batch.cli import main

sys.exit(main())
