"""Fuzzing the gRPC API of one real policy server process (seeded random gr2-tiny weights,
in-process episode store) with hypothesis: thousands of malformed and adversarial messages
for every PolicyService RPC, with valid steps on a live episode in between.

Every call must end with a status of DESIGN.md section 5 (never INTERNAL, UNKNOWN or
UNAVAILABLE) and details without a traceback. Where the generator knows a message breaks a
rule (a NaN, a wrong length, a bad image, an overlong string, corrupt wire bytes) the status
must be exactly INVALID_ARGUMENT, so a validation gap fails the test too. Afterwards the
server must still be alive, SERVING and running episodes, with no internal error in its log.

Runs are reproducible (``derandomize``); a failure prints the falsifying example.
"""

from __future__ import annotations

import io
import math
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from gr2.v1 import policy_pb2 as pb
from gr2.v1 import policy_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from tests.support.servers import PolicyServer, run_policy_server

pytestmark = pytest.mark.e2e
T = TypeVar("T")

SERVICE = "/gr2.v1.PolicyService/"
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""The documented outcomes of a bad request (OUT_OF_RANGE is not used by the server)."""
TRACEBACK_MARKERS = ("Traceback", 'File "', '.py", line')
MIN_MESSAGES = 2000
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_INSTRUCTION_BYTES, MAX_ID_BYTES, MAX_NOTE_BYTES = 512, 128, 1024  # the proto's limits
NAN, INF = float("nan"), float("inf")

SENT: Counter[str] = Counter()
"""Generated (malformed or adversarial) messages sent per RPC over the whole module; the
final test checks the total. Valid steps in between are counted under "valid"."""
CODES: Counter[str] = Counter()
"""Status codes seen, for the summary the final test prints."""


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible (derandomize, no example database), no deadline: a call includes a real
    round trip and, now and then, a model step."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )


# ---------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyServer]:
    with run_policy_server(
        Path(tmp_path_factory.mktemp("fuzz-grpc")), extra_args=("--random-weights",)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server: PolicyServer) -> Iterator[grpc.Channel]:
    options = [
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    with grpc.insecure_channel(server.grpc_target, options=options) as ch:
        yield ch


def encode_image(rgb: np.ndarray, mode: str = "RGB", fmt: str = "PNG", **kwargs: Any) -> bytes:
    """``rgb`` converted to PIL ``mode`` and saved as ``fmt``."""
    image = PILImage.fromarray(rgb)
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@dataclass
class Fuzz:
    """What the generators draw from: the served views, valid images in several encodings,
    and episodes in each state (live, ended)."""

    stub: pb_grpc.PolicyServiceStub
    channel: grpc.Channel
    info: pb.ServerInfo
    raw: dict[str, bytes]
    encoded: list[tuple[int, bytes]]  # (encoding, data) that decode to a view-sized image
    bad_encoded: list[tuple[int, bytes]]  # (encoding, data) that never decode to one
    live: str
    ended: str
    witness: str
    witness_seq: int = 0
    valid_steps: int = 0

    @property
    def views(self) -> list[str]:
        return [v.name for v in self.info.views]

    def images(self) -> list[pb.Image]:
        return [
            pb.Image(
                view=v.name,
                encoding=pb.IMAGE_ENCODING_RAW_RGB8,
                width=v.width,
                height=v.height,
                data=self.raw[v.name],
            )
            for v in self.info.views
        ]

    def observation(self, episode_id: str, seq: int) -> pb.Observation:
        return pb.Observation(
            episode_id=episode_id,
            seq=seq,
            capture_time_s=0.2 * seq,
            images=self.images(),
            state=valid_state(),
        )

    def start(self, instruction: str = "touch the red block") -> str:
        return self.stub.StartEpisode(
            pb.StartEpisodeRequest(instruction=instruction), timeout=30
        ).episode_id

    def witness_step(self, predict_video: bool = False) -> None:
        """A valid observation on the witness episode: it must be answered normally."""
        obs = self.observation(self.witness, self.witness_seq)
        obs.predict_video = predict_video
        code, chunk = call("valid", lambda: self.stub.Act(obs, timeout=30))
        assert code == grpc.StatusCode.OK and chunk is not None, code
        check_chunk(chunk, self.info, self.witness, self.witness_seq)
        if predict_video:
            assert [i.view for i in chunk.predicted_images] == self.views
        self.witness_seq += 1
        self.valid_steps += 1


def valid_state() -> pb.RobotState:
    return pb.RobotState(ee_position=[0.45, 0.0, 0.35], ee_quat_wxyz=[0.0, 1.0, 0.0, 0.0])


def check_chunk(chunk: pb.TrajectoryChunk, info: pb.ServerInfo, episode: str, seq: int) -> None:
    assert chunk.episode_id == episode and chunk.seq == seq
    assert len(chunk.waypoints) == info.action_horizon
    for w in chunk.waypoints:
        values = [w.time_offset_s, *w.position, *w.quat_wxyz, w.gripper]
        assert len(w.position) == 3 and len(w.quat_wxyz) == 4
        assert all(math.isfinite(v) for v in values)
        assert 0.0 <= w.gripper <= 1.0


@pytest.fixture(scope="module")
def fuzz(channel: grpc.Channel) -> Fuzz:
    stub = pb_grpc.PolicyServiceStub(channel)
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    rng = np.random.default_rng(7)
    rgb = {v.name: rng.integers(0, 256, (v.height, v.width, 3), dtype=np.uint8) for v in info.views}
    first = rgb[info.views[0].name]
    h, w = first.shape[:2]
    png, jpeg = pb.IMAGE_ENCODING_PNG, pb.IMAGE_ENCODING_JPEG
    encoded = [
        (png, encode_image(first)),
        (png, encode_image(first, "P")),
        (png, encode_image(first, "LA")),
        (png, encode_image(first, "1")),
        (png, encode_image(first, "I;16")),
        (png, encode_image(first, "RGBA")),
        (jpeg, encode_image(first, fmt="JPEG")),
        (jpeg, encode_image(first, "L", fmt="JPEG")),
        (jpeg, encode_image(first, "CMYK", fmt="JPEG")),
        (jpeg, encode_image(first, fmt="JPEG", progressive=True)),
    ]
    small = first[: h // 2, : w // 2]
    bad_encoded = [
        (png, encode_image(small)),  # wrong size
        (jpeg, encode_image(small, fmt="JPEG")),
        (png, encode_image(np.concatenate([first, first]))),  # too tall
        (png, encode_image(first, fmt="JPEG")),  # JPEG declared PNG
        (jpeg, encode_image(first)),  # PNG declared JPEG
        (png, encode_image(first, fmt="GIF")),
        (png, encode_image(first, fmt="BMP")),
        (jpeg, encode_image(first, fmt="TIFF")),
        (png, b""),
        (jpeg, b"\xff\xd8\xff"),
        (png, b"\x89PNG\r\n\x1a\n"),
        (png, encode_image(first)[:33]),  # signature and IHDR only
        (jpeg, encode_image(first, fmt="JPEG")[:20]),  # before any frame header
        (png, b"\x89PNG\r\n\x1a\n" + bytes(200)),
        (jpeg, b"\xff\xd8\xff\xe0" + b"\xff" * 300),
    ]
    ended = stub.StartEpisode(pb.StartEpisodeRequest(instruction="ended"), timeout=30).episode_id
    stub.EndEpisode(pb.EndEpisodeRequest(episode_id=ended), timeout=30)
    fz = Fuzz(
        stub=stub,
        channel=channel,
        info=info,
        raw={name: image.tobytes() for name, image in rgb.items()},
        encoded=encoded,
        bad_encoded=bad_encoded,
        live="",
        ended=ended,
        witness="",
    )
    fz.live = fz.start("the fuzzer's episode")
    fz.witness = fz.start("keep going")
    return fz


def call(method: str, fn: Callable[[], T], count: int = 1) -> tuple[grpc.StatusCode, T | None]:
    """Run one call; its status must be a documented one, its details free of tracebacks."""
    SENT[method] += count
    try:
        reply = fn()
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
        CODES[code.name] += 1
        assert code in ALLOWED, f"{method}: {code.name}: {details}"
        assert not any(m in details for m in TRACEBACK_MARKERS), details
        return code, None
    CODES["OK"] += 1
    return grpc.StatusCode.OK, reply


# ---------------------------------------------------------------------------- generators


@dataclass(frozen=True)
class Mutation:
    """One change to a message. ``invalid``: the server must refuse the result with
    INVALID_ARGUMENT whatever else is in it."""

    name: str
    invalid: bool
    apply: Callable[[Any], None] = field(repr=False)
    value: Any = None

    def __repr__(self) -> str:
        value = self.value if not isinstance(self.value, bytes) else f"<{len(self.value)} bytes>"
        return f"{self.name}({repr(value)[:200]})"


def apply_all(message: T, mutations: Sequence[Mutation]) -> bool:
    """Apply the harmless mutations first (so none can repair a breaking one); return whether
    the message must be refused."""
    ordered = sorted(mutations, key=lambda m: m.invalid)
    for m in ordered:
        m.apply(message)
    return any(m.invalid for m in mutations)


UTF8_CHARS = st.characters(codec="utf-8")
NON_FINITE = st.sampled_from([NAN, INF, -INF])
UINT32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
UINT64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**64 - 1]))
ENUM_VALUE = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 4, 99]))


def text_ok(value: str, max_bytes: int, *, required: bool) -> bool:
    """The server's rule for string fields, restated: UTF-8 length, no control characters
    but tab and newline, and for required ones not empty or blank."""
    if required and not value.strip():
        return False
    if len(value.encode("utf-8")) > max_bytes:
        return False
    return not any(ord(c) < 32 and c not in "\t\n" for c in value)


def texts(max_bytes: int) -> st.SearchStrategy[str]:
    """Strings around every rule of a field limited to ``max_bytes``."""
    return st.one_of(
        st.text(UTF8_CHARS, max_size=24),
        st.sampled_from(["", " ", "\t\n", "\x00", "a\x00b", "\x1b[2J", "\u2028", "\ufeff"]),
        st.integers(max_bytes - 1, max_bytes + 1).map(lambda n: "x" * n),
        st.integers(max_bytes // 3 - 1, max_bytes // 3 + 1).map(lambda n: "\u20ac" * n),
        st.integers(max_bytes // 4, max_bytes // 4 + 1).map(lambda n: "\U0001f916" * n),
        st.just("y" * 100_000),
    )


def pick(items: Sequence[T]) -> st.SearchStrategy[T]:
    """Like sampled_from, without a repr of every (large) item in the strategy's repr."""
    return st.integers(0, len(items) - 1).map(items.__getitem__)


