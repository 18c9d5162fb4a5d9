"""The engine: runs the model for many episodes behind one interface (``Engine``)."""

from gr2_policy.engine.interface import ActionChunk, Engine, EngineInfo, StepInput, ViewInfo

__all__ = ["ActionChunk", "Engine", "EngineInfo", "StepInput", "ViewInfo"]
