"""Will a training step fit the GPU? An estimate made before the run, for the step-math panel (issue #19).

The parts are the ones `bench/memory_estimate.py` counts for full-size models on the meta device: the
frozen weights, the LoRA's fp32 parameters with their gradients and optimizer state, the activations
saved for backward, and a fixed allowance for the CUDA context (`CUDA_OVERHEAD_MIB`, which the bench
takes from here). Its count runs a whole forward (about 20 s on a CPU), too slow for a panel that
follows every edit, so the activations come from its figures: MiB per sample and per megapixel of
training image, with and without gradient checkpointing, measured at batch 1 at each model's own size
(`ACTIVATION_MIB_PER_MEGAPIXEL`). Activations grow with batch x pixels (convolutions, and flash
attention, are linear in the tokens); fp32 activations (no autocast, fp32 weights) count twice. The
weights and the LoRA's size are counted on the loaded model itself (`ModelMemory.of`); LoHa and LoKr
are counted as a LoRA of the same rank, and under the webui's --medvram the weights the webui keeps on
the CPU are counted as on the GPU: a guide, not a limit.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..networks.targets import num_res_blocks_of, text_targets, unet_targets
from .config import TrainConfig

MIB = 2**20
CUDA_OVERHEAD_MIB = 500  # CUDA context ~300-450 MiB (lazy module loading) + workspaces and allocator slack
# bench/memory_estimate.py at batch 1, fp16, flash attention: activations saved for backward (MiB) / megapixels,
# (checkpointing off, on). SD1 512 px: 986.3 / 172.4 MiB; SD2 768-v 768 px: 2198.3 / 387.0 MiB; SDXL 1024 px: 6836.8 / 972.5 MiB
ACTIVATION_MIB_PER_MEGAPIXEL = {"sd1": (3762.5, 657.7), "sd2": (3727.0, 656.1), "sdxl": (6520.1, 927.4)}
# fp32 values the optimizer keeps per trained parameter, besides the parameter and its gradient
OPTIMIZER_STATES = {"AdamW": 2, "AdamW8bit": 0.5, "Lion": 1, "Prodigy": 4, "SGD": 1}


@dataclass(frozen=True)
class ModelMemory:
    """What the estimate needs of a loaded model on a GPU; all in bytes or parameters."""

    device_bytes: int  # the GPU's total memory
    weight_bytes: int  # the frozen UNet and text encoders as loaded
    unet_per_rank: int  # LoRA parameters per unit of rank on the UNet's attention/ff layers
    resblock_per_rank: int  # the same on the ResBlocks' Linear and 1x1 layers (LoCon trains them at network_dim)
    conv_per_rank: int  # the same on the 3x3 convs (LoCon's conv_dim)
    text_per_rank: int  # the same on the text encoders
    half_weights: bool  # fp16/bf16 weights: activations are half precision without autocast too

    @classmethod
    def of(cls, host) -> "ModelMemory | None":
        """The host's model on its GPU; None on a CPU (no fixed memory to exceed)."""
        if host.device.type != "cuda":
            return None
        return cls.counted(host, torch.cuda.get_device_properties(host.device).total_memory)

    @classmethod
    def counted(cls, host, device_bytes: int) -> "ModelMemory":
        """The host's weights and LoRA sizes per rank, counted on its modules, for a device of `device_bytes`."""
        encoders = [model.module for model in host.text_encoders]
        attention = unet_targets(host.unet, include_conv=False, num_res_blocks=num_res_blocks_of(host.unet))
        paths = {target.path for target in attention}
        resblocks = [t for t in unet_targets(host.unet, include_conv=True, num_res_blocks=num_res_blocks_of(host.unet)) if t.path not in paths]
        return cls(device_bytes,
                   sum(p.numel() * p.element_size() for module in (host.unet, *encoders) for p in module.parameters()),
                   _per_rank(attention), _per_rank(t for t in resblocks if t.kind != "conv"), _per_rank(t for t in resblocks if t.kind == "conv"),
                   _per_rank(text_targets(host.text_encoders)), host.dtype in (torch.float16, torch.bfloat16))


