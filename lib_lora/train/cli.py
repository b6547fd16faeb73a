"""`python -m lib_lora train`: flags generated from TrainConfig, a TOML file, tqdm progress."""

import argparse
import dataclasses
from pathlib import Path

from tqdm import tqdm

from .config import ConfigError, TrainConfig


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (kohya's names), defaulting to "not given" so TOML values stay."""
    for f in dataclasses.fields(TrainConfig):
        kwargs = {"default": None, "help": f.metadata.get("help", "")}
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):
            kwargs["nargs"] = "+"
        if f.metadata.get("choices"):  # listed, but checked by TrainConfig, which names the closest one
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        parser.add_argument("--" + f.name, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = TrainConfig.from_toml(args.config).to_dict() if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
    return TrainConfig.from_dict(values)


class ProgressBar:
    """Turns TrainEvents into a tqdm bar with loss and lr, and prints saves and warnings."""

    def __init__(self):
        self.bar = None

    def __call__(self, event) -> None:
        if event.kind == "prepare":  # class images, latents: before training starts
            if self.bar is None:
                self.bar = tqdm(total=event.total_steps, desc=event.message.partition(":")[0], unit="image")
            self.bar.update(event.step - self.bar.n)
            if event.step == event.total_steps:
                self.bar.close()
                self.bar = None
        elif event.kind == "start":
            print(event.message)
            self.bar = tqdm(total=event.total_steps, desc="training", unit="step")
        elif event.kind == "step":
            self.bar.n = event.step
            self.bar.set_postfix(epoch=event.epoch, loss=f"{event.avg_loss:.4f}", lr=f"{event.lr:.2e}")
        elif event.kind in ("save", "sample", "warning", "validation", "done"):
            detail = event.message or ", ".join(str(p) for p in event.paths) or (f"{event.loss:.5f}" if event.loss is not None else "")
            tqdm.write(f"[{event.kind}] {detail}")
            if event.kind == "done":
                self.bar.close()


def run_train(args) -> None:
    """Train in this process, or as one of N under `torchrun --nproc_per_node N` (data-parallel; process 0 reports)."""
    from ..hosts.standalone import StandaloneHost
    from ..demo.tiny import DEFAULT_CHECKPOINT
    from .distributed import device_for, from_environment
    from .dataset import plan_training
    from .saving import hash_in_background
    from .trainer import train

    distributed = from_environment()
    if args.resume:
        from .run_folder import RunFolder

        config = RunFolder.open(args.resume).config()
    else:
        config = config_from_args(args)
        if not config.train_data_dir:
            raise ConfigError("train_data_dir: give the dataset folder (--train_data_dir DIR or in --config)")
    plan_training(config)  # a dataset mistake is named before the checkpoint loads, not after (scans are cached)
    if distributed.is_main:
        hash_in_background(args.checkpoint or DEFAULT_CHECKPOINT)  # for the LoRA's metadata; overlaps the load
    host = StandaloneHost.from_file(args.checkpoint, out_dir=args.out_dir, device=device_for(distributed),
                                    parameterization="v" if config.v_parameterization else None, draws_images=config.draws_images)
    if config.output_dir:
        host.lora_dir = Path(config.output_dir)
    progress = ProgressBar() if distributed.is_main else None
    result = train(config, host, on_event=progress, run_dir=args.resume, resume=bool(args.resume), distributed=distributed)
    if distributed.is_main:
        print(f"{'interrupted, saved' if result.interrupted else 'saved'} {result.final_path} (run folder {result.run_dir})")


def add_train_command(commands) -> None:
    parser = commands.add_parser("train", help="train a LoRA/LoCon on a dataset folder")
    parser.add_argument("--config", type=Path, help="a TOML file of options (flags override it)")
    parser.add_argument("--checkpoint", type=Path, help="base SD1/SD2/SDXL checkpoint (default: the embedded tiny model)")
    parser.add_argument("--out-dir", type=Path, default=Path("out"), help="LoRAs go to OUT/lora, runs to OUT/runs")
    parser.add_argument("--resume", type=Path, help="continue the run in this run folder")
    add_config_flags(parser)
    parser.set_defaults(run=run_train)
