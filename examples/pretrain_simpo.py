"""SimPO training entry point, run on every rank (``torchrun ... examples/pretrain_simpo.py FLAGS``).

``examples/pretrain_simpo.sh`` is the launcher; this file is for launchers of your own
(Slurm, Kubernetes) that start one process per GPU themselves.
"""

import sys

from simpo_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
