"""PPO's critic: a value head on a causal LM's backbone, and the clipped value loss.

Two kinds, chosen by ``algorithm.critic.model`` in the recipe:

* **shared** (default, ``model: null``): the head reads the *policy's* last hidden state, so the LoRA-adapted trunk
  is shared and the value loss trains it too. During the loss no second forward pass is run: a forward hook on
  the policy's backbone captures the hidden state of the very pass TRL makes for the log-probabilities.
* **separate** (``model: <name>``): a second causal LM with its own LoRA adapter and head; more memory, no
  interference between the policy and value gradients. It must share the policy's tokenizer (it reads the same
  token ids).

A value ``V_t`` belongs to completion token ``t``: it is the head applied to the hidden state of the position
that *predicts* token ``t`` (the state before the action), the same alignment as TRL's per-token log-probs.
The head starts at zero, so the first values are 0 and the first advantages are the rewards-to-go.

Only the critic's trainable parameters (the head, plus the separate critic's LoRA) are saved in checkpoints
(``critic.safetensors``) and restored on resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rltrain.recipes import LoraConfig, ModelConfig, PPOSection

logger = logging.getLogger(__name__)

CRITIC_FILE = "critic.safetensors"
"""The critic's trainable weights inside a checkpoint directory."""


class CriticCheckpointError(ValueError):
    """A checkpoint's critic weights are missing or do not fit the critic the recipe describes."""


class ValueHead(nn.Module):
    """A linear map from a hidden state to one scalar value, in float32 whatever the trunk's dtype."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.float()).squeeze(-1)


def backbone_of(model: nn.Module) -> nn.Module:
    """The module that returns ``last_hidden_state`` (``model.model`` of a Llama), under a PEFT wrapper or not;
    the same module TRL's fused LM head runs before its projection."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model