def float_list(length: int) -> st.SearchStrategy[list[float]]:
    return st.lists(st.floats(-1.0, 1.0), min_size=length, max_size=length)


def wrong_length(length: int) -> st.SearchStrategy[list[float]]:
    return st.one_of(
        st.integers(0, 12).filter(lambda n: n != length).map(lambda n: [0.1] * n),
        st.just([0.0] * 10_000),
    )


def with_bad(length: int) -> st.SearchStrategy[list[float]]:
    """``length`` values, one of them NaN or infinite."""
    return st.tuples(float_list(length), st.integers(0, length - 1), NON_FINITE).map(
        lambda t: [*t[0][: t[1]], t[2], *t[0][t[1] + 1 :]]
    )


def setter(path: str, value: Any) -> Callable[[Any], None]:
    """Set ``a.b.c`` on a message; a list replaces a repeated field's contents."""

    def apply(message: Any) -> None:
        *parents, leaf = path.split(".")
        target = message
        for p in parents:
            target = getattr(target, p)
        if isinstance(value, list):
            getattr(target, leaf)[:] = value
        elif isinstance(value, Message):
            getattr(target, leaf).CopyFrom(value)
        else:
            setattr(target, leaf, value)

    return apply


def mutation(path: str, values: st.SearchStrategy[Any], invalid: bool, name: str = "") -> Any:
    """Set the field at ``path`` to a drawn value (named ``name`` or the path)."""
    return values.map(lambda v: Mutation(name or path, invalid, setter(path, v), v))


