"""Train LoRA: train and apply LoRA / LoCon adapters for Stable Diffusion 1.x."""
