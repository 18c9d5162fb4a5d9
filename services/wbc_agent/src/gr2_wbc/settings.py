"""Agent settings: environment variables with the GR2_WBC_ prefix (and matching CLI flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from gr2_client.tls import TlsConfig
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gr2_wbc.control.safety import SafetyConfig
from gr2_wbc.control.smoothing import ChunkSmoother
from gr2_wbc.control.trajectory import TrajectoryBuffer
from gr2_wbc.realtime import DEFAULT_PRIORITY


class AgentSettings(BaseSettings):
    """The agent's settings; the safety limits are documented in :class:`SafetyConfig`, the
    trajectory ones in :class:`TrajectoryBuffer` and :class:`ChunkSmoother`, real time in
    :mod:`gr2_wbc.realtime`."""

    model_config = SettingsConfigDict(env_prefix="GR2_WBC_", extra="ignore")

    server: str = Field(
        "localhost:50051",
        description="policy server HOST:PORT; several comma-separated replicas to fail over "
        "between (the episode continues on the next with the same id and seq)",
    )
    reconnect_timeout_s: float = Field(
        30.0,
        gt=0,
        description="how long the link keeps trying to reach a server (backoff with jitter, "
        "round robin over --server) before the episode fails; the arm holds meanwhile",
    )
    step_timeout_s: float = Field(
        5.0, gt=0, description="a step not answered this long counts as a failed server"
    )
    api_key: SecretStr | None = Field(
        None, description="API key for the policy server (never logged or printed)"
    )

    def api_key_value(self) -> str | None:
        """The API key itself, for the client's authorization metadata."""
        return None if self.api_key is None else self.api_key.get_secret_value()

    tls: bool = Field(
        False,
        description="reach the policy server over TLS, trusting the system's CAs (implied by "
        "the tls_*_file settings)",
    )
    tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle that signed the policy server's certificate"
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM client certificate, for a mutual-TLS server (with tls_key_file)"
    )
    tls_key_file: Path | None = Field(
        None, validate_default=True, description="PEM key of tls_cert_file (unencrypted)"
    )
    tls_server_name: str | None = Field(
        None, description="check the server certificate against this name, not the host"
    )
    metrics_host: str = Field("127.0.0.1", description="address of the agent's /metrics")
    metrics_port: int = Field(9102, ge=0, le=65535, description="port of /metrics (0: off)")
    rate_hz: float = Field(200.0, gt=0, description="control loop rate")
    observation_period_s: float = Field(0.2, gt=0, description="seconds between observations")
    rt_priority: int = Field(
        DEFAULT_PRIORITY,
        ge=0,
        le=99,
        description="SCHED_FIFO priority of the control-loop thread, with memory locked, "
        "when permitted (otherwise it runs SCHED_OTHER and logs how to allow it); 0: off",
    )
    # Trajectory layer (DESIGN.md section 7, point 1; see gr2_wbc.control.trajectory).
    blend: Literal["min_jerk", "ensemble"] = Field(
        "min_jerk",
        description="how a new chunk takes over: min_jerk (cross-fade over blend_s) or "
        "ensemble (temporal ensembling of every chunk covering the time, as ACT does)",
    )
    blend_s: float = Field(
        0.1,
        ge=0,
        description="cross-fade duration when a newer chunk takes over [s] (0: switch at "
        "once); with ensemble, the ramp-in/out time of each chunk's weight",
    )
    ensemble_decay: float = Field(
        0.0,
        ge=0,
        description="ensemble weight decay with chunk age [1/s] (> 0 favours newer chunks; "
        "0: equal weights)",
    )
    interpolation: Literal["cubic", "linear"] = Field(
        "cubic",
        description="between waypoints: cubic (monotone Hermite, continuous velocity) or "
        "linear (the velocity jumps at every waypoint)",
    )
    smooth_chunks: bool = Field(
        False, description="smooth each chunk's waypoint positions with a small jerk QP"
    )
    smooth_jerk_weight: float = Field(
        1e-6, ge=0, description="chunk smoothing: weight of the squared jerk [s^6] (0: off)"
    )
    smooth_tolerance_m: float = Field(
        0.01,
        ge=0,
        description="chunk smoothing: most a smoothed waypoint may move from the policy's [m]",
    )
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

    @field_validator(
        "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name", mode="before"
    )
    @classmethod
    def _empty_tls_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("tls_key_file", mode="after")
    @classmethod
    def _client_cert_with_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Checked on the key (validated after the certificate), so the error names a setting.
        if (info.data.get("tls_cert_file") is None) != (value is None):
            raise ValueError("GR2_WBC_TLS_CERT_FILE and GR2_WBC_TLS_KEY_FILE go together")
        return value

    def tls_config(self) -> TlsConfig | None:
        """The link's TLS settings, or None for a plaintext connection."""
        files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if not (self.tls or self.tls_server_name or any(f is not None for f in files)):
            return None
        return TlsConfig(
            ca_file=self.tls_ca_file,
            cert_file=self.tls_cert_file,
            key_file=self.tls_key_file,
            server_name_override=self.tls_server_name,
        )

    def trajectory_buffer(self, blend: str | None = None, max_chunks: int = 4) -> TrajectoryBuffer:
        """The loop's :class:`TrajectoryBuffer`; ``blend`` overrides :attr:`blend`."""
        return TrajectoryBuffer(
            blend_s=self.blend_s,
            max_chunks=max_chunks,
            blend=blend or self.blend,
            ensemble_decay=self.ensemble_decay,
            interpolation=self.interpolation,
        )

    def chunk_smoother(self) -> ChunkSmoother:
        """The link's :class:`ChunkSmoother` (used when :attr:`smooth_chunks` or the flag)."""
        return ChunkSmoother(
            jerk_weight=self.smooth_jerk_weight, tolerance_m=self.smooth_tolerance_m
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