def state_mutations() -> list[st.SearchStrategy[Mutation]]:
    """Changes to ``state`` (a RobotState): every rule broken, plus harmless ones. All are
    named ``state.*``."""
    far = st.floats(10.001, 1e308).flatmap(lambda v: st.sampled_from([v, -v]))
    out_of_unit = st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0 + 1e-9))
    not_unit = st.one_of(st.floats(0.0, 0.85), st.floats(1.2, 1e300)).map(lambda s: [0, s, 0, 0])
    position, quat = "state.ee_position", "state.ee_quat_wxyz"
    gripper, joints = "state.gripper", "state.joint_positions"
    return [
        mutation(position, wrong_length(3), True, "state.position_length"),
        mutation(position, with_bad(3), True, "state.position_non_finite"),
        mutation(position, far.map(lambda v: [v, 0.0, 0.3]), True, "state.position_far"),
        mutation(quat, wrong_length(4), True, "state.quat_length"),
        mutation(quat, with_bad(4), True, "state.quat_non_finite"),
        mutation(quat, not_unit, True, "state.quat_not_unit"),
        mutation(gripper, out_of_unit, True, "state.gripper_out_of_range"),
        mutation(gripper, NON_FINITE, True, "state.gripper_non_finite"),
        mutation(joints, wrong_length(7).filter(len), True, "state.joints_length"),
        mutation(joints, with_bad(7), True, "state.joints_non_finite"),
        # harmless: still a valid state
        mutation(joints, st.lists(st.floats(-7, 7), min_size=7, max_size=7), False),
        mutation(gripper, st.floats(0.0, 1.0), False),
        mutation(position, float_list(3), False),
    ]


