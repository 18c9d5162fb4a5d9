"""The tokenizer stage: train the VQGAN of a GR-2 model on single frames of every view.

Loss: ``VQGAN.training_losses``' objective (L1 reconstruction + codebook + 0.25 commitment),
optionally with a per-token linear patch reconstruction (``--local-weight``, see ``VQLoss``).
The perceptual and adversarial terms of a full VQGAN are left out: at 64 px on simulated
scenes L1 alone gives sharp enough blocks, and they would need pretrained VGG weights and a
discriminator. Codes that no frame used over ``restart_dead_codes_every`` steps are
restarted at encoder outputs of the current batch (rank 0's, broadcast), which keeps the
codebook in use. The rest of the policy (text encoder, GPT, action head) is initialised
from the seed and saved with it, so the checkpoint is a complete model for the next stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gr2_policy.model import GR2Config, GR2Policy
from gr2_policy.model.vqgan import COMMITMENT_BETA, VQGAN
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from gr2_training.dataset import EpisodeDataset
from gr2_training.train import data as data_mod
from gr2_training.train.checkpointing import load_policy, resolve_init
from gr2_training.train.distributed import broadcast_, sum_over_ranks_
from gr2_training.train.errors import TrainingError
from gr2_training.train.stages import Progress, Stage

EVAL_FRAMES = 512
PREVIEW_FRAMES = 8
PREVIEW_FILE = "reconstructions.png"


def to_float_images(frames: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (as VQGAN.encode does)."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def token_patches(x: Tensor, f: int) -> Tensor:
    """Float images (B, 3, H, W) -> the f x f patch under each token (B, N, 3*f*f), tokens
    in the row-major order of ``VQGAN.encode``'s ids."""
    return F.unfold(x, kernel_size=f, stride=f).transpose(1, 2)


class VQLoss(nn.Module):
    """forward(batch, step) -> reconstruction, codebook, commitment, [local,] total and the ids.

    With ``local_weight`` > 0, a linear map from each token's code vector to the pixels of its
    own f x f patch trains alongside, and its mean squared error, so weighted, joins the
    total. The conv decoder rebuilds a patch from its neighbours' codes too, so with
    reconstruction alone a small block's colour can spread over several codes; the GPT reads
    each code through one linear layer, and this term asks every code to say, linearly, what
    its own patch holds (README, "Why green").
    """

    def __init__(self, vqgan: VQGAN, local_weight: float = 0.0) -> None:
        super().__init__()
        self.vqgan = vqgan
        self.local_weight = local_weight
        self.patch = vqgan.image_size // vqgan.side
        self.local_head = (
            nn.Linear(vqgan.codebook.embedding_dim, 3 * self.patch**2) if local_weight > 0 else None
        )

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        del step  # no randomness in this loss
        x = to_float_images(batch["frames"])
        out = self.vqgan(x)
        reconstruction = F.l1_loss(out.reconstruction, x)
        total = reconstruction + out.codebook_loss + COMMITMENT_BETA * out.commitment_loss
        terms = {
            "reconstruction": reconstruction,
            "codebook": out.codebook_loss,
            "commitment": out.commitment_loss,
        }
        if self.local_head is not None:
            predicted = self.local_head(out.code_vectors).float()
            terms["local"] = F.mse_loss(predicted, token_patches(x, self.patch))
            total = total + self.local_weight * terms["local"]
        return {**terms, "total": total, "ids": out.ids}


def encoder_outputs(vqgan: VQGAN, x: Tensor) -> Tensor:
    """l2-normalised latents (B*N, D) of float images, before quantisation."""
    z = vqgan.quant_conv(vqgan.encoder(x)).flatten(2).transpose(1, 2)
    return F.normalize(z, dim=-1).reshape(-1, z.shape[-1])


