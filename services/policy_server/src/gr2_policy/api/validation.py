"""Validation and decoding of wire messages into engine inputs.

Every check raises InvalidInputError with a message that names the field and says what was
expected, so a client can fix its request. Nothing here touches the model.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from google.protobuf.message import Message
from gr2.v1 import policy_pb2 as pb
from PIL import Image as PILImage

from gr2_policy.engine.interface import (
    StepInput,
    VideoRequest,
    VideoSampling,
    VideoState,
    ViewInfo,
)
from gr2_policy.engine.validation import check_temperature
from gr2_policy.errors import InvalidInputError

M = TypeVar("M", bound=Message)

MAX_INSTRUCTION_BYTES = 512
MAX_ID_BYTES = 128
MAX_NOTE_BYTES = 1024
_ENCODING_NAMES = {
    pb.IMAGE_ENCODING_RAW_RGB8: "RAW_RGB8",
    pb.IMAGE_ENCODING_JPEG: "JPEG",
    pb.IMAGE_ENCODING_PNG: "PNG",
}
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
"""Signatures of the encoded formats we accept: only their decoders ever see client bytes."""
_MAX_REASON_CHARS = 120


def parse_message(cls: type[M], data: bytes) -> M:
    """Parse a request's wire bytes; anything that is not a valid ``cls`` message (corrupt
    wire format, a string field that is not UTF-8) is an InvalidInputError, not a crash."""
    try:
        return cls.FromString(data)
    except Exception as err:  # noqa: BLE001 - DecodeError, or whatever the parser raises
        reason = str(err).rpartition(": ")[2][:_MAX_REASON_CHARS] or type(err).__name__
        raise InvalidInputError(
            f"the request is not a valid {cls.DESCRIPTOR.full_name} message ({reason})"
        ) from None


def check_text(name: str, value: str, max_bytes: int, *, required: bool = False) -> str:
    """A string of at most ``max_bytes`` UTF-8 bytes without control characters (tab and
    newline allowed); ``required``: not empty or only whitespace."""
    if required and not value.strip():
        raise InvalidInputError(f"{name} is required")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\ud800" escape
        raise InvalidInputError(f"{name} is not valid Unicode text") from None
    if size > max_bytes:
        raise InvalidInputError(f"{name} is longer than {max_bytes} bytes")
    if any(ord(c) < 32 and c not in "\t\n" for c in value):
        raise InvalidInputError(f"{name} contains control characters")
    return value


def decode_image(image: pb.Image, view: ViewInfo) -> np.ndarray:
    """Decode one Image into an (H, W, 3) uint8 array of exactly the view's size."""
    where = f"image {view.name!r}"
    if image.encoding not in _ENCODING_NAMES:
        raise InvalidInputError(
            f"{where}: unknown encoding {image.encoding}; use RAW_RGB8, JPEG or PNG"
        )
    if (image.width, image.height) != (view.width, view.height):
        raise InvalidInputError(
            f"{where}: size {image.width}x{image.height}, the model expects "
            f"{view.width}x{view.height} (see GetServerInfo)"
        )
    if image.encoding == pb.IMAGE_ENCODING_RAW_RGB8:
        expected = view.width * view.height * 3
        if len(image.data) != expected:
            raise InvalidInputError(
                f"{where}: RAW_RGB8 data has {len(image.data)} bytes, expected "
                f"{expected} ({view.width}x{view.height}x3)"
            )
        return np.frombuffer(image.data, dtype=np.uint8).reshape(view.height, view.width, 3)
    name = _ENCODING_NAMES[image.encoding]
    return decode_image_bytes(image.data, view, (name,), declared=True)


def sniff_format(data: bytes) -> str | None:
    """The format the data's signature names: PNG, JPEG, or None for anything else."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def decode_image_bytes(
    data: bytes,
    view: ViewInfo,
    formats: Sequence[str] = ("PNG", "JPEG"),
    *,
    declared: bool = False,
    info_hint: str = "GET /v1/info",
) -> np.ndarray:
    """Decode an encoded image (one of ``formats``, PIL names) into an (H, W, 3) uint8 array
    of exactly the view's size. ``declared``: the client declared the format and size (the
    gRPC Image); ``info_hint`` names where the client can look the expected size up.

    Only the PNG and JPEG decoders ever see the bytes (the format is taken from the
    signature, not guessed by trying every PIL plugin), and the size is checked before any
    pixel is decoded, so a small header cannot make the server decode a huge image."""
    where = f"image {view.name!r}"
    wanted = " or ".join(formats)
    kind = sniff_format(data)
    if kind not in formats:
        if declared:
            actual = kind or "neither PNG nor JPEG"
            raise InvalidInputError(f"{where}: data is {actual}, declared {wanted}")
        raise InvalidInputError(
            f"{where}: not a {wanted} image" + (f" (the data is {kind})" if kind else "")
        )
    try:
        with PILImage.open(io.BytesIO(data), formats=[kind]) as img:
            if img.size != (view.width, view.height):
                raise InvalidInputError(
                    f"{where}: decoded size {img.size[0]}x{img.size[1]}, expected "
                    f"{view.width}x{view.height}"
                    if declared
                    else f"{where}: size {img.size[0]}x{img.size[1]}, the model expects "
                    f"{view.width}x{view.height} (see {info_hint})"
                )
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except InvalidInputError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt data: PIL raises OSError, SyntaxError,
        # struct.error, EOFError, ValueError, ... depending on where the decoder gave up.
        reason = _decode_failure(err)
        if declared:
            raise InvalidInputError(f"{where}: cannot decode {kind} data ({reason})") from None
        raise InvalidInputError(f"{where}: not a {wanted} image ({reason})") from None


def _decode_failure(err: Exception) -> str:
    """PIL's reason, short and without object reprs (no memory addresses to the client)."""
    if isinstance(err, PILImage.UnidentifiedImageError):
        return "unrecognised or corrupt header"
    reason = str(err).split(" <", 1)[0].strip()[:_MAX_REASON_CHARS]
    return reason or type(err).__name__