def image_mutations(fz: Fuzz) -> list[st.SearchStrategy[Mutation]]:
    """Changes to a message's ``images``: every rule broken, plus harmless or unknown ones."""
    views = fz.views
    size = (fz.info.views[0].width, fz.info.views[0].height)
    raw_size = size[0] * size[1] * 3

    def on_image(name: str, fn: Callable[[pb.Image, Any], None], values: Any, bad: bool) -> Any:
        def make(args: tuple[int, Any]) -> Mutation:
            index, value = args

            def apply(message: Any) -> None:
                images = message.images
                if len(images):
                    fn(images[index % len(images)], value)

            return Mutation(name, bad, apply, (index, value))

        return st.tuples(st.integers(0, 3), values).map(make)

    def set_field(attr: str) -> Callable[[pb.Image, Any], None]:
        return lambda image, value: setattr(image, attr, value)

    def set_encoded(image: pb.Image, value: tuple[int, bytes]) -> None:
        image.encoding, image.data = value

    def raw_length(image: pb.Image, delta: int) -> None:
        image.encoding = pb.IMAGE_ENCODING_RAW_RGB8
        image.data = bytes(max(raw_size + delta, 0))

    def patch(image: pb.Image, value: tuple[int, int, int]) -> None:
        which, position, byte = value
        encoding, data = fz.encoded[which % len(fz.encoded)]
        image.encoding = encoding
        image.data = data[: position % len(data)] + bytes([byte]) + data[position % len(data) + 1 :]

    def truncate(image: pb.Image, value: tuple[int, int]) -> None:
        which, cut = value
        image.encoding, data = fz.encoded[which % len(fz.encoded)]
        image.data = data[: cut % len(data)]

    def drop(index: int) -> Mutation:
        def apply(message: Any) -> None:
            if len(message.images):
                del message.images[index % len(message.images)]

        return Mutation("drop_image", True, apply, index)

    def duplicate(index: int) -> Mutation:
        def apply(message: Any) -> None:
            if len(message.images):
                message.images.append(message.images[index % len(message.images)])

        return Mutation("duplicate_image", True, apply, index)

    def shuffle(seed: int) -> Mutation:
        def apply(message: Any) -> None:
            images = list(message.images)
            order = np.random.default_rng(seed).permutation(len(images))
            del message.images[:]
            message.images.extend(images[i] for i in order)

        return Mutation("reorder_images", False, apply, seed)

    def extra_image(image: pb.Image) -> Mutation:
        return Mutation("extra_image", True, lambda m: m.images.append(image), image.view)

    other_view = st.text(UTF8_CHARS, max_size=12).filter(lambda v: v not in views)
    not_the_size = UINT32.filter(lambda v: v != size[0])
    return [
        st.integers(0, 3).map(drop),
        st.integers(0, 3).map(duplicate),
        st.integers(0, 2**16).map(shuffle),
        st.builds(pb.Image, view=other_view, width=UINT32, height=UINT32).map(extra_image),
        on_image("unknown_view", set_field("view"), other_view, True),
        on_image(
            "unknown_encoding",
            set_field("encoding"),
            ENUM_VALUE.filter(lambda e: e not in (1, 2, 3)),
            True,
        ),
        on_image("wrong_width", set_field("width"), not_the_size, True),
        on_image("wrong_height", set_field("height"), not_the_size, True),
        on_image(
            "raw_length",
            raw_length,
            st.one_of(st.integers(-200, 200), st.sampled_from([-(10**9), 1, 10**6])).filter(bool),
            True,
        ),
        on_image("bad_encoded", set_encoded, pick(fz.bad_encoded), True),
        on_image(
            "garbage",
            set_encoded,
            st.tuples(st.sampled_from([2, 3]), st.binary(max_size=64)),
            True,
        ),
        # harmless, or unknown: a valid image in another encoding, a corrupted one
        on_image("encoded", set_encoded, pick(fz.encoded), False),
        on_image(
            "byte_patch",
            patch,
            st.tuples(st.integers(0, 99), st.integers(0, 2**20), st.integers(0, 255)),
            False,
        ),
        on_image("truncated", truncate, st.tuples(st.integers(0, 99), UINT32), False),
    ]


def observation_mutations(fz: Fuzz) -> st.SearchStrategy[Mutation]:
    def clear_state(message: pb.Observation) -> None:
        message.ClearField("state")

    return st.one_of(
        mutation("episode_id", texts(MAX_ID_BYTES), False),
        mutation("episode_id", st.sampled_from(["", " ", "\t"]), True, "episode_id_blank"),
        mutation("episode_id", st.just("e" * (MAX_ID_BYTES + 1)), True, "episode_id_long"),
        mutation("episode_id", st.just(fz.live + "\x00"), True, "episode_id_control"),
        mutation("seq", UINT64, False),
        mutation("capture_time_s", st.floats(-1e300, 1e300), False),
        mutation("capture_time_s", NON_FINITE, True, "capture_time_non_finite"),
        mutation("predict_video", st.booleans(), False),
        st.just(Mutation("no_state", True, clear_state)),
        *state_mutations(),
        *image_mutations(fz),
    )


@dataclass
class Case:
    message: Any
    invalid: bool
    mutations: list[Mutation]


def observation_cases(fz: Fuzz) -> st.SearchStrategy[Case]:
    """An Observation for some episode (the fuzzer's live one, an ended one, an unknown one)
    and seq, changed by one to three mutations."""

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        episode = draw(st.sampled_from([fz.live, fz.live, fz.ended, "0123456789abcdef"]))
        seq = draw(st.one_of(st.integers(0, 3), UINT64))
        obs = fz.observation(episode, seq)
        mutations = draw(st.lists(observation_mutations(fz), min_size=1, max_size=3))
        return Case(obs, apply_all(obs, mutations), mutations)

    return build()


# ---------------------------------------------------------------------------- the RPCs


def test_fuzz_act(fuzz: Fuzz) -> None:
    """Malformed observations through Act, with a valid step on a live episode every few."""

    @fuzz_settings(700)
    @given(case=observation_cases(fuzz))
    def run(case: Case) -> None:
        code, chunk = call("Act", lambda: fuzz.stub.Act(case.message, timeout=30))
        if case.invalid:
            assert code == INVALID, f"{code.name} for {case.mutations}"
        elif chunk is not None:
            check_chunk(chunk, fuzz.info, case.message.episode_id, case.message.seq)
        if SENT["Act"] % 8 == 0:
            fuzz.witness_step(predict_video=fuzz.witness_seq % 20 == 19)

    before = SENT["Act"]
    run()
    assert SENT["Act"] - before >= 700
    assert fuzz.valid_steps >= 80, "too few valid steps between the malformed ones"


