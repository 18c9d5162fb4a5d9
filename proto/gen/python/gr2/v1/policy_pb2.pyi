from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_ENCODING_UNSPECIFIED: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_RAW_RGB8: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_JPEG: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_PNG: _ClassVar[ImageEncoding]

class SamplingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLING_MODE_UNSPECIFIED: _ClassVar[SamplingMode]
    SAMPLING_MODE_GREEDY: _ClassVar[SamplingMode]
    SAMPLING_MODE_TOP_K: _ClassVar[SamplingMode]

class EpisodeOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EPISODE_OUTCOME_UNSPECIFIED: _ClassVar[EpisodeOutcome]
    EPISODE_OUTCOME_SUCCESS: _ClassVar[EpisodeOutcome]
    EPISODE_OUTCOME_FAILURE: _ClassVar[EpisodeOutcome]
    EPISODE_OUTCOME_ABORTED: _ClassVar[EpisodeOutcome]
IMAGE_ENCODING_UNSPECIFIED: ImageEncoding
IMAGE_ENCODING_RAW_RGB8: ImageEncoding
IMAGE_ENCODING_JPEG: ImageEncoding
IMAGE_ENCODING_PNG: ImageEncoding
SAMPLING_MODE_UNSPECIFIED: SamplingMode
SAMPLING_MODE_GREEDY: SamplingMode
SAMPLING_MODE_TOP_K: SamplingMode
EPISODE_OUTCOME_UNSPECIFIED: EpisodeOutcome
EPISODE_OUTCOME_SUCCESS: EpisodeOutcome
EPISODE_OUTCOME_FAILURE: EpisodeOutcome
EPISODE_OUTCOME_ABORTED: EpisodeOutcome

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ViewSpec(_message.Message):
    __slots__ = ("name", "width", "height")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    width: int
    height: int
    def __init__(self, name: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("model_name", "model_version", "preset", "views", "action_horizon", "waypoint_dt_s", "history", "protocol_version", "max_message_bytes")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    ACTION_HORIZON_FIELD_NUMBER: _ClassVar[int]
    WAYPOINT_DT_S_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    preset: str
    views: _containers.RepeatedCompositeFieldContainer[ViewSpec]
    action_horizon: int
    waypoint_dt_s: float
    history: int
    protocol_version: str
    max_message_bytes: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., preset: _Optional[str] = ..., views: _Optional[_Iterable[_Union[ViewSpec, _Mapping]]] = ..., action_horizon: _Optional[int] = ..., waypoint_dt_s: _Optional[float] = ..., history: _Optional[int] = ..., protocol_version: _Optional[str] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class StartEpisodeRequest(_message.Message):
    __slots__ = ("instruction", "robot_id", "idempotency_key")
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    instruction: str
    robot_id: str
    idempotency_key: str
    def __init__(self, instruction: _Optional[str] = ..., robot_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class StartEpisodeResponse(_message.Message):
    __slots__ = ("episode_id",)
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    def __init__(self, episode_id: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("view", "encoding", "width", "height", "data")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    view: str
    encoding: ImageEncoding
    width: int
    height: int
    data: bytes
    def __init__(self, view: _Optional[str] = ..., encoding: _Optional[_Union[ImageEncoding, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RobotState(_message.Message):
    __slots__ = ("ee_position", "ee_quat_wxyz", "gripper", "joint_positions")
    EE_POSITION_FIELD_NUMBER: _ClassVar[int]
    EE_QUAT_WXYZ_FIELD_NUMBER: _ClassVar[int]
    GRIPPER_FIELD_NUMBER: _ClassVar[int]
    JOINT_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ee_position: _containers.RepeatedScalarFieldContainer[float]
    ee_quat_wxyz: _containers.RepeatedScalarFieldContainer[float]
    gripper: float
    joint_positions: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ee_position: _Optional[_Iterable[float]] = ..., ee_quat_wxyz: _Optional[_Iterable[float]] = ..., gripper: _Optional[float] = ..., joint_positions: _Optional[_Iterable[float]] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("episode_id", "seq", "capture_time_s", "images", "state", "predict_video")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREDICT_VIDEO_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    seq: int
    capture_time_s: float
    images: _containers.RepeatedCompositeFieldContainer[Image]
    state: RobotState
    predict_video: bool
    def __init__(self, episode_id: _Optional[str] = ..., seq: _Optional[int] = ..., capture_time_s: _Optional[float] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., state: _Optional[_Union[RobotState, _Mapping]] = ..., predict_video: _Optional[bool] = ...) -> None: ...

class Waypoint(_message.Message):
    __slots__ = ("time_offset_s", "position", "quat_wxyz", "gripper")
    TIME_OFFSET_S_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    QUAT_WXYZ_FIELD_NUMBER: _ClassVar[int]
    GRIPPER_FIELD_NUMBER: _ClassVar[int]
    time_offset_s: float
    position: _containers.RepeatedScalarFieldContainer[float]
    quat_wxyz: _containers.RepeatedScalarFieldContainer[float]
    gripper: float
    def __init__(self, time_offset_s: _Optional[float] = ..., position: _Optional[_Iterable[float]] = ..., quat_wxyz: _Optional[_Iterable[float]] = ..., gripper: _Optional[float] = ...) -> None: ...

class TrajectoryChunk(_message.Message):
    __slots__ = ("episode_id", "seq", "waypoints", "model_version", "queue_time_s", "compute_time_s", "server_time_s", "predicted_images")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    WAYPOINTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    seq: int
    waypoints: _containers.RepeatedCompositeFieldContainer[Waypoint]
    model_version: str
    queue_time_s: float
    compute_time_s: float
    server_time_s: float
    predicted_images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, episode_id: _Optional[str] = ..., seq: _Optional[int] = ..., waypoints: _Optional[_Iterable[_Union[Waypoint, _Mapping]]] = ..., model_version: _Optional[str] = ..., queue_time_s: _Optional[float] = ..., compute_time_s: _Optional[float] = ..., server_time_s: _Optional[float] = ..., predicted_images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("mode", "top_k", "temperature", "seed")
    MODE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    mode: SamplingMode
    top_k: int
    temperature: float
    seed: int
    def __init__(self, mode: _Optional[_Union[SamplingMode, str]] = ..., top_k: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class PredictVideoRequest(_message.Message):
    __slots__ = ("instruction", "images", "state", "num_frames", "sampling")
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    instruction: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    state: RobotState
    num_frames: int
    sampling: Sampling
    def __init__(self, instruction: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., state: _Optional[_Union[RobotState, _Mapping]] = ..., num_frames: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class PredictedFrame(_message.Message):
    __slots__ = ("frame_index", "images")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, frame_index: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class EndEpisodeRequest(_message.Message):
    __slots__ = ("episode_id", "outcome", "note")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    outcome: EpisodeOutcome
    note: str
    def __init__(self, episode_id: _Optional[str] = ..., outcome: _Optional[_Union[EpisodeOutcome, str]] = ..., note: _Optional[str] = ...) -> None: ...

class EndEpisodeResponse(_message.Message):
    __slots__ = ("episode_id", "steps")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    steps: int
    def __init__(self, episode_id: _Optional[str] = ..., steps: _Optional[int] = ...) -> None: ...
