"""SD2 and SDXL models: recognised from their tensors, OpenCLIP as open_clip computes it, SDXL's conditioning."""

from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lib_lora.demo.tiny import TINY_SDXL_TEXT_2, random_tiny_checkpoint
from lib_lora.models.architectures import FULL_SIZE, SD2_TEXT, SD2_UNET, SDXL_TEXT_2, SDXL_UNET
from lib_lora.models.checkpoint import (CheckpointError, infer_open_clip_config, infer_unet_config, load_checkpoint,
                                        read_state_dict, save_checkpoint)
from lib_lora.models.conditioning import encode_chunks, pad_after_end, sdxl_vector, size_embedding
from lib_lora.models.open_clip_text import OpenClipTextEncoder
from lib_lora.models.pipeline import GenerationParams, encode_prompts, generate, negative_conditioning
from lib_lora.models.tokenizer import BOS, EOS, tokenize_batch
from lib_lora.models.unet import UNetModel, timestep_embedding


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_full_size_unet_architecture_is_read_back_from_its_tensors(arch):
    """Depth per level (SDXL 0/2/10), linear proj_in, 64-channel heads and label_emb come from shapes alone."""
    unet_config, _ = FULL_SIZE[arch]
    with torch.device("meta"):
        state = UNetModel(unet_config).state_dict()
    assert infer_unet_config(state, {}) == unet_config


@pytest.mark.parametrize("config", [SD2_TEXT, SDXL_TEXT_2], ids=["ViT-H", "ViT-bigG"])
def test_full_size_open_clip_architecture_is_read_back_from_its_tensors(config):
    with torch.device("meta"):
        state = OpenClipTextEncoder(config).state_dict()
    assert infer_open_clip_config(state, {}, "heads") == config


def test_sdxl_unet_parameter_count_is_sdxl_bases():
    with torch.device("meta"):
        unet = UNetModel(SDXL_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL 1.0 base's UNet


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_tiny_checkpoint_round_trips_and_is_recognised(arch, tmp_path):
    ckpt = random_tiny_checkpoint(3, arch)
    path = tmp_path / f"{arch}.safetensors"
    save_checkpoint(ckpt, path)
    loaded = load_checkpoint(path)
    assert loaded.arch == arch and loaded.parameterization == ckpt.parameterization
    assert loaded.unet.config == ckpt.unet.config
    keys = set(read_state_dict(path)[0])
    if arch == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
        assert "model.diffusion_model.label_emb.0.0.weight" in keys
    else:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    for a, b in zip(ckpt.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_v_pred_marker_key_and_flag_choose_v_prediction(tmp_path):
    ckpt = random_tiny_checkpoint(0, "sdxl")
    path = tmp_path / "vpred.safetensors"
    save_checkpoint(ckpt, path)
    state, meta = read_state_dict(path)
    del meta["lib_lora.parameterization"]
    save_file(state | {"v_pred": torch.tensor([])}, str(path), metadata=meta)  # NoobAI-v style marker
    assert load_checkpoint(path).parameterization == "v"
    save_file(state, str(path), metadata=meta)
    assert load_checkpoint(path).parameterization == "eps"
    assert load_checkpoint(path, parameterization="v").parameterization == "v"


def test_inpainting_unet_is_refused_by_name(tmp_path):
    ckpt = random_tiny_checkpoint(0, "sd1")
    path = tmp_path / "inpaint.safetensors"
    save_checkpoint(ckpt, path)
    state, meta = read_state_dict(path)
    weight = state["model.diffusion_model.input_blocks.0.0.weight"]
    state["model.diffusion_model.input_blocks.0.0.weight"] = weight.repeat(1, 9, 1, 1)[:, :9].contiguous()
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"inpaint\.safetensors: its UNet takes 9 input channels"):
        load_checkpoint(path)


class ReferenceBlock(nn.Module):
    """open_clip's ResidualAttentionBlock as open_clip writes it: torch's MultiheadAttention and a named Sequential."""

    def __init__(self, width, heads, mlp):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp), gelu=nn.GELU(), c_proj=nn.Linear(mlp, width)))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


def test_open_clip_encoder_equals_torch_multihead_attention_reference():
    """Same state dict, same numbers: the fused in_proj read through q/k/v slices is nn.MultiheadAttention's math."""
    torch.manual_seed(0)
    encoder = OpenClipTextEncoder(TINY_SDXL_TEXT_2).eval()
    for p in encoder.parameters():
        nn.init.normal_(p, std=0.2)
    c = TINY_SDXL_TEXT_2
    blocks = nn.ModuleList(ReferenceBlock(c.width, c.heads, c.mlp_width) for _ in range(c.layers))
    blocks.load_state_dict({k.removeprefix("model.transformer.resblocks."): v for k, v in encoder.state_dict().items()
                            if k.startswith("model.transformer.resblocks.")})
    tokens = torch.tensor([[BOS, 320, 1125, 2368, EOS, 0, 0] + [0] * 70])
    mask = torch.full((77, 77), float("-inf")).triu(1)
    m = encoder.model
    x = m.token_embedding(tokens) + m.positional_embedding
    for block in blocks[:-1]:
        x = block(x, mask)
    penultimate = x
    last = m.ln_final(blocks[-1](x, mask))
    hidden, pooled = encoder(tokens, final_norm=False, pooled=True)
    assert torch.allclose(hidden, penultimate, atol=1e-5)
    assert torch.allclose(pooled, last[:, 4] @ m.text_projection, atol=1e-5)  # the end-of-text token (highest id)
    normed, none = encoder(tokens, final_norm=True)
    assert none is None and torch.allclose(normed, m.ln_final(penultimate), atol=1e-5)