def test_fuzz_stream_actions(fuzz: Fuzz) -> None:
    """Streams of 0-2 valid observations of a fresh episode, then malformed ones: the valid
    ones are answered in order, the first malformed one ends the stream with its status."""

    @fuzz_settings(150)
    @given(prefix=st.integers(0, 2), tail=st.lists(observation_cases(fuzz), max_size=3))
    def run(prefix: int, tail: list[Case]) -> None:
        messages: list[pb.Observation] = []
        if prefix:
            episode = fuzz.start()
            messages = [fuzz.observation(episode, s) for s in range(prefix)]
            SENT["valid"] += prefix
        messages += [c.message for c in tail]
        chunks: list[pb.TrajectoryChunk] = []

        def stream() -> None:
            for chunk in fuzz.stub.StreamActions(iter(messages), timeout=60):
                chunks.append(chunk)

        code, _ = call("StreamActions", stream, count=len(tail))
        assert [c.seq for c in chunks[:prefix]] == list(range(prefix))
        if not tail:
            assert code == grpc.StatusCode.OK and len(chunks) == prefix
        elif tail[0].invalid:
            assert code == INVALID and len(chunks) == prefix, f"{code.name}: {tail[0]}"

    before = SENT["StreamActions"]
    run()
    assert SENT["StreamActions"] - before >= 150


def test_fuzz_start_episode(fuzz: Fuzz) -> None:
    @fuzz_settings(250)
    @given(
        instruction=texts(MAX_INSTRUCTION_BYTES),
        robot_id=texts(MAX_ID_BYTES),
        key=st.one_of(st.just(""), texts(MAX_ID_BYTES)),
    )
    def run(instruction: str, robot_id: str, key: str) -> None:
        request = pb.StartEpisodeRequest(
            instruction=instruction, robot_id=robot_id, idempotency_key=key
        )
        valid = (
            text_ok(instruction, MAX_INSTRUCTION_BYTES, required=True)
            and text_ok(robot_id, MAX_ID_BYTES, required=False)
            and text_ok(key, MAX_ID_BYTES, required=False)
        )
        code, reply = call("StartEpisode", lambda: fuzz.stub.StartEpisode(request, timeout=30))
        if not valid:
            assert code == INVALID, code
        else:  # a reused key of an ended episode: FAILED_PRECONDITION
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION), code
            assert reply is None or len(reply.episode_id) > 0

    before = SENT["StartEpisode"]
    run()
    assert SENT["StartEpisode"] - before >= 250


def test_fuzz_end_episode(fuzz: Fuzz) -> None:
    @fuzz_settings(200)
    @given(
        target=st.one_of(st.sampled_from(["live", "ended"]), texts(MAX_ID_BYTES)),
        outcome=st.one_of(st.integers(0, 3), ENUM_VALUE),
        note=texts(MAX_NOTE_BYTES),
    )
    def run(target: str, outcome: int, note: str) -> None:
        episode = {"live": fuzz.start, "ended": lambda: fuzz.ended}.get(target, lambda: target)()
        request = pb.EndEpisodeRequest(episode_id=episode, outcome=outcome, note=note)
        code, reply = call("EndEpisode", lambda: fuzz.stub.EndEpisode(request, timeout=30))
        if not (
            text_ok(episode, MAX_ID_BYTES, required=True)
            and text_ok(note, MAX_NOTE_BYTES, required=False)
            and 0 <= outcome <= 3
        ):
            assert code == INVALID, code
        elif target == "live":
            assert code == grpc.StatusCode.OK and reply is not None and reply.steps == 0
        elif target == "ended":
            assert code == grpc.StatusCode.FAILED_PRECONDITION, code
        else:
            assert code == grpc.StatusCode.NOT_FOUND, code

    before = SENT["EndEpisode"]
    run()
    assert SENT["EndEpisode"] - before >= 200


def video_mutations(fz: Fuzz) -> st.SearchStrategy[Mutation]:
    def sampling(mode: int, top_k: int, temperature: float, seed: int = 0) -> pb.Sampling:
        return pb.Sampling(mode=mode, top_k=top_k, temperature=temperature, seed=seed)

    top_k = pb.SAMPLING_MODE_TOP_K
    bad_temperature = st.one_of(
        NON_FINITE,
        st.floats(max_value=-1e-300),
        st.sampled_from([1e-300, 5e-324, 1e-30, 1e-4, 1e4, 1e300]),
    )
    return st.one_of(
        mutation("instruction", texts(MAX_INSTRUCTION_BYTES), False),
        mutation("instruction", st.sampled_from(["", "  "]), True, "instruction_blank"),
        mutation("num_frames", st.sampled_from([0, 17, 1000, 2**32 - 1]), True),
        mutation("sampling.mode", ENUM_VALUE.filter(lambda m: m not in (0, 1, 2)), True),
        mutation(
            "sampling",
            st.tuples(st.sampled_from([0, 1, 2]), bad_temperature).map(
                lambda t: sampling(t[0], 0, t[1])
            ),
            True,
            "bad_temperature",
        ),
        mutation(
            "sampling",
            st.sampled_from([10**6, 2**32 - 1]).map(lambda k: sampling(top_k, k, 1.0)),
            True,
            "top_k_too_large",
        ),
        mutation(
            "sampling",
            st.builds(
                sampling,
                st.sampled_from([0, 1, 2]),
                st.integers(0, 64),
                st.one_of(st.just(0.0), st.floats(1e-3, 1e3)),
                UINT64,
            ),
            False,
        ),
        *state_mutations(),
        *image_mutations(fz),
    )