def _vector(name: str, values: Sequence[float], length: int) -> np.ndarray:
    if len(values) != length:
        raise InvalidInputError(f"state.{name} needs {length} values, got {len(values)}")
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"state.{name} contains NaN or infinity")
    return arr


def decode_state(state: pb.RobotState) -> tuple[np.ndarray, np.ndarray, float]:
    """Return (ee_position (3,), unit ee_quat_wxyz (4,), gripper in [0, 1])."""
    position = _vector("ee_position", state.ee_position, 3)
    if np.any(np.abs(position) > 10.0):
        raise InvalidInputError("state.ee_position is more than 10 m from the base; units are m")
    quat = _vector("ee_quat_wxyz", state.ee_quat_wxyz, 4)
    norm = float(np.linalg.norm(quat))
    if not 0.9 <= norm <= 1.1:
        raise InvalidInputError(f"state.ee_quat_wxyz must be a unit quaternion (norm {norm:.3g})")
    if not math.isfinite(state.gripper) or not 0.0 <= state.gripper <= 1.0:
        raise InvalidInputError(f"state.gripper must be in [0, 1], got {state.gripper}")
    if len(state.joint_positions) not in (0, 7):
        raise InvalidInputError(
            f"state.joint_positions needs 0 or 7 values, got {len(state.joint_positions)}"
        )
    if not all(math.isfinite(v) for v in state.joint_positions):
        raise InvalidInputError("state.joint_positions contains NaN or infinity")
    return position, quat / norm, float(state.gripper)


def decode_observation(obs: pb.Observation, views: Sequence[ViewInfo]) -> StepInput:
    """Validate an Observation against the served views; return the engine's StepInput."""
    if not math.isfinite(obs.capture_time_s):
        raise InvalidInputError("capture_time_s must be finite")
    images = decode_images(obs.images, views)
    if not obs.HasField("state"):
        raise InvalidInputError("state is required")
    position, quat, gripper = decode_state(obs.state)
    return StepInput(images=images, ee_position=position, ee_quat_wxyz=quat, gripper=gripper)


def decode_images(messages: Sequence[pb.Image], views: Sequence[ViewInfo]) -> dict[str, np.ndarray]:
    """One image per served view, each decoded to (H, W, 3) uint8; none missing or extra."""
    by_name = {view.name: view for view in views}
    images: dict[str, np.ndarray] = {}
    for image in messages:
        view = by_name.get(image.view)
        if view is None:
            raise InvalidInputError(
                f"unknown view {image.view!r}; the model expects {sorted(by_name)}"
            )
        if image.view in images:
            raise InvalidInputError(f"view {image.view!r} sent twice")
        images[image.view] = decode_image(image, view)
    missing = [name for name in by_name if name not in images]
    if missing:
        raise InvalidInputError(f"missing image(s) for view(s) {missing}")
    return images


def decode_video_request(
    request: pb.PredictVideoRequest, views: Sequence[ViewInfo]
) -> VideoRequest:
    """Validate a PredictVideoRequest (the engine checks frame count and sampling ranges)."""
    instruction = check_text(
        "instruction", request.instruction, MAX_INSTRUCTION_BYTES, required=True
    )
    images = decode_images(request.images, views)
    state = None
    if request.HasField("state"):
        position, quat, gripper = decode_state(request.state)
        state = VideoState(position, quat, gripper)
    return VideoRequest(
        instruction, images, state, request.num_frames, decode_sampling(request.sampling)
    )


def decode_sampling(sampling: pb.Sampling) -> VideoSampling:
    """UNSPECIFIED or GREEDY: argmax. TOP_K: top_k (0 = all) at temperature (0 = 1.0). A
    temperature out of range is refused in every mode (the engine checks top_k)."""
    if sampling.mode not in (
        pb.SAMPLING_MODE_UNSPECIFIED,
        pb.SAMPLING_MODE_GREEDY,
        pb.SAMPLING_MODE_TOP_K,
    ):
        raise InvalidInputError(f"unknown sampling mode {sampling.mode}; use GREEDY or TOP_K")
    temperature = sampling.temperature or 1.0
    check_temperature(temperature)
    if sampling.mode != pb.SAMPLING_MODE_TOP_K:
        return VideoSampling()
    return VideoSampling(
        greedy=False, top_k=sampling.top_k, temperature=temperature, seed=sampling.seed
    )
