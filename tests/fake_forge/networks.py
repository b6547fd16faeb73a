"""Forge's Lora extension module `networks` (extensions-builtin/sd_forge_lora/networks.py) with its key mapping
(packages_3rdparty/comfyui_lora_collection/lora.py model_lora_keys_unet/_clip, load_lora), reduced to kohya LoRA.

As in Forge: files are read through `load_lora_state_dict`, cached by path (lru_cache); `load_networks`
does nothing while `current_lora_hash` is unchanged; a file with more than 12 keys that map to no
weight is skipped whole ("version mismatch"). `log` keeps the lines Forge prints.
"""

import functools
import os

from safetensors.torch import load_file

from lib_lora.networks.errors import NamingError
from lib_lora.networks.naming import unet_module_name
from lib_lora.networks.targets import num_res_blocks_of
from modules import shared

available_networks: dict = {}
loaded_networks: list = []
log: list[str] = []
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj"}
LORA_SUFFIXES = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale")


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    return load_file(filename)


def list_available_networks() -> None:
    available_networks.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir):
        for name in files:
            if name.endswith(".safetensors"):
                available_networks[name[: -len(".safetensors")]] = os.path.join(root, name)


def model_lora_keys_unet(kmodel) -> dict[str, str]:
    """compvis names of every `diffusion_model.*.weight`, plus the diffusers names (comfy's unet_to_diffusers;
    here lib_lora's naming, checked against kohya's table in test_networks_naming)."""
    key_map, res = {}, num_res_blocks_of(kmodel.diffusion_model)
    for key in kmodel.state_dict():
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            path = key[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_" + path.replace(".", "_")] = key
            try:
                key_map[unet_module_name(path, res)] = key
            except NamingError:
                pass
    return key_map


def model_lora_keys_clip(cond_stage_model) -> dict[str, str]:
    keys, key_map = cond_stage_model.state_dict().keys(), {}
    for b in range(32):
        for c, name in LORA_CLIP_MAP.items():
            for encoder, prefixes in (("clip_l", ("lora_te", "lora_te1")), ("clip_g", ("lora_te2",))):
                k = f"{encoder}.transformer.text_model.encoder.layers.{b}.{c}.weight"
                if k in keys:
                    key_map.update({f"{prefix}_text_model_encoder_layers_{b}_{name}": k for prefix in prefixes})
    return key_map


def load_lora(lora: dict, to_load: dict[str, str]) -> tuple[dict, dict]:
    """(model key -> delta weight at strength 1, the file's keys no mapping used)."""
    patches, unmatched = {}, dict(lora)
    for lora_name, model_key in to_load.items():
        if f"{lora_name}.lora_up.weight" not in lora:
            continue
        up, down = lora[f"{lora_name}.lora_up.weight"].float(), lora[f"{lora_name}.lora_down.weight"].float()
        alpha = float(lora[f"{lora_name}.alpha"]) / down.shape[0] if f"{lora_name}.alpha" in lora else 1.0
        patches[model_key] = alpha * (up.flatten(1) @ down.flatten(1))
        for suffix in LORA_SUFFIXES:
            unmatched.pop(f"{lora_name}.{suffix}", None)
    return patches, unmatched


def load_lora_for_models(unet, clip, lora, strength_model, strength_clip, filename):
    lora_unet, unmatched = load_lora(lora, model_lora_keys_unet(unet.model))
    lora_clip, unmatched = load_lora(unmatched, model_lora_keys_clip(clip.cond_stage_model))
    if len(unmatched) > 12:
        log.append(f"[LORA] LoRA version mismatch for KModel: {filename}")
        return unet, clip
    log.append(f"[LORA] Loaded {filename} with unmatched keys {sorted(unmatched)}")
    new_unet, new_clip = unet.clone(), clip.clone()
    if lora_unet:
        new_unet.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model)
    if lora_clip:
        new_clip.patcher.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip)
    return new_unet, new_clip


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    sd_model = shared.sd_model
    loaded_networks.clear()
    if any(name not in available_networks for name in names):
        list_available_networks()
    targets = [[available_networks[name], u, t, False] for name, u, t in zip(names, unet_multipliers, te_multipliers) if name in available_networks]
    if sd_model.current_lora_hash == str(targets):
        return
    sd_model.current_lora_hash = str(targets)
    objects = sd_model.forge_objects
    objects.unet, objects.clip = sd_model.forge_objects_original.unet, sd_model.forge_objects_original.clip
    for filename, strength_model, strength_clip, _ in targets:
        objects.unet, objects.clip = load_lora_for_models(objects.unet, objects.clip, load_lora_state_dict(filename),
                                                          strength_model, strength_clip, filename)
    sd_model.forge_objects_after_applying_lora = objects.shallow_copy()