def test_fuzz_predict_video(fuzz: Fuzz) -> None:
    """Malformed video requests (one frame when valid: the model runs then)."""

    @fuzz_settings(250)
    @given(
        mutations=st.lists(video_mutations(fuzz), min_size=1, max_size=3),
        with_state=st.booleans(),
    )
    def run(mutations: list[Mutation], with_state: bool) -> None:
        request = pb.PredictVideoRequest(
            instruction="touch the red block", images=fuzz.images(), num_frames=1
        )
        if with_state or any(m.name.startswith("state.") for m in mutations):
            request.state.CopyFrom(valid_state())  # state mutations change a valid one
        invalid = apply_all(request, mutations)
        code, frames = call(
            "PredictVideo", lambda: list(fuzz.stub.PredictVideo(request, timeout=60))
        )
        if invalid:
            assert code == INVALID, f"{code.name} for {mutations}"
        elif frames is not None:
            assert len(frames) == request.num_frames
            assert [i.view for i in frames[0].images] == fuzz.views

    before = SENT["PredictVideo"]
    run()
    assert SENT["PredictVideo"] - before >= 250


# ---------------------------------------------------------------------------- wire bytes

REQUESTS: dict[str, type[Message]] = {
    "GetServerInfo": pb.GetServerInfoRequest,
    "StartEpisode": pb.StartEpisodeRequest,
    "Act": pb.Observation,
    "StreamActions": pb.Observation,
    "PredictVideo": pb.PredictVideoRequest,
    "EndEpisode": pb.EndEpisodeRequest,
}


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"ok\xfe", b"\xf4\x90\x80\x80"]


def wire_blobs(fz: Fuzz, method: str) -> st.SearchStrategy[bytes]:
    """Raw request bytes: valid messages patched or cut, strings that are not UTF-8, wrong
    wire types, overlong varints and lengths, unknown fields, plain garbage."""
    valid = {
        "GetServerInfo": b"",
        "StartEpisode": pb.StartEpisodeRequest(instruction="go", robot_id="r").SerializeToString(),
        "Act": fz.observation(fz.live, 0).SerializeToString(),
        "StreamActions": fz.observation(fz.live, 0).SerializeToString(),
        "PredictVideo": pb.PredictVideoRequest(
            instruction="go", images=fz.images(), num_frames=0
        ).SerializeToString(),
        "EndEpisode": pb.EndEpisodeRequest(episode_id=fz.ended).SerializeToString(),
    }[method]
    string_fields = {
        "GetServerInfo": [1],
        "StartEpisode": [1, 2, 3],
        "Act": [1],
        "StreamActions": [1],
        "PredictVideo": [1],
        "EndEpisode": [1, 3],
    }[method]

    def patched(args: tuple[int, int]) -> bytes:
        if not valid:
            return bytes([args[1]])
        pos = args[0] % len(valid)
        return valid[:pos] + bytes([args[1]]) + valid[pos + 1 :]

    def bad_string(args: tuple[int, bytes]) -> bytes:
        number, text = args
        return valid + tag(number, 2) + varint(len(text)) + text

    def bad_view(text: bytes) -> bytes:  # Image.view (field 1) inside images (4 or 2)
        image = tag(1, 2) + varint(len(text)) + text
        field_no = 2 if method == "PredictVideo" else 4
        return valid + tag(field_no, 2) + varint(len(image)) + image

    packed = tag(1, 2) + varint(5) + b"\x00" * 5  # packed doubles: 5 bytes, not 8 per value
    structural = [
        tag(1, 0) + varint(7),  # a varint where a string is
        tag(1, 2) + varint(2**31),  # a length far past the end
        tag(1, 2) + b"\xff" * 11,  # an overlong varint
        tag(1, 3),  # a group that never ends
        tag(1, 4),  # an end-group with no start
        tag(0, 0) + b"\x00",  # field number 0
        tag(2**29 - 1, 0) + varint(1),  # the largest field number, unknown
        tag(1, 6) + b"\x00" * 4,  # wire type 6 does not exist
        tag(5, 2) + varint(len(packed)) + packed,  # Observation.state with a bad packed field
        tag(2, 1) + struct.pack("<d", NAN),  # a double where a uint64/varint may be
    ]
    return st.one_of(
        st.binary(max_size=48),
        st.tuples(st.integers(0, 2**20), st.integers(0, 255)).map(patched),
        st.integers(0, max(len(valid) - 1, 0)).map(lambda n: valid[:n]),
        st.tuples(st.sampled_from(string_fields), st.sampled_from(BAD_UTF8)).map(bad_string),
        st.sampled_from(BAD_UTF8).map(bad_view),
        st.sampled_from(structural).map(lambda b: valid + b),
    )


