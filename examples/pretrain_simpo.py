"""SimPO training entry point, run on every rank (``torchrun ... examples/pretrain_simpo.py FLAGS``).

``examples/pretrain_simpo.sh`` is the launcher; this file is for launchers of your own
(Slurm, Kubernetes) that start one process per GPU themselves.
"""

import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed", category=UserWarning)
warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)

from simpo_megatron.training.loop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
