"""The ``EngineInfo`` of a loaded model (what GetServerInfo and /v1/info report)."""

from __future__ import annotations

from gr2_policy.engine.interface import EngineInfo, ViewInfo
from gr2_policy.model.checkpoint import model_hash
from gr2_policy.model.policy import GR2Policy


def engine_info(model: GR2Policy, model_name: str) -> EngineInfo:
    """Views, horizon and history from the model's config; the version is its weights' hash."""
    cfg = model.config
    return EngineInfo(
        model_name=model_name,
        model_version=model_hash(model),
        preset=cfg.preset,
        views=tuple(ViewInfo(v, cfg.image_size, cfg.image_size) for v in cfg.views),
        action_horizon=cfg.action_horizon,
        waypoint_dt_s=cfg.waypoint_dt_s,
        history=cfg.history,
        rebuild_steps=cfg.receptive_field,
    )