def send_raw(fz: Fuzz, method: str, blobs: list[bytes]) -> Callable[[], Any]:
    """A call of ``method`` with the given wire bytes as its request(s)."""

    def ident(b: bytes) -> bytes:
        return b

    path = SERVICE + method
    if method == "StreamActions":
        stream = fz.channel.stream_stream(
            path, request_serializer=ident, response_deserializer=ident
        )
        return lambda: list(stream(iter(blobs), timeout=30))
    if method == "PredictVideo":
        frames = fz.channel.unary_stream(
            path, request_serializer=ident, response_deserializer=ident
        )
        return lambda: list(frames(blobs[0], timeout=60))
    unary = fz.channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)
    return lambda: unary(blobs[0], timeout=30)


def parses(cls: type[Message], data: bytes) -> bool:
    try:
        cls.FromString(data)
    except Exception:  # noqa: BLE001 - DecodeError: the server must say INVALID_ARGUMENT
        return False
    return True


def test_fuzz_wire_bytes(fuzz: Fuzz) -> None:
    """Corrupt protobuf bytes for every RPC: INVALID_ARGUMENT whenever protobuf itself cannot
    parse them (before this was fixed: UNKNOWN with the parser's exception text)."""
    methods = list(REQUESTS)
    before = sum(SENT[m] for m in methods)

    @fuzz_settings(600)
    @given(data=st.data(), method=st.sampled_from(methods))
    def run(data: st.DataObject, method: str) -> None:
        blob = data.draw(wire_blobs(fuzz, method), label="blob")
        blobs = [blob]
        if method == "StreamActions" and data.draw(st.booleans(), label="after_valid"):
            episode = fuzz.start()
            blobs = [fuzz.observation(episode, 0).SerializeToString(), blob]
            SENT["valid"] += 1
        code, _ = call(method, send_raw(fuzz, method, blobs))
        if not parses(REQUESTS[method], blob):
            assert code == INVALID, f"{method}: {code.name} for {blob!r}"

    run()
    assert sum(SENT[m] for m in methods) - before >= 600


# ---------------------------------------------------------------------------- in process


