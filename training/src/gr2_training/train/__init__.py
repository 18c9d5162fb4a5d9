"""``gr2-train``: the GR-2 training pipeline (tokenizer -> video pre-training -> robot
fine-tuning). See ``cli`` for the commands and ``checkpointing`` for the run directory.

OpenMP threads wait passively unless the user chose otherwise: on a small shared CPU
machine, spinning OpenMP workers made a 2-thread VQGAN step ~25x slower while another
process held a core (measured: 0.11 vs 2.6 steps/s). This must be set before torch loads
OpenMP, hence here, before anything imports torch.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gr2_training.train.errors import TrainingError
from gr2_training.train.settings import Settings

__all__ = ["Settings", "TrainingError"]
