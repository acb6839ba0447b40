# Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
"""Build (or find in the cache) the fused CPU training kernels ahead of use:
``python -m ulite_monai.networks.build_kernels`` (``-v`` shows the compiler's output). Exit status 1 if they
could not be built (training still works, slower)."""

from __future__ import annotations

import sys

from ulite_monai.networks.cpu_kernels import kernels_enabled, load_extension


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not kernels_enabled():
        print("fused CPU kernels: turned off (ULITE_CPU_KERNELS=0, or a CPU without AVX2 where they are not measured "
              "faster than PyTorch's operators; ULITE_CPU_KERNELS=1 turns them on)")
        return 0
    module = load_extension(verbose="-v" in argv)
    print("fused CPU kernels:", "ready" if module is not None else "not available (see the warning above)")
    return 0 if module is not None else 1


if __name__ == "__main__":
    sys.exit(main())
