"""modules/processing.py of Forge, reduced to what a sample does to the model (process_images_inner).

Inside inference mode: reload the model if needed, start from the original objects, let the Lora
extension patch clones for the prompt's `<lora:name:w>` tags, load them (merging the LoRA), then
one UNet evaluation on seeded noise decoded to an image. Records the prompt, whether training
hooks were live on the UNet and which LoRA files were patched in.
"""

import re
import sys
from types import SimpleNamespace

import torch
from PIL import Image

from fake_webui.modules.processing import StableDiffusionProcessingTxt2Img  # noqa: F401  (Forge's takes the same fields)
from modules import calls, sd_models

records: list[dict] = []
_LORA_TAG = re.compile(r"<lora:([^:>]+):([^>]+)>")


def process_images(p):
    from backend import memory_management

    calls.append("process_images")
    with torch.inference_mode():
        m, _ = sd_models.forge_model_reload()
        m.forge_objects = m.forge_objects_original.shallow_copy()
        tags = _LORA_TAG.findall(p.prompt)
        weights = [float(w) for _, w in tags]
        sys.modules["networks"].load_networks([name for name, _ in tags], te_multipliers=weights, unet_multipliers=weights)
        m.forge_objects = m.forge_objects_after_applying_lora.shallow_copy()
        objects = m.forge_objects
        memory_management.load_models_gpu([objects.unet, objects.clip.patcher])
        unet = objects.unet.model.diffusion_model
        records.append({"prompt": p.prompt, "hooks_live": any(module._forward_hooks for module in unet.modules()),
                        "loras": [key[0] for key in objects.unet.lora_patches]})
        image = _one_step(m, _LORA_TAG.sub("", p.prompt), p)
    return SimpleNamespace(images=[image] * p.batch_size, index_of_first_image=0)


def _one_step(m, prompt: str, p) -> Image.Image:
    cond = m.get_learned_conditioning([prompt])
    context, y = (cond["crossattn"], cond["vector"]) if isinstance(cond, dict) else (cond, None)
    unet = m.forge_objects.unet.model.diffusion_model
    factor = m.forge_objects.vae.first_stage_model.vae.config.downsampling_factor
    shape = (1, unet.config.in_channels, p.height // factor, p.width // factor)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(max(p.seed, 0)))
    eps = unet(noise, torch.tensor([500.0]), context) if y is None else unet(noise, torch.tensor([500.0]), context, y)
    pixels = m.decode_first_stage(noise - eps)[0].clamp(-1, 1)
    return Image.fromarray(((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())
