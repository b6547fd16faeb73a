"""LoRA / LoCon networks: adapter modules, injection by kohya names, files, and applying files for generation.

Main entry points: `make_network` (training), `save_lora`/`load_lora`/`write_card`/`training_metadata`
(files), `LoraPatcher`, `extract_lora_tags` and `generate_with_loras` (generation, in `apply`).
"""

from .errors import LoraFormatError, LoraNotFoundError, NamingError, NetworkConfigError, PromptSyntaxError
from .files import LoraFile, load_lora, save_lora, write_card
from .metadata import training_metadata
from .network import LoraNetwork, make_network

__all__ = [
    "LoraFile", "LoraFormatError", "LoraNetwork", "LoraNotFoundError", "NamingError", "NetworkConfigError",
    "PromptSyntaxError", "load_lora", "make_network", "save_lora", "training_metadata", "write_card",
]
