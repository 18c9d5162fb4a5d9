"""The GR-2 network: config presets, the policy module, checkpoints. No serving code here."""

from gr2_policy.model.checkpoint import (
    count_parameters,
    init_random_policy,
    load_checkpoint,
    model_hash,
    save_checkpoint,
)
from gr2_policy.model.config import GR2Config
from gr2_policy.model.policy import ActionPrediction, GR2Policy

__all__ = [
    "ActionPrediction",
    "GR2Config",
    "GR2Policy",
    "count_parameters",
    "init_random_policy",
    "load_checkpoint",
    "model_hash",
    "save_checkpoint",
]
