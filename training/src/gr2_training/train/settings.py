"""Settings of one training run (the CLI's flags), recorded in RUN_DIR/run.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Settings:
    """Every knob of a stage; the CLI fills it, tests may build it directly.

    Steps count optimizer updates; ``batch_size`` is per process (the global batch is
    batch_size x world size); ``clip_length`` is T, whole steps per training clip.
    """

    stage: str
    data: str
    out: str
    steps: int = 1000
    batch_size: int = 8
    lr: float = 5e-4
    warmup: int = 100  # linear warm-up steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01  # on matrices only (not norms, biases, embeddings vectors)
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: int | None = None  # torch intra-op threads (default: cores / local processes)
    save_every: int = 500
    log_every: int = 10
    keep: int = 2  # periodic checkpoints kept
    resume: bool = False
    progress: bool = True
    val_episodes: int = 0
    eval_every: int = 0  # validation every N steps (0: only at the end)
    save_dtype: str = "float32"  # weights of the final checkpoint
    precision: str = "fp32"  # fp32, or bf16 autocast
    world_size: int = 1
    # Where the model comes from: --init, or (tokenizer only) a preset with overrides.
    init: str | None = None
    preset: str = "gr2-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    # Which episodes.
    tasks: list[str] | None = None
    success_only: bool = False
    # Tokenizer stage.
    frame_stride: int = 1
    restart_dead_codes_every: int = 100  # 0: off
    local_weight: float = 0.0  # per-token linear patch reconstruction (VQLoss; 0: off)
    # GPT stages.
    clip_length: int | None = None  # default 2h
    token_cache: str | None = None
    text_encoder: str = "frozen"  # frozen | train (trains with the GPT)
    state_dropout: float = 0.0  # fraction of fine-tuning clips with every state hidden
    start_fraction: float = 0.0  # fraction of clips that begin at an episode's first step
    image_weight: float | None = None  # loss weights (default: the stage's design defaults)
    arm_weight: float | None = None
    gripper_weight: float | None = None
    kl_weight: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
