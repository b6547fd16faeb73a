"""Named starting points: TrainConfig overrides, saved and loaded as TOML like any run config."""

from pathlib import Path

from .config import TrainConfig

# Tuned with bench/quality.py on the embedded tiny model (64 px, CPU): see the README for figures.
DEMO = dict(
    resolution=(64, 64),
    network_type="locon",
    network_dim=8,
    network_alpha=8.0,
    conv_dim=8,
    conv_alpha=8.0,
    train_batch_size=8,
    max_train_epochs=10,
    learning_rate=1e-3,
    text_encoder_lr=5e-4,
    lr_scheduler="cosine",
    lr_warmup_steps=0.05,
    min_snr_gamma=5.0,
    prior_loss_weight=1.0,
    save_precision="fp16",
)


def demo_config(data_dir: Path, reg_dir: Path | None, output_name: str, trigger: str) -> TrainConfig:
    """The demo preset on a dataset folder (and optional regularization folder)."""
    return TrainConfig(train_data_dir=str(data_dir), reg_data_dir=str(reg_dir or ""), output_name=output_name, trigger_words=trigger, **DEMO)
