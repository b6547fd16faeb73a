"""Command line: `python -m lib_lora generate --prompt "a red circle"` (see `--help`)."""

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from .demo.tiny import DEFAULT_CHECKPOINT
from .models.samplers import SAMPLERS
from .tools.cli import add_tools_commands
from .train.cli import add_train_command
from .ui.cli import add_ui_command


def _generate(args) -> None:
    import torch

    from .models.checkpoint import load_checkpoint
    from .models.pipeline import GenerationParams
    from .networks.apply import generate_with_loras

    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    default_size = 64 if checkpoint == DEFAULT_CHECKPOINT else 512
    params = GenerationParams(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        cfg_scale=args.cfg,
        seed=args.seed,
        width=args.width or default_size,
        height=args.height or default_size,
        sampler=args.sampler,
        batch_size=args.batch_size,
        clip_skip=args.clip_skip,
    )
    ckpt = load_checkpoint(checkpoint, dtype=torch.float32)
    with tqdm(total=params.steps, desc="sampling", unit="step") as bar:
        images = generate_with_loras(ckpt, params, args.lora_dir, args.lora_mode, callback=lambda step, total: bar.update(1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = args.out if len(images) == 1 else args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}")
        image.save(path)
        print(f"wrote {path}")


def _demo(args) -> None:
    from .demo.main_job import run_demo
    from .train.cli import ProgressBar

    run_demo(args.out_dir, concept=args.concept, on_event=ProgressBar())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_lora", description="Train and apply LoRA/LoCon for Stable Diffusion 1.x.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="text to image with a checkpoint (default: the embedded tiny model)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--checkpoint", type=Path, help=f"a .safetensors or .ckpt SD1 file (default: {DEFAULT_CHECKPOINT.name})")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--width", type=int, help="pixels; default 64 for the embedded model, else 512")
    gen.add_argument("--height", type=int)
    gen.add_argument("--sampler", choices=SAMPLERS, default=SAMPLERS[0])
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--clip-skip", type=int, default=1)
    gen.add_argument("--out", type=Path, default=Path("out/generate.png"))
    gen.add_argument("--lora-dir", type=Path, action="append", default=[],
                     help="folder searched (recursively) for the files named by <lora:name:weight> in the prompt; repeatable")
    gen.add_argument("--lora-mode", choices=("merge", "onthefly"), default="merge",
                     help="merge LoRA deltas into the weights (default) or add them in each forward pass")
    gen.set_defaults(run=_generate)
    add_train_command(commands)
    add_ui_command(commands)
    add_tools_commands(commands)
    demo = commands.add_parser("demo", help="the main job: teach the embedded model a new concept, show before/after")
    demo.add_argument("--out-dir", type=Path, default=Path("out"))
    demo.add_argument("--concept", choices=("purple", "star"), default="purple")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:  # our error types are ValueErrors with a message meant for the user
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
