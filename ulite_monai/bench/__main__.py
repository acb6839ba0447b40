# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
from ulite_monai.bench.cli import main

raise SystemExit(main())