def test_image_decoder_in_process() -> None:
    """The decoder alone, fed damaged PNGs and JPEGs (no server, so many more of them): an
    array of the view's size or InvalidInputError, never another exception. The PNG and
    JPEG decoders raise OSError, SyntaxError, struct.error, EOFError, ... on bad data."""
    from gr2_policy.api.validation import decode_image_bytes
    from gr2_policy.engine.interface import ViewInfo
    from gr2_policy.errors import InvalidInputError

    view = ViewInfo("head", 64, 64)
    pixels = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    seeds = [
        encode_image(pixels),
        encode_image(pixels, "P"),
        encode_image(pixels, "I;16"),
        encode_image(pixels, fmt="JPEG"),
        encode_image(pixels, fmt="JPEG", progressive=True),
    ]

    def length_fields(data: bytes) -> list[tuple[int, int]]:
        """(offset, size) of every PNG chunk length, or of every JPEG segment length up to
        the scan: the fields a structure-blind byte flip rarely hits just right."""
        fields = []
        if data.startswith(b"\x89PNG"):
            at = 8
            while at + 8 <= len(data):
                fields.append((at, 4))
                at += 12 + struct.unpack(">I", data[at : at + 4])[0]
        else:
            at = 2
            while at + 4 <= len(data) and data[at] == 0xFF and data[at + 1] != 0xDA:
                fields.append((at + 2, 2))
                at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
        return fields

    fields = [length_fields(seed) for seed in seeds]

    def damage(seed: int, edits: list[tuple[int, int, int]]) -> bytes:
        out = bytearray(seeds[seed])
        for kind, position, value in edits:
            at = position % max(len(out), 1)
            if kind == 4:  # scale a chunk or segment length: 0, 1/2, ..., x2 + value
                offset, size = fields[seed][position % len(fields[seed])]
                old = int.from_bytes(out[offset : offset + size], "big")
                new = (old * (value % 4) // 2 + value // 4) % 256**size
                out[offset : offset + size] = new.to_bytes(size, "big")
            elif kind == 0:  # overwrite a byte
                out[at : at + 1] = bytes([value])
            elif kind == 1:  # insert bytes
                out[at:at] = bytes([value]) * (1 + value % 8)
            elif kind == 2:  # delete a run
                del out[at : at + 1 + value]
            else:  # cut the rest off
                del out[at:]
        return bytes(out)

    edit = st.tuples(st.integers(0, 4), st.integers(0, 2**16), st.integers(0, 255))

    @fuzz_settings(2000)
    @given(
        seed=st.integers(0, len(seeds) - 1),
        edits=st.lists(edit, min_size=1, max_size=4),
        declared=st.booleans(),
    )
    def run(seed: int, edits: list[tuple[int, int, int]], declared: bool) -> None:
        data = damage(seed, edits)
        formats = ("JPEG",) if seed >= 3 else ("PNG",)
        try:
            image = decode_image_bytes(data, view, formats if declared else ("PNG", "JPEG"))
        except InvalidInputError:
            return
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8

    run()


# ---------------------------------------------------------------------------- afterwards


def test_regression_unary_corrupt_bytes_are_invalid_argument(fuzz: Fuzz) -> None:
    """Found by the fuzzer: bytes protobuf cannot parse (field 1 as a string that is not
    UTF-8, or a length past the end) were answered UNKNOWN "Unexpected <class
    'google.protobuf.message.DecodeError'>: ..." by grpc itself, with a traceback in the log."""
    not_utf8 = tag(1, 2) + varint(2) + b"\xff\xfe"
    cut_short = tag(1, 2) + varint(5) + b"ab"
    for method in REQUESTS:
        for blob in (not_utf8, cut_short):
            if parses(REQUESTS[method], blob):
                continue  # GetServerInfoRequest has no field 1: the bytes are an unknown field
            blobs = [blob]
            if method == "StreamActions":  # in a stream, after a good observation
                blobs = [fuzz.observation(fuzz.start(), 0).SerializeToString(), blob]
            with pytest.raises(grpc.RpcError) as info:
                send_raw(fuzz, method, blobs)()
            assert info.value.code() == INVALID, (method, info.value.details())
            assert f"not a valid {REQUESTS[method].DESCRIPTOR.full_name}" in (
                info.value.details() or ""
            )


def test_regression_tiny_temperature_is_invalid_argument(fuzz: Fuzz) -> None:
    """Found by the fuzzer: top-k sampling at temperature 1e-300 divided the logits into
    infinities, the softmax into NaN, and torch.multinomial raised: INTERNAL."""
    for temperature in (1e-300, 5e-324, 1e-4, 1e4):
        request = pb.PredictVideoRequest(
            instruction="touch the red block",
            images=fuzz.images(),
            num_frames=1,
            sampling=pb.Sampling(mode=pb.SAMPLING_MODE_TOP_K, temperature=temperature),
        )
        with pytest.raises(grpc.RpcError) as info:
            list(fuzz.stub.PredictVideo(request, timeout=60))
        assert info.value.code() == INVALID and "temperature" in (info.value.details() or "")


def test_regression_corrupt_png_chunk_is_invalid_argument(fuzz: Fuzz) -> None:
    """Found by the fuzzer: a PNG whose chunk after IHDR is damaged made PIL raise
    SyntaxError ("broken PNG file"), which the decoder did not catch: INTERNAL."""
    good = dict(fuzz.encoded)[pb.IMAGE_ENCODING_PNG]
    at = good.index(b"IDAT") - 4  # IDAT's length: halve it, the next chunk header is garbage
    (length,) = struct.unpack(">I", good[at : at + 4])
    broken = good[:at] + struct.pack(">I", length // 2) + good[at + 4 :]
    obs = fuzz.observation(fuzz.live, 2**40)
    obs.images[0].encoding, obs.images[0].data = pb.IMAGE_ENCODING_PNG, broken
    with pytest.raises(grpc.RpcError) as info:
        fuzz.stub.Act(obs, timeout=30)
    assert info.value.code() == INVALID, info.value.details()
    assert "cannot decode PNG" in (info.value.details() or "")


def test_server_survived_the_fuzzing(fuzz: Fuzz, server: PolicyServer) -> None:
    """After everything above: alive, SERVING, episodes still work, and nothing reached the
    internal-error path (which logs ``internal_error`` with a traceback)."""
    assert server.proc.poll() is None, "the server process died"
    health = health_pb2_grpc.HealthStub(fuzz.channel)
    for name in ("", "gr2.v1.PolicyService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    episode = fuzz.start("after the storm")
    chunks = list(fuzz.stub.StreamActions(iter([fuzz.observation(episode, s) for s in range(3)])))
    assert [c.seq for c in chunks] == [0, 1, 2]
    for chunk in chunks:
        check_chunk(chunk, fuzz.info, episode, chunk.seq)
    check_chunk(fuzz.stub.Act(fuzz.observation(episode, 3), timeout=30), fuzz.info, episode, 3)
    end = fuzz.stub.EndEpisode(
        pb.EndEpisodeRequest(episode_id=episode, outcome=pb.EPISODE_OUTCOME_SUCCESS), timeout=30
    )
    assert end.steps == 4
    fuzz.witness_step()
    log = server.log_text()
    assert "internal_error" not in log
    assert "Traceback" not in log
    fuzzers = ("Act", "StreamActions", "StartEpisode", "EndEpisode", "PredictVideo")
    if not all(SENT[m] for m in fuzzers):
        pytest.skip("run with the whole module to count the generated messages")
    total = sum(n for method, n in SENT.items() if method != "valid")
    print(f"\ngenerated gRPC messages: {total} {dict(SENT)}; statuses: {dict(CODES)}")
    assert total >= MIN_MESSAGES