def _per_rank(targets) -> int:
    """LoRA parameters per unit of rank: down in x k x k, up out (Linear and 1x1 conv: k = 1)."""
    return sum(_layer_per_rank(target.layer) for target in targets)


def _layer_per_rank(layer: nn.Module) -> int:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] + layer.out_channels
    return layer.in_features + layer.out_features


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes
    adapter: int  # LoRA parameters, gradients and optimizer state
    activations: int
    overhead: int = CUDA_OVERHEAD_MIB * MIB

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.overhead


def estimate_step_memory(arch: str, memory: ModelMemory, *, batch: int, resolution: tuple[int, int], network_dim: int, conv_dim: int,
                         train_text_encoder: bool, optimizer: str, gradient_checkpointing: bool, autocast: bool) -> MemoryEstimate:
    """GPU bytes of one training step, by part."""
    resblocks = network_dim * memory.resblock_per_rank + conv_dim * memory.conv_per_rank if conv_dim else 0  # LoCon
    trained = network_dim * memory.unet_per_rank + resblocks + (network_dim * memory.text_per_rank if train_text_encoder else 0)
    adapter = trained * 4 * (2 + OPTIMIZER_STATES.get(optimizer, 2))
    per_megapixel = ACTIVATION_MIB_PER_MEGAPIXEL.get(arch, ACTIVATION_MIB_PER_MEGAPIXEL["sdxl"])[int(gradient_checkpointing)]
    precision = 1 if autocast or memory.half_weights else 2
    activations = per_megapixel * MIB * batch * resolution[0] * resolution[1] / 1e6 * precision
    return MemoryEstimate(memory.weight_bytes, int(adapter), int(activations))


def out_of_memory_advice(config: TrainConfig) -> str:
    """What to change so a step needs less memory: batch, resolution, gradient checkpointing."""
    batch, accumulate, (width, height) = config.train_batch_size, config.gradient_accumulation_steps, config.resolution
    advice = []
    if batch > 1:
        advice.append(f"lower train_batch_size {batch} -> {batch // 2} (gradient_accumulation_steps {accumulate} -> "
                      f"{accumulate * 2} keeps the effective batch)")
    if max(width, height) > 512:
        smaller = [max(64, side * 3 // 4 // 64 * 64) for side in (width, height)]
        advice.append(f"lower the resolution {width}x{height} -> {smaller[0]}x{smaller[1]} (activations grow with the pixels)")
    if not config.gradient_checkpointing:
        advice.append("turn on gradient_checkpointing (a fraction of the activations, about a third slower)")
    return "; ".join(advice) or "a smaller network_dim, mixed_precision bf16 or fp16, or a GPU with more memory"


def memory_warning(config: TrainConfig, arch: str, memory: ModelMemory) -> str | None:
    """A warning when the estimated step does not fit the GPU, with what to lower; None when it fits."""
    estimate = estimate_step_memory(arch, memory, batch=config.train_batch_size, resolution=config.resolution,
                                    network_dim=config.network_dim, conv_dim=config.conv_dim if config.conv_targets else 0,
                                    train_text_encoder=config.train_text_encoder, optimizer=config.optimizer_type,
                                    gradient_checkpointing=config.gradient_checkpointing, autocast=config.mixed_precision != "no")
    if estimate.total <= memory.device_bytes:
        return None
    width, height = config.resolution
    return (f"estimated GPU memory for a training step {_gib(estimate.total)} GiB is more than this GPU's {_gib(memory.device_bytes)} GiB "
            f"(model {_gib(estimate.weights)}, LoRA with gradients and {config.optimizer_type} state {_gib(estimate.adapter)}, "
            f"activations at batch {config.train_batch_size} of {width}x{height} {_gib(estimate.activations)}, CUDA {_gib(estimate.overhead)}): "
            f"{out_of_memory_advice(config)}")


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f}"
