"""Agent settings: environment variables with the GR2_WBC_ prefix (and matching CLI flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gr2_wbc.control.safety import SafetyConfig


class AgentSettings(BaseSettings):
    """The agent's settings; the safety limits are documented in :class:`SafetyConfig`."""

    model_config = SettingsConfigDict(env_prefix="GR2_WBC_", extra="ignore")

    server: str = Field("localhost:50051", description="policy server HOST:PORT")
    api_key: str | None = Field(None, description="API key for the policy server")
    metrics_host: str = Field("127.0.0.1", description="address of the agent's /metrics")
    metrics_port: int = Field(9102, ge=0, le=65535, description="port of /metrics (0: off)")
    rate_hz: float = Field(200.0, gt=0, description="control loop rate")
    observation_period_s: float = Field(0.2, gt=0, description="seconds between observations")
    # Safety (DESIGN.md section 7, point 3; see gr2_wbc.control.safety).
    stale_after_s: float | None = Field(
        None,
        gt=0,
        description="robot time without a new chunk before the watchdog stops the "
        "arm [s]; default 3 observation periods",
    )
    stop_decel_rad_s2: float = Field(5.0, gt=0, description="watchdog stop deceleration")
    stop_jerk_rad_s3: float = Field(50.0, gt=0, description="watchdog stop jerk")
    estop_decel_rad_s2: float = Field(15.0, gt=0, description="e-stop deceleration")
    estop_jerk_rad_s3: float = Field(300.0, gt=0, description="e-stop jerk")
    joint_speed_fraction: float = Field(
        0.9, gt=0, le=1.0, description="joint speed clamp as a fraction of the URDF limits"
    )
    tool_speed_max_m_s: float = Field(0.5, gt=0, description="tool linear speed clamp [m/s]")
    tool_angular_speed_max_rad_s: float = Field(
        2.0, gt=0, description="tool angular speed clamp [rad/s]"
    )
    gripper_rate_max_per_s: float = Field(
        2.0, gt=0, description="gripper command rate clamp [strokes/s]"
    )
    estop_file: Path | None = Field(
        None, description="e-stop latches while this path exists (checked every 50 ms)"
    )

    def safety_config(self) -> SafetyConfig:
        """The loop's :class:`SafetyConfig` from these settings."""
        return SafetyConfig(
            stale_after_s=self.stale_after_s,
            stop_decel=self.stop_decel_rad_s2,
            stop_jerk=self.stop_jerk_rad_s3,
            estop_decel=self.estop_decel_rad_s2,
            estop_jerk=self.estop_jerk_rad_s3,
            joint_speed_fraction=self.joint_speed_fraction,
            tool_speed_max=self.tool_speed_max_m_s,
            tool_angular_speed_max=self.tool_angular_speed_max_rad_s,
            gripper_rate_max=self.gripper_rate_max_per_s,
            estop_file=self.estop_file,
        )