class TokenizerStage(Stage):
    name = "tokenizer"
    examples = "frames"

    def new_policy(self) -> GR2Policy:
        s = self.settings
        if s.init:
            if s.overrides:
                raise TrainingError(
                    "--override changes a --preset; with --init the config is the checkpoint's"
                )
            return load_policy(resolve_init(s.init), self.info.device)
        try:
            config = GR2Config.from_preset(s.preset, **s.overrides)
        except (TypeError, ValueError) as err:
            raise TrainingError(f"--preset {s.preset} with {s.overrides}: {err}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            policy = GR2Policy(config)
        return policy.to(self.info.device)

    def prepare(
        self, policy: GR2Policy, dataset: EpisodeDataset, run_dir: Path, progress: Progress
    ) -> None:
        s, info = self.settings, self.info
        train_idx, val_idx = data_mod.select_episodes(
            dataset, tasks=s.tasks, success_only=s.success_only, val_episodes=s.val_episodes
        )
        advance = progress("tokenizer: loading frames", len(train_idx))
        self.pool = data_mod.FramePool(dataset, train_idx, s.frame_stride, advance)
        self.val_pool = data_mod.FramePool(dataset, val_idx, s.frame_stride) if val_idx else None
        self.policy = policy
        vq = policy.vqgan
        vq.requires_grad_(True)
        vq.train()  # GR2Policy.train() would put it back in eval mode: the loop never calls it
        self.module = VQLoss(vq, s.local_weight)
        self.batches = data_mod.StepBatches(
            self.pool, s.seed, s.batch_size, info.rank, info.world_size
        )
        k = policy.config.codebook_size
        self.counts = torch.zeros(k, dtype=torch.long, device=info.device)  # since last log
        self.since_restart = torch.zeros(k, dtype=torch.long, device=info.device)
        self.restarted = 0
        self.run_dir = run_dir
        self.record = {
            "episodes": {"train": len(train_idx), "val": len(val_idx)},
            "frames": len(self.pool),
            "val_frames": len(self.val_pool) if self.val_pool else 0,
        }

    def after_step(
        self,
        out: dict[str, Tensor],
        batch: dict[str, Tensor],
        step: int,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        k = self.counts.numel()
        used = torch.bincount(out["ids"].detach().flatten(), minlength=k)
        self.counts += used
        self.since_restart += used
        every = self.settings.restart_dead_codes_every
        if every and (step + 1) % every == 0:
            self._restart_dead_codes(batch, step, optimizer)

    @torch.no_grad()
    def _restart_dead_codes(
        self, batch: dict[str, Tensor], step: int, optimizer: torch.optim.Optimizer
    ) -> None:
        vq = self.policy.vqgan
        sum_over_ranks_(self.since_restart, self.info)  # the same dead set on every rank
        dead = (self.since_restart == 0).nonzero().flatten()
        self.since_restart.zero_()
        if dead.numel() == 0:
            return
        latents = encoder_outputs(vq, to_float_images(batch["frames"]))
        rng = data_mod.plan_rng(self.settings.seed, step, salt=3)
        pick = torch.from_numpy(rng.integers(0, latents.shape[0], size=dead.numel()))
        weight = vq.codebook.weight
        weight[dead] = latents[pick.to(latents.device)].to(weight.dtype)
        broadcast_(weight.data, self.info)  # every rank restarts to rank 0's choice
        state = optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = 0.0
        self.restarted += int(dead.numel())

    def extra_state(self) -> dict[str, Any]:
        state = {"since_restart": self.since_restart.cpu(), "restarted": self.restarted}
        head = self.module.local_head
        if head is not None:  # trained, but not part of the model: resume needs it
            state["local_head"] = {k: v.cpu() for k, v in head.state_dict().items()}
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "since_restart" in state:
            self.since_restart.copy_(state["since_restart"])
            self.restarted = int(state["restarted"])
        head = self.module.local_head
        if head is not None:  # check_resumable made sure the run had one
            head.load_state_dict(state["local_head"])

    def window_metrics(self) -> dict[str, float]:
        sum_over_ranks_(self.counts, self.info)
        counts = self.counts.double()
        total = counts.sum()
        self.counts.zero_()
        if total == 0:
            return {}
        p = counts / total
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {
            "codebook_usage": float((counts > 0).double().mean()),
            "perplexity": float(entropy.exp()),
            "codes_restarted": float(self.restarted),
        }

    @torch.no_grad()
    def evaluate(self, final: bool) -> dict[str, float]:
        """Reconstruction of a fixed set of frames (held-out ones when --val-episodes):
        L1 on [-1, 1], PSNR of the uint8 round trip [dB], codebook usage and perplexity."""
        pool = self.val_pool or self.pool
        prefix = "val_" if self.val_pool else "eval_"
        vq = self.policy.vqgan
        was_training = vq.training
        vq.eval()
        ids = np.unique(
            data_mod.fixed_sample(pool, self.settings.seed, min(EVAL_FRAMES, len(pool)))
        )
        abs_err = sq_err = 0.0
        counts = torch.zeros(vq.codebook.num_embeddings, dtype=torch.long)
        decoded_all = []
        for chunk in np.array_split(ids, max(1, len(ids) // 64)):
            frames = torch.from_numpy(pool.frames[chunk]).to(self.info.device)
            tokens = vq.encode(frames)
            decoded = vq.decode(tokens)
            error = decoded.float() - frames.float()
            abs_err += float(error.abs().sum())
            sq_err += float(error.square().sum())
            counts += torch.bincount(tokens.flatten().cpu(), minlength=counts.numel())
            decoded_all.append(decoded.cpu())
        vq.train(was_training)
        values = float(len(ids) * 3 * pool.frames.shape[1] * pool.frames.shape[2])
        mse = sq_err / values
        p = counts.double() / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        if final and self.info.is_main:
            decoded = torch.cat(decoded_all)
            pick = np.linspace(0, len(ids) - 1, min(PREVIEW_FRAMES, len(ids))).astype(int)
            self._preview(pool.frames[ids[pick]], decoded[pick].numpy())
        return {
            f"{prefix}l1": abs_err / values / 127.5,  # on the [-1, 1] scale of the loss
            f"{prefix}psnr_db": float(10 * np.log10(255.0**2 / max(mse, 1e-12))),
            f"{prefix}codebook_usage": float((counts > 0).double().mean()),
            f"{prefix}perplexity": float(entropy.exp()),
        }

    def _preview(self, originals: np.ndarray, decoded: np.ndarray) -> None:
        """RUN_DIR/reconstructions.png: frames spread over the evaluation set (top row) over
        their reconstructions through the tokens (bottom row)."""
        top = np.concatenate(list(originals), axis=1)
        bottom = np.concatenate(list(decoded), axis=1)
        Image.fromarray(np.concatenate((top, bottom), axis=0)).save(self.run_dir / PREVIEW_FILE)