class Critic(nn.Module):
    """A value head on ``lm``'s backbone. ``owns_trunk=False``: ``lm`` is the policy (kept outside this module's
    parameters, hooked during the loss); ``True``: ``lm`` is the critic's own model (a registered submodule)."""

    def __init__(self, lm: nn.Module, owns_trunk: bool) -> None:
        super().__init__()
        hidden_size = lm.config.get_text_config().hidden_size
        self.owns_trunk = owns_trunk
        if owns_trunk:
            self.lm = lm
        else:
            self._policy: Callable[[], nn.Module] = lambda: lm  # not a submodule: the policy is not the critic's
        self.head = ValueHead(hidden_size)
        device = next(lm.parameters()).device
        self.head.to(device)

    @property
    def kind(self) -> str:
        return "separate" if self.owns_trunk else "shared"

    def _trunk(self) -> nn.Module:
        return backbone_of(self.lm if self.owns_trunk else self._policy())

    def _head_on(self, hidden: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        return self.head(hidden[:, -logits_to_keep - 1:-1])

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        """``(B, logits_to_keep)`` values of the last ``logits_to_keep`` tokens, from a forward pass of its own."""
        out = self._trunk()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self._head_on(out.last_hidden_state, logits_to_keep)

    @contextmanager
    def alongside_policy(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
    ) -> Iterator[Callable[[], torch.Tensor]]:
        """Around the policy's forward pass on ``input_ids``: yields a function that returns the values (with
        gradients). The shared critic reads the hidden state that pass produced (a hook on the policy's backbone,
        removed on exit); the separate one runs its own pass."""
        if self.owns_trunk:
            yield lambda: self.values(input_ids, attention_mask, logits_to_keep)
            return
        captured: list[torch.Tensor] = []

        def keep(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            captured.append(output.last_hidden_state)

        def read() -> torch.Tensor:
            if not captured:
                raise RuntimeError("the policy's forward pass did not run the backbone the value head is on")
            hidden = torch.cat(captured, dim=0)
            if hidden.shape[:2] != input_ids.shape:
                raise RuntimeError(
                    f"the value head captured hidden states of shape {tuple(hidden.shape[:2])} for inputs of shape "
                    f"{tuple(input_ids.shape)}: another forward pass ran on the policy during the loss"
                )
            return self._head_on(hidden, logits_to_keep)

        handle = self._trunk().register_forward_hook(keep, with_kwargs=True)
        try:
            yield read
        finally:
            handle.remove()

    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters the optimiser updates and checkpoints hold, by name."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def save(self, directory: Path) -> Path:
        """Write the trainable weights to ``directory/critic.safetensors``."""
        from safetensors.torch import save_file

        path = directory / CRITIC_FILE
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.trainable().items()}
        save_file(tensors, str(path), metadata={"kind": self.kind})
        return path

    def load(self, directory: Path) -> None:
        """Restore the trainable weights from ``directory/critic.safetensors`` (written by :meth:`save`)."""
        from safetensors import safe_open

        path = directory / CRITIC_FILE
        if not path.exists():
            raise CriticCheckpointError(
                f"{path} not found: the checkpoint has no critic weights (was it written by a PPO run?)"
            )
        params = self.trainable()
        with safe_open(str(path), framework="pt") as fh:
            kind = (fh.metadata() or {}).get("kind")
            names = set(fh.keys())
            if kind != self.kind or names != set(params):
                raise CriticCheckpointError(
                    f"{path} holds a {kind} critic with {len(names)} tensors; the recipe's critic is {self.kind} with "
                    f"{len(params)} (missing: {sorted(set(params) - names)[:3]}, unexpected: "
                    f"{sorted(names - set(params))[:3]}); algorithm.critic must match the run being resumed"
                )
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(fh.get_tensor(name).to(param.device, param.dtype))
        logger.info("restored the %s critic from %s", self.kind, path)


def build_critic(policy: nn.Module, policy_tokenizer: Any, section: PPOSection, model: ModelConfig) -> Critic:
    """The critic ``section.critic`` describes: a value head on the policy's own (LoRA-adapted) backbone, or on
    a model of its own (``critic.model``: an alias, directory or cached Hugging Face id, loaded like the policy
    with ``model``'s dtype and device) trained through a LoRA adapter shaped like the policy's."""
    if section.critic.model is None:
        return Critic(policy, owns_trunk=False)
    return _separate_critic(section.critic.model, section.lora, policy_tokenizer, model)


def _separate_critic(name: str, lora: LoraConfig, policy_tokenizer: Any, model: ModelConfig) -> Critic:
    from peft import get_peft_model

    from rltrain.models import load_model_and_tokenizer

    lm, tokenizer = load_model_and_tokenizer(name, dtype=model.dtype, device=model.device)
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise ValueError(
            f"algorithm.critic.model: {name!r} has another tokenizer than the policy ({len(tokenizer)} vs "
            f"{len(policy_tokenizer)} tokens, or other ids); the critic reads the policy's token ids, so it needs "
            "the same tokenizer (a model of the same family)"
        )
    lm.train()
    return Critic(get_peft_model(lm, lora.to_peft()), owns_trunk=True)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss over the mask-1 tokens, and the fraction of them where the clip was binding.

    The new value may move at most ``cliprange_value`` from the value at sampling time; the loss is the larger
    of the clipped and unclipped squared errors (so clipping never lowers it), halved::

        V_clip = V_old + clamp(V - V_old, -c, c)
        loss   = 0.5 * mean(max((V - R)^2, (V_clip - R)^2))     clipfrac = mean((V_clip - R)^2 > (V - R)^2)
    """
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped - returns) ** 2
    weight = mask.to(values.dtype)
    count = weight.sum().clamp(min=1.0)
    loss = 0.5 * (torch.maximum(unclipped_error, clipped_error) * weight).sum() / count
    clipfrac = ((clipped_error > unclipped_error).to(values.dtype) * weight).sum() / count
    return loss, clipfrac.detach()
