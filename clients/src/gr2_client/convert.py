"""Conversions between numpy data and gr2.v1 messages (no torch, no Python-list copies of
image data: images travel as bytes)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from gr2.v1 import policy_pb2 as pb

from gr2_client.errors import IncompatibleServerError
from gr2_client.options import PROTOCOL_VERSION


@dataclass(frozen=True)
class ServerDescription:
    """ServerInfo as plain Python values."""

    model_name: str
    model_version: str
    preset: str
    views: tuple[tuple[str, int, int], ...]  # (name, width, height)
    action_horizon: int
    waypoint_dt_s: float
    history: int
    protocol_version: str
    max_message_bytes: int

    def check_compatible(self, camera_names: tuple[str, ...] | None = None) -> None:
        """Raise IncompatibleServerError when the major protocol version differs or a view
        the server needs is not among ``camera_names``."""
        ours, theirs = PROTOCOL_VERSION.split(".")[0], self.protocol_version.split(".")[0]
        if ours != theirs:
            raise IncompatibleServerError(
                f"server speaks protocol {self.protocol_version}, this client {PROTOCOL_VERSION}"
            )
        if camera_names is not None:
            missing = [name for name, _, _ in self.views if name not in camera_names]
            if missing:
                raise IncompatibleServerError(
                    f"server expects views {missing} that this robot does not have "
                    f"(robot cameras: {list(camera_names)})"
                )


def server_description(info: pb.ServerInfo) -> ServerDescription:
    return ServerDescription(
        model_name=info.model_name,
        model_version=info.model_version,
        preset=info.preset,
        views=tuple((v.name, v.width, v.height) for v in info.views),
        action_horizon=info.action_horizon,
        waypoint_dt_s=info.waypoint_dt_s,
        history=info.history,
        protocol_version=info.protocol_version,
        max_message_bytes=info.max_message_bytes,
    )


@dataclass(frozen=True)
class Chunk:
    """A TrajectoryChunk as numpy arrays.

    time_offsets_s: (k,) seconds after the answered observation's capture time.
    positions: (k, 3) metres, base frame.  quats_wxyz: (k, 4).  grippers: (k,) 0..1.
    """

    episode_id: str
    seq: int
    time_offsets_s: np.ndarray
    positions: np.ndarray
    quats_wxyz: np.ndarray
    grippers: np.ndarray
    model_version: str
    queue_time_s: float
    compute_time_s: float
    server_time_s: float
    predicted_images: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class PredictedFrame:
    """One imagined frame: view name -> (H, W, 3) uint8 RGB, in the served views' order."""

    frame_index: int
    images: dict[str, np.ndarray]


def decode_rgb(image: pb.Image) -> np.ndarray:
    """An Image message (RAW_RGB8 or PNG/JPEG) as (H, W, 3) uint8."""
    if image.encoding == pb.IMAGE_ENCODING_RAW_RGB8:
        return np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.width, 3)
    from PIL import Image as PILImage  # optional dependency, only for compressed frames

    with PILImage.open(io.BytesIO(image.data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def frame_from_proto(msg: pb.PredictedFrame) -> PredictedFrame:
    return PredictedFrame(
        frame_index=msg.frame_index, images={img.view: decode_rgb(img) for img in msg.images}
    )


def chunk_from_proto(msg: pb.TrajectoryChunk) -> Chunk:
    k = len(msg.waypoints)
    offsets = np.empty(k)
    positions = np.empty((k, 3))
    quats = np.empty((k, 4))
    grippers = np.empty(k)
    for i, wp in enumerate(msg.waypoints):
        offsets[i] = wp.time_offset_s
        positions[i] = wp.position
        quats[i] = wp.quat_wxyz
        grippers[i] = wp.gripper
    return Chunk(
        episode_id=msg.episode_id,
        seq=msg.seq,
        time_offsets_s=offsets,
        positions=positions,
        quats_wxyz=quats,
        grippers=grippers,
        model_version=msg.model_version,
        queue_time_s=msg.queue_time_s,
        compute_time_s=msg.compute_time_s,
        server_time_s=msg.server_time_s,
        predicted_images={img.view: decode_rgb(img) for img in msg.predicted_images},
    )


def encode_image(view: str, rgb: np.ndarray, encoding: str = "raw") -> pb.Image:
    """Wrap an (H, W, 3) uint8 RGB array as an Image message.

    encoding: "raw" (RAW_RGB8, no compression, the default on loopback/LAN) or "png".
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"view {view!r}: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    if encoding == "raw":
        return pb.Image(
            view=view,
            encoding=pb.IMAGE_ENCODING_RAW_RGB8,
            width=width,
            height=height,
            data=np.ascontiguousarray(rgb).tobytes(),
        )
    if encoding == "png":
        from PIL import Image as PILImage  # optional dependency, only for PNG

        buf = io.BytesIO()
        PILImage.fromarray(rgb).save(buf, format="PNG")
        return pb.Image(
            view=view,
            encoding=pb.IMAGE_ENCODING_PNG,
            width=width,
            height=height,
            data=buf.getvalue(),
        )
    raise ValueError(f"unknown encoding {encoding!r}: use 'raw' or 'png'")


def make_observation(
    episode_id: str,
    seq: int,
    images: Mapping[str, np.ndarray],
    ee_position: np.ndarray,
    ee_quat_wxyz: np.ndarray,
    gripper: float,
    *,
    capture_time_s: float,
    joint_positions: np.ndarray | None = None,
    encoding: str = "raw",
    predict_video: bool = False,
) -> pb.Observation:
    """Build an Observation from camera images (name -> (H, W, 3) uint8) and arm state.
    ``predict_video`` asks for the model's next frame of each view with the chunk."""
    state = pb.RobotState(
        ee_position=np.asarray(ee_position, dtype=np.float64).ravel(),
        ee_quat_wxyz=np.asarray(ee_quat_wxyz, dtype=np.float64).ravel(),
        gripper=float(gripper),
    )
    if joint_positions is not None:
        state.joint_positions.extend(np.asarray(joint_positions, dtype=np.float64).ravel())
    return pb.Observation(
        episode_id=episode_id,
        seq=seq,
        capture_time_s=capture_time_s,
        images=[encode_image(name, img, encoding) for name, img in images.items()],
        state=state,
        predict_video=predict_video,
    )
