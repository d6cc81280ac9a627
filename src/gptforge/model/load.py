"""A state dict into a `GPT`, with one error line that names the first tensor that does not fit.

Below every reader of saved weights (`gptforge.hf`, `gptforge.weights`): they convert, this checks and loads.
"""

from __future__ import annotations

from torch import Tensor

from gptforge.errors import CheckpointError
from gptforge.model.gpt import GPT


def load_state_dict_checked(model: GPT, state_dict: dict[str, Tensor], source: str) -> None:
    """`model.load_state_dict` that names the first missing, extra or differently shaped tensor."""
    state_dict = dict(state_dict)
    if (
        model.cfg.tie_embeddings
        and "lm_head.weight" not in state_dict
        and "transformer.wte.weight" in state_dict
    ):
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    for name, expected in model.state_dict().items():
        if name not in state_dict:
            raise CheckpointError(
                f"{source}: tensor '{name}' is missing (weights of another model or format?)"
            )
        got = state_dict[name]
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(got.shape)} but the model config says "
                f"{tuple(expected.shape)} (weights and config of different models?)"
            )
    extra = sorted(set(state_dict) - set(model.state_dict()))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(f"{source}: unexpected tensor '{extra[0]}'{more} (weights of another model?)")
    model.load_state_dict(state_dict)
