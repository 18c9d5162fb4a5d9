"""Model fixtures shared by the policy tests."""

from __future__ import annotations

import torch
from gr2_policy.model import GR2Config, GR2Policy


def lang_conditioned_policy(seed: int) -> GR2Policy:
    """A random gr2-tiny with ``lang_to_tokens`` and the words text encoder (eval mode).

    The projections start at zero in a fresh model, which would make the conditioning
    invisible to a parity test; here they are random, about a third of the image embedding's
    size.
    """
    config = GR2Config.from_preset("gr2-tiny", lang_to_tokens=True, text_encoder="words")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = GR2Policy(config)
        for projection in (policy.gpt.image_lang, policy.gpt.act_lang):
            torch.nn.init.normal_(projection.weight, std=0.3 * config.d_model**-0.5)
    return policy.eval()
