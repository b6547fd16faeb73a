"""Optimizers and learning-rate schedules by kohya's names.

Schedules follow diffusers' `get_scheduler` (what kohya uses) as multipliers of the base lr:
pure functions of the step, so tests can assert values at chosen steps.
"""

import math
from collections.abc import Iterable

import torch

from .config import ConfigError


def warmup_steps_for(lr_warmup_steps: float, total_steps: int) -> int:
    """kohya: a value below 1 is a fraction of the total steps."""
    return int(lr_warmup_steps * total_steps) if 0 < lr_warmup_steps < 1 else int(lr_warmup_steps)


def lr_multiplier(step: int, *, scheduler: str, total_steps: int, warmup_steps: int = 0, num_cycles: int = 1, power: float = 1.0, lr_end_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if scheduler == "constant":
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if scheduler == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if scheduler == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
    if scheduler == "polynomial":
        if progress >= 1.0:
            return lr_end_ratio
        return (1 - lr_end_ratio) * (1 - progress) ** power + lr_end_ratio
    raise ConfigError(f"lr_scheduler: unknown {scheduler!r}")


def make_optimizer(param_groups: list[dict], *, optimizer_type: str, weight_decay: float, betas: tuple[float, float], eps: float, momentum: float) -> torch.optim.Optimizer:
    """The optimizer over LoRA parameter groups (each group carries its own "lr")."""
    if optimizer_type == "AdamW":
        return _adamw(param_groups, betas=betas, eps=eps, weight_decay=weight_decay)
    if optimizer_type == "SGD":
        return torch.optim.SGD(param_groups, momentum=momentum, weight_decay=weight_decay)
    if optimizer_type == "Lion":
        from lion_pytorch import Lion

        return Lion(param_groups, betas=betas, weight_decay=weight_decay)
    if optimizer_type == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy(param_groups, betas=betas, eps=eps, weight_decay=weight_decay)
    if optimizer_type == "AdamW8bit":
        return _adamw8bit(param_groups, weight_decay=weight_decay, betas=betas, eps=eps)
    raise ConfigError(f"optimizer_type: unknown {optimizer_type!r}")


def _adamw(param_groups, **kwargs):
    """Fused AdamW where this torch has it for the device (CUDA; CPU from torch 2.4), else the plain one.

    A LoRA has hundreds of small tensors: the fused step updates them all in one pass instead of
    several ops per tensor (on a CPU, 0.8 ms instead of 4 ms for a rank-8 SD-layout network).
    """
    try:  # on copies: a constructor fills the groups it gets with its defaults, `fused` included, before it refuses them
        return torch.optim.AdamW([dict(group) for group in param_groups], fused=True, **kwargs)
    except RuntimeError:  # "fused=True requires all the params to be ... of supported devices" (torch < 2.4 on a CPU)
        return torch.optim.AdamW(param_groups, **kwargs)


def _adamw8bit(param_groups, **kwargs):
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError("optimizer_type AdamW8bit needs bitsandbytes: `pip install bitsandbytes` (CUDA only), or choose AdamW") from e
    if not any(p.is_cuda for group in param_groups for p in group["params"]):
        raise ConfigError("optimizer_type AdamW8bit runs on CUDA only; on this device choose AdamW")
    return bitsandbytes.optim.AdamW8bit(param_groups, **kwargs)


def parameter_groups(unet_params: Iterable[torch.nn.Parameter], text_params: Iterable[torch.nn.Parameter], unet_lr: float,
                     text_encoder_lr: float, text_2_params: Iterable[torch.nn.Parameter] = (), text_encoder_2_lr: float = 0.0,
                     embedding_params: Iterable[torch.nn.Parameter] = (), embedding_lr: float = 0.0) -> list[dict]:
    """LoRA-only groups with their own learning rates (SDXL's second encoder apart, pivotal tuning's token
    vectors apart); empty groups are left out."""
    groups = [{"params": list(unet_params), "lr": unet_lr, "name": "unet"}, {"params": list(text_params), "lr": text_encoder_lr, "name": "text_encoder"},
              {"params": list(text_2_params), "lr": text_encoder_2_lr, "name": "text_encoder_2"},
              {"params": list(embedding_params), "lr": embedding_lr, "name": "embeddings"}]
    return [g for g in groups if g["params"]]
