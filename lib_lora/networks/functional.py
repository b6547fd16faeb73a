"""Pure math of the adapter algorithms: scales, delta weights, conv reshapes, Kronecker and Tucker products.

No modules, configuration or I/O: tensors in, tensors out, each formula written once. Sources:
lora-format.md §2 and §7 (paraphrasing kohya `networks/lora.py`, LyCORIS `lycoris/functional/*.py`)
and the webui's `extensions-builtin/Lora/{network.py, network_lora.py, network_hada.py,
network_lokr.py, lyco_helpers.py}`, whose math the delta weights here must equal.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def lora_scale(alpha: float | None, rank: int | None) -> float:
    """alpha / rank; no alpha (or no rank) means scale 1, as the webui's `calc_scale` and ComfyUI read files."""
    if alpha is None or not rank:
        return 1.0
    return alpha / rank


def flat_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(out, in·kh·kw): the 2-D view every delta weight is built in before it takes the layer's shape."""
    out = shape[0]
    return out, int(torch.Size(shape[1:]).numel())


def rebuild_conventional(up: torch.Tensor, down: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """ΔW = up @ down, reshaped to the layer's weight shape (webui `lyco_helpers.rebuild_conventional`).

    Linear: up [out, r] @ down [r, in]. Conv kh×kw: up [out, r, 1, 1] flattened to [out, r],
    down [r, in, kh, kw] to [r, in·kh·kw]; the product reshaped to [out, in, kh, kw] equals composing
    the k×k down conv with the 1×1 up conv (lora-format.md §2).
    """
    up2 = up.reshape(up.shape[0], -1)  # [out, r]
    down2 = down.reshape(down.shape[0], -1)  # [r, in·kh·kw]
    return (up2 @ down2).reshape(out_shape)


def rebuild_lora_tucker(up: torch.Tensor, mid: torch.Tensor, down: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """LoCon with a Tucker core: ΔW[o, i] = Σ_{m,n} up[o, m]·mid[m, n]·down[n, i] (lora-format.md §2).

    up [out, r(, 1, 1)], mid [r, r, kh, kw], down [r, in(, 1, 1)] -> [out, in, kh, kw].
    """
    up2 = up.reshape(up.shape[0], -1)  # [out, r]
    down2 = down.reshape(down.shape[0], -1)  # [r, in]
    return torch.einsum("m n k l, o m, n i -> o i k l", mid, up2, down2).reshape(out_shape)


def rebuild_tucker_factor(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """F[p, q] = Σ_{i,j} core[i, j]·wa[i, p]·wb[j, q]: one LoHa/LoKr Tucker factor (lora-format.md §7.1).

    core [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw].
    """
    return torch.einsum("i j k l, i p, j q -> p q k l", core, wa, wb)


def lora_delta_weight(
    up: torch.Tensor,
    down: torch.Tensor,
    alpha: float | None,
    out_shape: Sequence[int],
    mid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(alpha / rank)·up @ down in the layer's shape; rank = down.shape[0] (webui `network_lora.py`)."""
    delta = rebuild_conventional(up, down, out_shape) if mid is None else rebuild_lora_tucker(up, mid, down, out_shape)
    return delta * lora_scale(alpha, down.shape[0])


def loha_delta_weight(
    w1: tuple[torch.Tensor, torch.Tensor],
    w2: tuple[torch.Tensor, torch.Tensor],
    alpha: float | None,
    out_shape: Sequence[int],
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)·alpha/r, r = w1_b.shape[0] (lora-format.md §7.1, webui `network_hada.py`).

    With Tucker cores t1/t2 each factor is `rebuild_tucker_factor(t, w_a, w_b)` instead.
    """
    f1 = rebuild_conventional(*w1, out_shape) if t1 is None else rebuild_tucker_factor(t1, *w1).reshape(out_shape)
    f2 = rebuild_conventional(*w2, out_shape) if t2 is None else rebuild_tucker_factor(t2, *w2).reshape(out_shape)
    return f1 * f2 * lora_scale(alpha, w1[1].shape[0])


def kron_product(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(W1, W2); for a conv W2 [b, d, kh, kw], W1 [a, c] acts as [a, c, 1, 1] (webui `make_kron`)."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]  # [a, c, 1, 1]
    return torch.kron(w1, w2.contiguous())


def lokr_delta_weight(
    w1: torch.Tensor, w2: torch.Tensor, alpha: float | None, rank: int | None, out_shape: Sequence[int]
) -> torch.Tensor:
    """LoKr: ΔW = kron(W1, W2)·scale, scale = alpha/r when a factor is low-rank, else 1 (lora-format.md §7.2).

    `rank` is None when both factors are full matrices (the webui then ignores alpha).
    """
    return kron_product(w1, w2).reshape(out_shape) * lora_scale(alpha, rank)


def apply_weight(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """x through a bias-free layer of `weight`: F.conv2d for 4-D weights (with the given geometry), else F.linear."""
    if weight.dim() == 4:
        return F.conv2d(x, weight, None, stride, padding, dilation)
    return F.linear(x, weight)


def rank_dropout_mask(batch: int, rank: int, p: float, ndim: int, device=None) -> torch.Tensor:
    """Keep-mask over (sample, rank channel), shaped to broadcast over `down(x)` of `ndim` dims (kohya `LoRAModule.forward`).

    ndim 2: [B, r]; ndim 3 (text tokens [B, T, r]): [B, 1, r]; ndim 4 (conv [B, r, H, W]): [B, r, 1, 1].
    """
    mask = torch.rand(batch, rank, device=device) > p  # [B, r]
    if ndim == 3:
        return mask[:, None, :]
    if ndim == 4:
        return mask[:, :, None, None]
    return mask
