"""GPU memory estimate for a LoRA training step on a full-size UNet, computed without a GPU.

    python bench/memory_estimate.py [--arch sd1|sd2|sdxl] [--resolution 1024] [--rank 16] [--batch 1]

Nothing is allocated: the UNet (fp16, frozen) and a UNet-only LoRA (kohya's default targets, rank =
alpha = --rank, fp32) are built on the meta device, and one training forward (UNet + fp32 MSE loss,
as `lib_lora.train.trainer` runs it with an fp16 host) runs on meta tensors. Latents and text-encoder
outputs are taken as cached, so the text encoders and the VAE are not on the GPU. Counted, in MiB:

- the frozen UNet weights, 2 bytes a parameter;
- the LoRA's fp32 parameters, their fp32 grads and AdamW's two fp32 moments;
- the activations saved for backward: every tensor autograd saves, seen through
  `torch.autograd.graph.saved_tensors_hooks`, counted once per storage (one tensor saved by several
  ops, or a view of it, costs its storage once) and the model's own weights left out. Without
  gradient checkpointing that is the whole forward's. With it, the peak is what the checkpointed
  forward keeps (each block's inputs, which torch's checkpoint saves, and what is saved outside the
  blocks: embeddings, final norm and conv, loss) plus the largest single block's saved tensors
  while backward recomputes it (each block run alone under the hook, on the inputs it got);
- a fixed allowance, CUDA_OVERHEAD_MIB, for the CUDA context, cuBLAS/cuDNN workspaces, allocator
  rounding and backward's transient buffers (the gradient of the activation in flight).

Attention is modelled as CUDA's flash / memory-efficient SDPA kernels, which keep q, k, v, the output
and an fp32 logsumexp [B, heads, T] for backward, never the T x T matrix that the math path (the
only one on meta) would save: `FlashLikeAttention` replaces F.scaled_dot_product_attention inside
this script only. Not counted: AdamW's foreach temporaries at the optimizer step (taken after
backward has freed the activations) and the cached latents/text outputs (on the CPU, or a few MiB).
"""

import argparse
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lib_lora.models.architectures import FULL_SIZE  # noqa: E402
from lib_lora.models.unet import UNetConfig, UNetModel  # noqa: E402
from lib_lora.networks.network import LoraNetwork, make_network  # noqa: E402
from lib_lora.train.memory import CUDA_OVERHEAD_MIB  # noqa: E402  (the tab's estimate uses this script's figures)
from lib_lora.train.noise import masked_mse  # noqa: E402

BUDGET_MIB = 8192  # an 8 GiB card
MIB = 2**20


class FlashLikeAttention(torch.autograd.Function):
    """SDPA as the CUDA flash / memory-efficient kernels keep it for backward: q, k, v, out, logsumexp.

    Meta tensors only: forward gives the output's shape and layout (that of q, as those kernels
    return it), and the estimate never runs backward.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)  # [B, H, T, d], strided as q: transpose(1, 2).flatten(2) is then a view
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)  # [B, H, T]
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        raise NotImplementedError("a memory model on meta tensors: backward is never run")


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage; meta storages have no data pointer, so the StorageImpl's address."""
    return t.untyped_storage()._cdata


class StorageCounter:
    """Bytes of distinct storages added, each once; storages in `skip` (weights, inputs) cost nothing."""

    def __init__(self, skip: set[int]):
        self.seen, self.bytes = set(skip), 0
        self.held = []  # no counted storage is freed, so none's address is reused while counting

    def add(self, t: torch.Tensor) -> torch.Tensor:
        if storage_key(t) not in self.seen:
            self.seen.add(storage_key(t))
            self.bytes += t.untyped_storage().nbytes()
            self.held.append(t)
        return t

    @contextmanager
    def saved_for_backward(self):
        """Count what autograd saves for backward inside the block."""
        with torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t):
            yield


def build(config: UNetConfig, rank: int) -> tuple[UNetModel, LoraNetwork]:
    """The frozen fp16 UNet on the meta device and its applied fp32 LoRA.

    The LoRA is built on the CPU (tens of MiB): its forward reads alpha with `.item()`, which a meta
    tensor cannot give; its weights are cast to the input's device and dtype in forward anyway.
    """
    with torch.device("meta"):
        unet = UNetModel(config).half().requires_grad_(False)
    return unet, make_network(unet, None, network_dim=rank, network_alpha=rank, device="cpu").apply_to()


def training_inputs(config: UNetConfig, resolution: int, batch: int) -> dict[str, torch.Tensor]:
    """What the trainer hands the UNet and the loss: fp16 noisy latents, text context and SDXL's vector y."""
    latent = resolution // 8
    with torch.device("meta"):
        inputs = {
            "x": torch.empty(batch, config.in_channels, latent, latent, dtype=torch.float16),
            "timesteps": torch.empty(batch, dtype=torch.long),
            "context": torch.empty(batch, 77, config.context_dim, dtype=torch.float16),
            "target": torch.empty(batch, config.out_channels, latent, latent),
        }
        if config.adm_in_channels:
            inputs["y"] = torch.empty(batch, config.adm_in_channels, dtype=torch.float16)
    return inputs