def test_open_clip_encoders_see_zeros_after_the_end_token_as_the_webui_pads():
    tokens = tokenize_batch(["a red circle"]).tokens  # SD1 padding: end-of-text to the end
    padded = pad_after_end(tokens)
    end = tokens[0, 0].tolist().index(EOS)
    assert padded[0, 0, : end + 1].tolist() == tokens[0, 0, : end + 1].tolist()
    assert padded[0, 0, end + 1 :].eq(0).all()


def test_sdxl_context_joins_both_encoders_bare_and_pools_the_second():
    ckpt = random_tiny_checkpoint(1, "sdxl")
    chunks = tokenize_batch(["a red circle"])
    cond = encode_chunks(ckpt, chunks.tokens, chunks.weights)
    clip_l = ckpt.text_encoder(chunks.tokens, clip_skip=2, final_norm=False)  # hidden_states[11] of 12: no final norm
    big_g, pooled = ckpt.text_encoder_2(pad_after_end(chunks.tokens)[:, 0], final_norm=False, pooled=True)
    assert cond.context.shape == (1, 77, ckpt.unet.config.context_dim)
    assert torch.equal(cond.context, torch.cat([clip_l, big_g], dim=-1))
    assert torch.equal(cond.pooled, pooled)


def test_sd2_context_is_the_penultimate_layer_through_the_final_norm_whatever_the_clip_skip():
    ckpt = random_tiny_checkpoint(1, "sd2")
    chunks = tokenize_batch(["a red circle"])
    hidden, _ = ckpt.text_encoder(pad_after_end(chunks.tokens)[:, 0], final_norm=True)
    for clip_skip in (1, 2):
        assert torch.equal(encode_chunks(ckpt, chunks.tokens, chunks.weights, clip_skip).context, hidden)


def test_sdxl_vector_is_pooled_text_then_size_crop_and_target_embeddings():
    pooled = torch.randn(2, 48)
    original, crop, target = torch.tensor([[1024.0, 768], [512, 512]]), torch.tensor([[0.0, 32], [0, 0]]), torch.tensor([[1024.0, 704], [512, 512]])
    y = sdxl_vector(pooled, original, crop, target)
    assert y.shape == (2, 48 + 6 * 256)
    assert torch.equal(y[:, :48], pooled)
    # each number embedded on its own, in order: original h, w, crop top, left, target h, w (sgm ConcatTimestepEmbedderND)
    assert torch.equal(y[0, 48 + 256 : 48 + 512], timestep_embedding(torch.tensor([768.0]), 256)[0])
    assert torch.equal(y[0, 48 + 3 * 256 : 48 + 4 * 256], timestep_embedding(torch.tensor([32.0]), 256)[0])
    assert torch.equal(size_embedding(target)[1], y[1, 48 + 4 * 256 :])


def test_sdxl_empty_negative_prompt_is_all_zeros_as_the_webui_sends_it():
    ckpt = random_tiny_checkpoint(1, "sdxl")
    zero = negative_conditioning(ckpt, [""])
    assert not zero.context.any() and not zero.pooled.any()
    assert negative_conditioning(ckpt, ["blurry"]).context.abs().sum() > 0


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_generation_is_deterministic_and_follows_the_prompt(arch):
    ckpt = random_tiny_checkpoint(2, arch)
    params = GenerationParams("a red circle", width=64, height=64, steps=3, seed=5)
    first, again = generate(ckpt, params)[0], generate(ckpt, params)[0]
    other = generate(ckpt, GenerationParams("a blue star", width=64, height=64, steps=3, seed=5))[0]
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    assert encode_prompts(ckpt, ["x"]).pooled is None if arch == "sd2" else encode_prompts(ckpt, ["x"]).pooled.shape == (1, 48)


def test_an_sd2_file_that_does_not_say_is_tested_as_the_webui_does(tmp_path, monkeypatch):
    """No metadata: the webui runs the UNet at t=999 on a flat input; a mean output far below it means v."""
    from lib_lora.models import checkpoint

    ckpt = random_tiny_checkpoint(0, "sd2")
    path = tmp_path / "sd2.safetensors"
    save_checkpoint(ckpt, path)
    state, meta = read_state_dict(path)
    save_file(state, str(path), metadata={k: v for k, v in meta.items() if k != "lib_lora.parameterization"})
    seen = []
    for output_shift, expected in ((-5.0, "v"), (0.0, "eps")):
        monkeypatch.setattr(UNetModel, "forward", lambda self, x, t, context, y=None, s=output_shift: seen.append(int(t)) or x + s)
        assert load_checkpoint(path).parameterization == expected
    assert seen == [999, 999]
    monkeypatch.undo()
    sd1 = tmp_path / "sd1.safetensors"
    save_checkpoint(random_tiny_checkpoint(0, "sd1"), sd1, extra_metadata={})
    state, meta = read_state_dict(sd1)
    save_file(state, str(sd1), metadata={k: v for k, v in meta.items() if k != "lib_lora.parameterization"})
    assert load_checkpoint(sd1).parameterization == "eps"
