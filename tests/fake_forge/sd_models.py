"""modules/sd_models.py of Forge: the model loads on the first generation (`forge_model_reload`), under inference mode."""

import torch

from modules import calls, shared

arch = "sd1"  # which tiny model the selected "checkpoint" is; set by the fixture
loads = 0


@torch.inference_mode()
def forge_model_reload():
    """Load the selected checkpoint unless it is loaded; (sd_model, whether it was loaded now)."""
    global loads
    if shared.sd_model is not None:
        return shared.sd_model, False
    from fake_forge.fake_model import StableDiffusion

    calls.append("forge_model_reload")
    loads += 1
    shared.sd_model = StableDiffusion(arch)
    return shared.sd_model, True
