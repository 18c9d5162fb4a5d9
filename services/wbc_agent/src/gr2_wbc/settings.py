"""Agent settings: environment variables with the GR2_WBC_ prefix (and matching CLI flags)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GR2_WBC_", extra="ignore")

    server: str = Field("localhost:50051", description="policy server HOST:PORT")
    api_key: str | None = Field(None, description="API key for the policy server")
    metrics_host: str = Field("127.0.0.1", description="address of the agent's /metrics")
    metrics_port: int = Field(9102, ge=0, le=65535, description="port of /metrics (0: off)")
    rate_hz: float = Field(200.0, gt=0, description="control loop rate")
    observation_period_s: float = Field(0.2, gt=0, description="seconds between observations")
