"""The Stable Diffusion 1.x/2.x/XL denoiser with the ldm (and sgm, for SDXL) module names.

Every parameter name equals the one in the original CompVis `ldm` single-file checkpoints
(`model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`, ...), and the
class names are ldm's too (`ResBlock`, `SpatialTransformer`, `CrossAttention`, ...), so that the
network code injects into this tree exactly as it does into the webui's loaded model. SDXL is the
same network with three levels, a transformer depth per level (0, 2, 10) and `label_emb`, which adds
an embedding of the "vector" conditioning (pooled text + size/crop embeddings) to the timestep's.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a UNet; `from_state_dict` in checkpoint.py infers it from tensor shapes."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    context_dim: int = 768
    num_heads: int = 8  # SD1 uses 8 heads everywhere; SD2 uses 64-channel heads (head_dim)
    head_dim: int | None = None  # when set, heads = channels // head_dim
    transformer_depth: int | tuple[int, ...] = 1  # blocks per transformer; a tuple gives one per level (SDXL)
    use_linear_in_transformer: bool = False  # SD1: 1x1 conv proj_in/out; SD2/SDXL: Linear
    adm_in_channels: int = 0  # width of the "vector" conditioning `y` (SDXL 2816); 0: no label_emb

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) for a transformer of `channels` width."""
        if self.head_dim:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads

    def depth_at(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at a level; the middle block uses the last level's."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[level]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N] -> [N, dim], cos half first (ldm `timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the weights' dtype, as ldm does for fp16 stability."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)


def normalization(channels: int) -> nn.GroupNorm:
    return GroupNorm32(32, channels)


class ResBlock(nn.Module):
    """Two 3x3 convs with a timestep-embedding bias in between, and a residual (1x1 when widths differ)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention; keys/values from `context` (cross) or from `x` itself (self)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # [B, T, inner]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, T, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, then a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features -> tokens -> transformer blocks -> image features, with a residual."""

    def __init__(self, channels: int, config: UNetConfig, depth: int):
        super().__init__()
        heads, dim_head = config.heads_for(channels)
        inner = heads * dim_head
        self.use_linear = config.use_linear_in_transformer
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if self.use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, config.context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if self.use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if not self.use_linear:
            hidden = self.proj_in(hidden)
        hidden = hidden.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.use_linear:
            hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        if self.use_linear:
            hidden = self.proj_out(hidden)
        hidden = hidden.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            hidden = self.proj_out(hidden)
        return x + hidden


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A UNet block: hands the timestep embedding to ResBlocks and the text to transformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ldm `UNetModel` for SD1/SD2: 4-channel latents, timesteps and text context -> eps (or v)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        mc, emb_dim = config.model_channels, config.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.adm_in_channels:  # sgm's num_classes="sequential": one MLP in a Sequential
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc
        last_level = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if config.attention_levels[level]:
                    layers.append(SpatialTransformer(ch, config, config.depth_at(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last_level:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch), SpatialTransformer(ch, config, config.depth_at(last_level)), ResBlock(ch, emb_dim, ch)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc)]
                ch = mult * mc
                if config.attention_levels[level]:
                    layers.append(SpatialTransformer(ch, config, config.depth_at(level)))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1))

    @property
    def downsampling_factor(self) -> int:
        """Latent sizes must be a multiple of this (one halving per level but the last)."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def _run(self, block, h, emb, context):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x, timesteps, context, y=None):
        """x [B, C, h, w], timesteps [B] (may be fractional), context [B, T, context_dim], y [B, adm] (SDXL)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if self.config.adm_in_channels:
            if y is None:
                raise ValueError("this UNet (SDXL) needs the vector conditioning y (pooled text + size embeddings)")
            emb = emb + self.label_emb(y.to(emb.dtype))
        skips, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
