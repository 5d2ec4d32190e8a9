"""`python -m cpt.trainer` / `torchrun --nproc_per_node N -m cpt.trainer --config RUN.yaml`: same as `cpt train`."""

import sys

from cpt.trainer.run import main

sys.exit(main(sys.argv[1:]))
