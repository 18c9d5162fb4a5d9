"""The GR-2 network: config presets, the policy module, KV cache, sampling, checkpoints.
No serving code here (nothing of gRPC, Redis or HTTP)."""

from gr2_policy.model.checkpoint import (
    count_parameters,
    init_random_policy,
    load_checkpoint,
    model_hash,
    save_checkpoint,
)
from gr2_policy.model.config import GR2Config
from gr2_policy.model.kv_cache import RollingKVCache
from gr2_policy.model.policy import ActionPrediction, GR2Policy, StepOutput
from gr2_policy.model.sampling import GREEDY, Sampling

__all__ = [
    "GREEDY",
    "ActionPrediction",
    "GR2Config",
    "GR2Policy",
    "RollingKVCache",
    "Sampling",
    "StepOutput",
    "count_parameters",
    "init_random_policy",
    "load_checkpoint",
    "model_hash",
    "save_checkpoint",
]
