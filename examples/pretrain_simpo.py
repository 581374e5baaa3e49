"""SimPO training entry point, run on every rank (``torchrun ... examples/pretrain_simpo.py FLAGS``).

``examples/pretrain_simpo.sh`` is the launcher; this file is for launchers of your own
(Slurm, Kubernetes) that start one process per GPU themselves. An installed package has the
same entry as the ``simpo-train`` command (``torchrun ... $(which simpo-train) FLAGS``).
"""

import os
import sys

if __name__ == "__main__":
    try:
        import simpo_megatron  # noqa: F401  the installed package
    except ImportError:  # not installed: run from this checkout
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from simpo_megatron.cli import main

    sys.exit(main(sys.argv[1:]))