def training_loss(unet: UNetModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    prediction = unet(inputs["x"], inputs["timesteps"], inputs["context"], inputs.get("y"))
    return masked_mse(prediction, inputs["target"], None).mean()


def named_blocks(unet: UNetModel) -> dict[str, torch.nn.Module]:
    """The blocks gradient checkpointing recomputes one at a time, by module name."""
    blocks = {f"input_blocks.{i}": block for i, block in enumerate(unet.input_blocks)}
    blocks["middle_block"] = unet.middle_block
    return blocks | {f"output_blocks.{i}": block for i, block in enumerate(unet.output_blocks)}


@contextmanager
def block_inputs(unet: UNetModel):
    """Collect each block's (h, emb, context) as it is called, by block name."""
    seen = {}

    def keep(name: str):
        def hook(block, args):
            seen[name] = args
        return hook

    handles = [block.register_forward_pre_hook(keep(name)) for name, block in named_blocks(unet).items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def activations_plain(unet: UNetModel, inputs: dict, weights: set[int]) -> int:
    """Bytes saved for backward by the whole forward, without checkpointing."""
    counter = StorageCounter(weights)
    with counter.saved_for_backward():
        training_loss(unet, inputs)
    return counter.bytes


@dataclass(frozen=True)
class Checkpointed:
    """Activation bytes at backward's peak with gradient checkpointing, in parts."""

    kept: int  # saved by the checkpointed forward, block inputs included
    block_inputs: int  # of which the blocks' inputs
    largest: int  # saved by the largest block while it is recomputed
    largest_block: str

    @property
    def peak(self) -> int:
        return self.kept + self.largest


def activations_checkpointed(unet: UNetModel, inputs: dict, weights: set[int]) -> Checkpointed:
    """What the checkpointed forward keeps, and what its largest block saves when recomputed.

    torch's checkpoint saves each block's inputs; they are added once more, deduplicated, so that
    they are counted whatever its version does.
    """
    unet.gradient_checkpointing = True
    counter = StorageCounter(weights)
    with block_inputs(unet) as args_of, counter.saved_for_backward():
        training_loss(unet, inputs)
    unet.gradient_checkpointing = False
    inputs_only = StorageCounter(weights)
    for t in (t for args in args_of.values() for t in args):
        counter.add(t)
        inputs_only.add(t)
    blocks = named_blocks(unet)
    per_block = {name: block_saved_bytes(blocks[name], args, weights) for name, args in args_of.items()}
    largest = max(per_block, key=per_block.get)
    return Checkpointed(counter.bytes, inputs_only.bytes, per_block[largest], largest)


def block_saved_bytes(block: torch.nn.Module, args: tuple, weights: set[int]) -> int:
    """Bytes one block saves for backward, its inputs left out (they are counted as kept)."""
    counter = StorageCounter(weights | {storage_key(t) for t in args})
    with counter.saved_for_backward():
        block(*args)
    return counter.bytes


def table_rows(unet_params: int, lora_params: int, plain: int, checkpointed: Checkpointed) -> list[tuple[str, float, float]]:
    """(label, MiB without checkpointing, MiB with it), the total last."""
    fixed = [
        (f"UNet weights, fp16 ({unet_params:,} params)", unet_params * 2),
        (f"LoRA params, fp32 ({lora_params:,} params)", lora_params * 4),
        ("LoRA grads, fp32", lora_params * 4),
        ("AdamW state, 2 x fp32", lora_params * 8),
    ]
    rows = [(label, size / MIB, size / MIB) for label, size in fixed]
    rows.append(("activations saved for backward", plain / MIB, checkpointed.peak / MIB))
    rows.append(("CUDA context + allocator (assumed)", CUDA_OVERHEAD_MIB, CUDA_OVERHEAD_MIB))
    return rows + [("total", sum(r[1] for r in rows), sum(r[2] for r in rows))]


def print_table(rows: list[tuple[str, float, float]]) -> None:
    print(f"{'MiB':<48}{'checkpointing off':>20}{'checkpointing on':>20}")
    for label, off, on in rows:
        print(f"{label:<48}{off:>20.1f}{on:>20.1f}")
    fits = ["yes" if total <= BUDGET_MIB else "no" for total in rows[-1][1:]]
    print(f"{f'fits in 8 GiB ({BUDGET_MIB} MiB)':<48}{fits[0]:>20}{fits[1]:>20}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=FULL_SIZE, default="sdxl")
    parser.add_argument("--resolution", type=int, default=1024, help="square image side in pixels")
    parser.add_argument("--rank", type=int, default=16, help="network_dim = network_alpha")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(f"options: --arch {args.arch} --resolution {args.resolution} --rank {args.rank} --batch {args.batch}")
    config = FULL_SIZE[args.arch][0]
    unet, network = build(config, args.rank)
    weights = {storage_key(t) for model in (unet, network) for t in [*model.parameters(), *model.buffers()]}
    inputs = training_inputs(config, args.resolution, args.batch)
    with mock.patch.object(F, "scaled_dot_product_attention", FlashLikeAttention.apply):
        plain = activations_plain(unet, inputs, weights)
        checkpointed = activations_checkpointed(unet, inputs, weights)
    latent = args.resolution // 8
    print(f"GPU memory estimate, LoRA training: {args.arch} UNet at {args.resolution}x{args.resolution} (latents {latent}x{latent}), "
          f"batch {args.batch}, UNet-only LoRA rank {args.rank}, AdamW")
    print("cached latents and text-encoder outputs: the text encoders and the VAE are not on the GPU")
    print("attention modelled as CUDA flash / memory-efficient SDPA (saves q, k, v, out, logsumexp)\n")
    unet_params, lora_params = (sum(p.numel() for p in model.parameters()) for model in (unet, network))
    print_table(table_rows(unet_params, lora_params, plain, checkpointed))
    print(f"\ncheckpointed activations = kept through the forward {checkpointed.kept / MIB:.1f} "
          f"(block inputs {checkpointed.block_inputs / MIB:.1f}, the rest saved outside the blocks) "
          f"+ largest block recomputed in backward ({checkpointed.largest_block}) {checkpointed.largest / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
