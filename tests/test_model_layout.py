"""The built models carry exactly the parameter names and sizes of SD1.5's ldm checkpoints."""

import pytest
import torch

from lib_lora.models.checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from lib_lora.models.clip_text import TextEncoder
from lib_lora.models.architectures import SD15_TEXT, SD15_UNET, SD15_VAE
from lib_lora.models.unet import UNetModel
from lib_lora.models.vae import AutoencoderKL

# (key as in v1-5-pruned.safetensors, shape there)
SD15_SAMPLE_KEYS = [
    ("model.diffusion_model.time_embed.0.weight", (1280, 320)),
    ("model.diffusion_model.time_embed.2.bias", (1280,)),
    ("model.diffusion_model.input_blocks.0.0.weight", (320, 4, 3, 3)),
    ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", (320,)),
    ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3)),
    ("model.diffusion_model.input_blocks.1.0.emb_layers.1.weight", (320, 1280)),
    ("model.diffusion_model.input_blocks.1.0.out_layers.3.weight", (320, 320, 3, 3)),
    ("model.diffusion_model.input_blocks.1.1.norm.weight", (320,)),
    ("model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (320, 320)),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias", (320,)),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", (2560, 320)),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight", (320, 1280)),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm3.bias", (320,)),
    ("model.diffusion_model.input_blocks.1.1.proj_out.weight", (320, 320, 1, 1)),
    ("model.diffusion_model.input_blocks.3.0.op.weight", (320, 320, 3, 3)),
    ("model.diffusion_model.input_blocks.4.0.skip_connection.weight", (640, 320, 1, 1)),
    ("model.diffusion_model.input_blocks.11.0.out_layers.3.weight", (1280, 1280, 3, 3)),
    ("model.diffusion_model.middle_block.0.in_layers.2.weight", (1280, 1280, 3, 3)),
    ("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight", (1280, 768)),
    ("model.diffusion_model.middle_block.2.emb_layers.1.bias", (1280,)),
    ("model.diffusion_model.output_blocks.0.0.skip_connection.weight", (1280, 2560, 1, 1)),
    ("model.diffusion_model.output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
    ("model.diffusion_model.output_blocks.5.2.conv.weight", (1280, 1280, 3, 3)),
    ("model.diffusion_model.output_blocks.8.2.conv.bias", (640,)),
    ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_v.weight", (320, 320)),
    ("model.diffusion_model.output_blocks.11.1.proj_out.bias", (320,)),
    ("model.diffusion_model.out.0.weight", (320,)),
    ("model.diffusion_model.out.2.weight", (4, 320, 3, 3)),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (49408, 768)),
    ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", (77, 768)),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", (768, 768)),
    ("cond_stage_model.transformer.text_model.encoder.layers.5.self_attn.out_proj.bias", (768,)),
    ("cond_stage_model.transformer.text_model.encoder.layers.11.layer_norm1.weight", (768,)),
    ("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight", (3072, 768)),
    ("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight", (768, 3072)),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", (768,)),
    ("first_stage_model.encoder.conv_in.weight", (128, 3, 3, 3)),
    ("first_stage_model.encoder.down.0.downsample.conv.weight", (128, 128, 3, 3)),
    ("first_stage_model.encoder.down.1.block.0.nin_shortcut.weight", (256, 128, 1, 1)),
    ("first_stage_model.encoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
    ("first_stage_model.encoder.conv_out.weight", (8, 512, 3, 3)),
    ("first_stage_model.quant_conv.weight", (8, 8, 1, 1)),
    ("first_stage_model.post_quant_conv.weight", (4, 4, 1, 1)),
    ("first_stage_model.decoder.up.0.block.0.nin_shortcut.weight", (128, 256, 1, 1)),
    ("first_stage_model.decoder.up.3.block.2.conv2.weight", (512, 512, 3, 3)),
    ("first_stage_model.decoder.up.3.upsample.conv.weight", (512, 512, 3, 3)),
    ("first_stage_model.decoder.mid.attn_1.proj_out.weight", (512, 512, 1, 1)),
    ("first_stage_model.decoder.norm_out.bias", (128,)),
]


@pytest.fixture(scope="module")
def sd15_shapes():
    with torch.device("meta"):
        parts = ((UNET_PREFIX, UNetModel(SD15_UNET)), (VAE_PREFIX, AutoencoderKL(SD15_VAE)), (TEXT_PREFIX, TextEncoder(SD15_TEXT)))
    return {prefix + k: tuple(v.shape) for prefix, model in parts for k, v in model.state_dict().items()}


@pytest.mark.parametrize("key,shape", SD15_SAMPLE_KEYS, ids=[k for k, _ in SD15_SAMPLE_KEYS])
def test_sd15_key_exists_with_shape(sd15_shapes, key, shape):
    assert sd15_shapes.get(key) == shape


def test_sd15_parameter_counts_match_the_release():
    with torch.device("meta"):
        counts = [sum(p.numel() for p in m.parameters()) for m in (UNetModel(SD15_UNET), TextEncoder(SD15_TEXT), AutoencoderKL(SD15_VAE))]
    assert counts == [859_520_964, 123_060_480, 83_653_863]


def test_sd15_key_count(sd15_shapes):
    """SD1.5 files hold 686 UNet, 196 text-encoder (plus position_ids) and 248 VAE tensors."""
    unet = [k for k in sd15_shapes if k.startswith(UNET_PREFIX)]
    text = [k for k in sd15_shapes if k.startswith(TEXT_PREFIX)]
    vae = [k for k in sd15_shapes if k.startswith(VAE_PREFIX)]
    assert (len(unet), len(text), len(vae)) == (686, 196, 248)
