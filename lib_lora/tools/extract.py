"""`extract`: a LoRA (LoCon with a conv rank) approximating TUNED − BASE, as kohya's `extract_lora_from_models.py`.

Both checkpoints must be one architecture. The layers are kohya's targets, named as kohya names them
(`unet_targets`/`text_targets`: diffusers paths for SD1/SD2, ldm paths for SDXL, `lora_te1/2` for
SDXL's encoders); with a conv rank, the ResBlock and sampler convs too. Per layer the flat difference
[out, in·kh·kw] is cut by SVD to the rank (the conv rank for k×k convs), singular values folded into up
and alpha = rank (scale 1), as kohya writes it, without its 0.99-quantile clamp. A layer whose largest
absolute difference is at most `min_diff` is left out (kohya applies its `--min_diff` to a whole text
encoder; here it is per layer).
"""

from pathlib import Path

import torch

from ..models.checkpoint import ARCH_NAMES, Checkpoint, CheckpointError, load_checkpoint
from ..networks.targets import Target, num_res_blocks_of, text_models_for, text_targets, unet_targets
from ..train.saving import checkpoint_hashes
from .common import Progress, ToolError, ToolResult, check_output, no_progress
from .lowrank import RankRule, spectrum_of_dense
from .sources import Architecture, checkpoint_dtype
from .writing import base_fields, describe, network_fields, reduce_module, tool_fields, write_lora


def targets_of(ckpt: Checkpoint, include_conv: bool) -> dict[str, Target]:
    """kohya name -> target layer, text encoder(s) first, as a trained network names them."""
    text = text_targets(text_models_for(ckpt.arch, ckpt.text_encoder, ckpt.text_encoder_2))
    unet = unet_targets(ckpt.unet, include_conv, num_res_blocks_of(ckpt.unet))
    return {t.name: t for t in [*text, *unet]}


def paired_targets(base: Checkpoint, tuned: Checkpoint, paths: tuple[Path, Path],
                   include_conv: bool) -> list[tuple[Target, Target]]:
    """(base layer, tuned layer) per kohya name; checkpoints of different architectures or sizes are refused."""
    if base.arch != tuned.arch:
        raise CheckpointError(f"{paths[0]} is an {ARCH_NAMES[base.arch]} checkpoint but {paths[1]} an "
                              f"{ARCH_NAMES[tuned.arch]} one; extract needs two checkpoints of one architecture")
    base_targets, tuned_targets = targets_of(base, include_conv), targets_of(tuned, include_conv)
    for name, target in base_targets.items():
        other = tuned_targets.get(name)
        if other is None or other.layer.weight.shape != target.layer.weight.shape:
            found = "no such layer" if other is None else f"shape {tuple(other.layer.weight.shape)}"
            raise CheckpointError(f"{name}: {paths[0]} has shape {tuple(target.layer.weight.shape)}, {paths[1]} {found}; "
                                  f"the checkpoints are not the same model size")
    return [(target, tuned_targets[name]) for name, target in base_targets.items()]


def _file_record(path: Path, role: str) -> dict:
    return {"file": path.name, "role": role, **checkpoint_hashes(path, path.stat().st_mtime_ns)}


def extract_lora(base, tuned, out, rank: int, conv_rank: int | None = None, min_diff: float = 0.01, *,
                 dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu", overwrite: bool = False,
                 progress: Progress = no_progress) -> ToolResult:
    """Write `out`: a LoRA of `rank` (and LoCon `conv_rank`) for every layer where TUNED differs from BASE."""
    base, tuned = Path(base), Path(tuned)
    out = check_output(out, [base, tuned], overwrite)
    rule = RankRule(rank=rank, conv_rank=conv_rank)
    if min_diff < 0:
        raise ToolError(f"--min-diff must be >= 0, got {min_diff}")
    models = [load_checkpoint(p, dtype=checkpoint_dtype(p)) for p in (base, tuned)]  # the file's dtype: exact, least memory
    modules, reports, skipped = [], [], {}
    for b, t in progress(paired_targets(*models, (base, tuned), conv_rank is not None), "extract"):
        diff = t.layer.weight.detach().to(device, torch.float32) - b.layer.weight.detach().to(device, torch.float32)
        largest = float(diff.abs().max())
        if largest <= min_diff:
            skipped[b.name] = f"largest difference {largest:.3g} <= min_diff {min_diff:g}"
            continue
        module, report = reduce_module(b.name, spectrum_of_dense(diff.flatten(1)), rule, tuple(diff.shape[1:]), None)
        modules.append(module)
        reports.append(report)
    if not modules:
        raise ToolError(f"{tuned}: no layer differs from {base} by more than --min-diff {min_diff:g}; nothing to extract")
    architecture = Architecture(models[1].arch, models[1].parameterization == "v", "checkpoint")
    comment = f"extracted from {tuned.name} - {base.name} at {describe(rule)}, min_diff {min_diff:g}"
    records = [_file_record(base, "base"), _file_record(tuned, "tuned")]
    metadata = (base_fields(architecture, out.stem) | network_fields(modules) | {"ss_sd_model_name": base.name}
                | tool_fields("extract", records, comment, rank=rank, conv_rank=conv_rank, min_diff=min_diff))
    return ToolResult(write_lora(out, modules, metadata, dtype, overwrite), reports, skipped)
