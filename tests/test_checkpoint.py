"""Loading checkpoints: real-scale SD1.5 layout, the tiny default, and every way a file can be wrong."""

import pytest
import torch
from safetensors.torch import save_file

from lib_lora.demo.tiny import DEFAULT_CHECKPOINT, TINY_UNET
from lib_lora.models.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from lib_lora.models.architectures import SD15_UNET, write_random_checkpoint


def test_full_size_random_sd15_loads_with_sd15_architecture(tmp_path):
    path = write_random_checkpoint(tmp_path / "sd15.safetensors", "sd1", torch.float16)
    ckpt = load_checkpoint(path, dtype=torch.float16)
    assert ckpt.unet.config == SD15_UNET
    counts = [sum(p.numel() for p in m.parameters()) for m in (ckpt.unet, ckpt.text_encoder, ckpt.vae)]
    assert counts == [859_520_964, 123_060_480, 83_653_863]
    assert ckpt.text_encoder.config.layers == 12 and ckpt.text_encoder.config.heads == 12
    assert ckpt.vae.config.downsampling_factor == 8


def test_shipped_default_loads_and_keeps_its_architecture():
    ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
    assert ckpt.unet.config == TINY_UNET
    assert not any(p.requires_grad for p in ckpt.unet.parameters())


def test_ckpt_and_safetensors_load_the_same_weights(tiny_checkpoint_path, tmp_path):
    state, _ = read_state_dict(tiny_checkpoint_path)
    ckpt_path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state}, ckpt_path)
    a, b = load_checkpoint(tiny_checkpoint_path), load_checkpoint(ckpt_path)
    # the .ckpt lacks the safetensors metadata, so head counts fall back to SD1's; weights must agree
    for (ka, va), (kb, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_truncated_file_is_a_clear_error(tiny_checkpoint_path, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(tiny_checkpoint_path.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*(truncated|corrupted)"):
        load_checkpoint(bad)


def test_garbage_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="garbage.ckpt"):
        load_checkpoint(bad)


class NotATensor:
    """Stands for any object a malicious .ckpt could make torch unpickle."""


def test_pickled_objects_are_refused(tmp_path):
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": NotATensor()}}, bad)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_checkpoint(bad)


def test_foreign_file_names_what_is_missing(tmp_path):
    foreign = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(foreign))
    with pytest.raises(CheckpointError, match=r"no UNet weights"):
        load_checkpoint(foreign)


def test_sdxl_refiner_is_named_as_unsupported(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.model.x": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match=r"xl\.safetensors: an SDXL refiner"):
        load_checkpoint(path)


def _rewrite(src, dst, change):
    state, meta = read_state_dict(src)
    change(state)
    save_file(state, str(dst), metadata=meta)
    return dst


def test_missing_and_unknown_keys_are_listed(tiny_checkpoint_path, tmp_path):
    def change(state):
        del state["model.diffusion_model.out.2.bias"]
        state["model.diffusion_model.extra.weight"] = torch.zeros(1)

    path = _rewrite(tiny_checkpoint_path, tmp_path / "edited.safetensors", change)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "missing: model.diffusion_model.out.2.bias" in str(err.value)
    assert "unknown: model.diffusion_model.extra.weight" in str(err.value)


def test_wrong_shape_is_named(tiny_checkpoint_path, tmp_path):
    key = "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"

    def change(state):
        state[key] = state[key][:, :-1].clone()

    path = _rewrite(tiny_checkpoint_path, tmp_path / "shape.safetensors", change)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_checkpoint(path)


def test_stray_top_level_key_is_named(tiny_checkpoint_path, tmp_path):
    path = _rewrite(tiny_checkpoint_path, tmp_path / "stray.safetensors", lambda s: s.update({"optimizer.state": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="optimizer.state"):
        load_checkpoint(path)


def test_extra_keys_real_sd1_files_carry_are_accepted(tiny_checkpoint_path, tmp_path):
    def change(state):
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["alphas_cumprod"] = torch.ones(1000)

    load_checkpoint(_rewrite(tiny_checkpoint_path, tmp_path / "extras.safetensors", change))


def test_a_header_that_lies_about_offsets_is_named(tiny_checkpoint_path, tmp_path):
    """A safetensors header whose offsets run past the file (a bad download, a hand-edited file) is refused by key."""
    import json
    import struct

    blob = tiny_checkpoint_path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__")
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, end + 4]
    new = json.dumps(header).encode()
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(new)) + new + blob[8 + length :])
    with pytest.raises(CheckpointError, match=rf"lying\.safetensors: header entry '{key}' claims bytes"):
        load_checkpoint(lying)


def test_vae_norm_groups_travel_in_the_metadata_and_change_what_it_decodes(tmp_path):
    """GroupNorm's groups are not in the state dict: a file saved with 8 must load with 8, or it decodes other pictures."""
    from dataclasses import replace

    from lib_lora.demo.tiny import random_tiny_checkpoint
    from lib_lora.models.checkpoint import save_checkpoint
    from lib_lora.models.vae import AutoencoderKL

    ckpt = random_tiny_checkpoint(seed=1)
    grouped = AutoencoderKL(replace(ckpt.vae.config, norm_groups=8), ckpt.vae.scale_factor)
    grouped.load_state_dict(ckpt.vae.state_dict())
    ckpt.vae = grouped.eval()
    save_checkpoint(ckpt, tmp_path / "g8.safetensors")
    loaded = load_checkpoint(tmp_path / "g8.safetensors")
    assert loaded.vae.config.norm_groups == 8
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.vae.decode(latents), grouped.decode(latents), atol=1e-6)
        as_32 = AutoencoderKL(replace(grouped.config, norm_groups=32), grouped.scale_factor).eval()
        as_32.load_state_dict(grouped.state_dict())
        assert not torch.allclose(as_32.decode(latents), grouped.decode(latents), atol=1e-3)


def test_an_fp16_file_loads_as_fp32_with_its_own_values_in_every_tensor(tiny_checkpoint_path, tmp_path):
    # the loader converts through one reused staging buffer: each weight must still be its own copy
    state, meta = read_state_dict(tiny_checkpoint_path)
    half = tmp_path / "half.safetensors"
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(half), metadata=meta)
    ckpt = load_checkpoint(half, dtype=torch.float32)
    weights = {f"model.diffusion_model.{k}": v for k, v in ckpt.unet.state_dict().items()}
    assert weights and all(v.dtype == torch.float32 for v in weights.values())
    for key, value in weights.items():
        assert torch.equal(value, state[key].half().float()), key
    pointers = [v.data_ptr() for v in weights.values()]
    assert len(set(pointers)) == len(pointers)


def test_a_vae_without_its_decoder_encodes_the_same_and_says_why_it_cannot_decode(tiny_checkpoint_path):
    full, lean = load_checkpoint(tiny_checkpoint_path), load_checkpoint(tiny_checkpoint_path, vae_decoder=False)
    assert lean.vae.decoder is None and sum(p.numel() for p in lean.vae.parameters()) < sum(p.numel() for p in full.vae.parameters())
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(lean.vae.encode(pixels), full.vae.encode(pixels))
    with pytest.raises(RuntimeError, match="without its decoder"):
        lean.vae.decode(torch.zeros(1, 4, 8, 8))
