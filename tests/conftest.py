import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Results must not depend on how many threads a CI box gives torch."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint_path(tmp_path_factory):
    """A random tiny SD1-layout checkpoint in fp32 (fast to load, independent of the shipped one)."""
    from lib_lora.demo.tiny import random_tiny_checkpoint
    from lib_lora.models.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(random_tiny_checkpoint(seed=1), path)
    return path
