"""Pure math of the adapter algorithms: scales, delta weights, conv reshapes, Kronecker and Tucker products, DoRA.

No modules, configuration or I/O: tensors in, tensors out, each formula written once. Sources:
lora-format.md §2 and §7 (paraphrasing kohya `networks/lora.py`, LyCORIS `lycoris/functional/*.py`)
and the webui's `extensions-builtin/Lora/{network.py, network_lora.py, network_hada.py,
network_lokr.py, lyco_helpers.py}`, whose math the delta weights here must equal.
"""

import functools
from collections.abc import Sequence
from math import isqrt

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
    if t1 is None and t2 is None:
        return hadamard_product(*w1, *w2).reshape(out_shape) * lora_scale(alpha, w1[1].shape[0])
    f1 = rebuild_conventional(*w1, out_shape) if t1 is None else rebuild_tucker_factor(t1, *w1).reshape(out_shape)
    f2 = rebuild_conventional(*w2, out_shape) if t2 is None else rebuild_tucker_factor(t2, *w2).reshape(out_shape)
    return f1 * f2 * lora_scale(alpha, w1[1].shape[0])


class _HadamardProduct(torch.autograd.Function):
    """(a1 @ b1) ⊙ (a2 @ b2) that keeps only the four factors for backward, not the two [out, in] products.

    LyCORIS `functional/loha.py` (HadaWeight) does the same: the products are rebuilt in backward,
    which costs two small matmuls and saves two weight-sized tensors per LoHa layer while training.
    """

    @staticmethod
    def forward(ctx, a1, b1, a2, b2):
        ctx.save_for_backward(a1, b1, a2, b2)
        return (a1 @ b1) * (a2 @ b2)

    @staticmethod
    def backward(ctx, grad):
        a1, b1, a2, b2 = ctx.saved_tensors
        g1 = grad * (a2 @ b2)  # d/d(a1 @ b1)
        g2 = grad * (a1 @ b1)  # d/d(a2 @ b2)
        return g1 @ b1.T, a1.T @ g1, g2 @ b2.T, a2.T @ g2


def hadamard_product(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """(a1 @ b1) ⊙ (a2 @ b2) as [out, in·kh·kw]: a [out, r], b [r, in(, kh, kw)] flattened (LoHa without Tucker)."""
    flat = [t.reshape(t.shape[0], -1) for t in (a1, b1, a2, b2)]
    return _HadamardProduct.apply(*flat)


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


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension, m <= n: LoKr's split of a layer dimension (LyCORIS `functional/general.py`).

    A positive `factor` that divides the dimension is used as it is (128, 8 -> (8, 16)); otherwise m is
    the largest divisor up to sqrt(dimension) and up to `factor` (-1: no bound, the most balanced split:
    320 -> (16, 20), 1280 -> (32, 40), 127 -> (1, 127)).
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return min(m, n), max(m, n)
    limit = dimension if factor < 0 else factor
    m = max((d for d in range(1, isqrt(dimension) + 1) if dimension % d == 0 and d <= limit), default=1)
    return m, dimension // m


def kron_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """x through kron(W1, W2) without building it (LyCORIS's LoKr bypass forward); W1 [a, c], W2 [b, d(, kh, kw)].

    Linear: with x's features viewed as X [c, d], kron(W1, W2)·x is W1 · X · W2ᵀ, [a, b] flattened.
    Conv: each of the c groups of d input channels goes through the conv W2 ([B·c, d, H, W] -> [B·c, b, H', W']),
    then W1 mixes the groups: output channel i·b + j = Σ_k W1[i, k]·conv(x_k, W2)[j].
    """
    a, c = w1.shape
    if w2.dim() == 2:  # [b, d]
        h = x.unflatten(-1, (c, -1)) @ w2.T  # [..., c, b]
        return torch.matmul(w1, h).flatten(-2)  # [..., a, b] -> [..., a·b]
    batch = x.shape[0]
    h = F.conv2d(x.reshape(batch * c, -1, *x.shape[2:]), w2, None, stride, padding, dilation)  # [B·c, b, H', W']
    h = h.view(batch, c, *h.shape[1:])  # [B, c, b, H', W']
    return torch.einsum("ik,nkjhw->nijhw", w1, h).flatten(1, 2)  # [B, a·b, H', W']


def dora_norm(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """‖W‖ per output row, shaped [out, 1(, 1, 1)], or per input column, [1, in(, 1, 1)] (lora-format.md §7.4).

    Input-axis is what the webui 1.10.1 computes (`network.py` apply_weight_decompose: the norm over
    out, kh, kw for each input channel); output-axis is LyCORIS >= 3.2's default and the DoRA paper's.
    """
    ones = [1] * (weight.dim() - 1)
    if on_output:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *ones)
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(weight.shape[1], *ones).transpose(0, 1)


def dora_on_output(magnitude: torch.Tensor, weight_shape: Sequence[int]) -> bool:
    """The orientation a `dora_scale` of this shape has on a weight of `weight_shape` (lora-format.md §7.4 reader rule).

    [out, 1, ...] is output-axis, [1, in, ...] input-axis (ComfyUI's test: the first dim equals out).
    """
    return magnitude.shape[0] == weight_shape[0] and magnitude.shape[1] == 1


def dora_weight(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W_d = m ⊙ V / (‖V‖ + ε), V = W0 + scale·ΔW (Liu et al. 2024; LyCORIS `apply_weight_decompose`).

    `magnitude` is the file's `dora_scale`; its shape gives the axis of the norm (`dora_on_output`). It
    is reshaped to V's number of dims, so a 4-D [1, in, 1, 1] serves a Linear and 2-D a 1×1 conv. ε is
    float32's, as LyCORIS adds it in training. The norm is not detached: LyCORIS trains through it
    (the paper detaches it to save memory).
    """
    v = w0 + delta
    on_output = dora_on_output(magnitude, v.shape)
    m = magnitude.reshape(*magnitude.shape[:2], *[1] * (v.dim() - 2))  # [out, 1(, 1, 1)] or [1, in(, 1, 1)]
    return v * (m / (dora_norm(v, on_output) + torch.finfo(torch.float32).eps))


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


class _LowRankAddLinear(torch.autograd.Function):
    """output + scale·(x @ downᵀ) @ upᵀ on x [..., in], down [r, in], up [out, r], with backward written out.

    Autograd's graph of the same expression keeps a node for every reshape and transpose and replays
    each in backward; this keeps backward's four matmuls (grad_h = g @ up·scale, grad_up = gᵀ @ h·scale,
    grad_down = grad_hᵀ @ x, grad_x = grad_h @ down) and their views. With `host_weight` (output = x @ Wᵀ + b
    of a frozen host), x's whole gradient is computed here (g @ W, grad_h @ down added into it in place) and
    output gets none, so the host's own backward and the engine's sum of the two gradients of x drop out;
    the up projection is then added into the host's output in place (`_own_output`).
    """

    @staticmethod
    def forward(ctx, output, x, down, up, scale, host_weight, in_place, down_t, up_t):
        down_t, up_t = down.t() if down_t is None else down_t, up.t() if up_t is None else up_t
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        h = torch.mm(x2, down_t)  # [N, r]
        ctx.save_for_backward(x2, h, down, up, host_weight)
        ctx.scale, ctx.x_shape = scale, x.shape
        if _own_output(ctx, output, in_place):
            # 3-D: through a view of an alias (a view made here of a tensor autograd tracks would make any later look
            # at its grad_fn an error)
            flat = output if output.dim() == 2 else output.detach().view(-1, up.shape[0])
            flat.addmm_(h, up_t, alpha=scale)
            return output
        return _fresh_view(torch.addmm(output.reshape(-1, up.shape[0]), h, up_t, alpha=scale), output.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, h, down, up, host_weight = ctx.saved_tensors
        g = grad if grad.dim() == 2 else grad.reshape(-1, up.shape[0])  # [N, out]
        grad_h = _scaled(torch.mm(g, up), ctx.scale)  # [N, r]
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.mm(grad_h, down) if host_weight is None else torch.mm(g, host_weight).addmm_(grad_h, down)
            grad_x = grad_x.view(ctx.x_shape)
        grad_down = torch.mm(grad_h.t(), x2) if ctx.needs_input_grad[2] else None
        grad_up = _scaled(torch.mm(g.t(), h), ctx.scale) if ctx.needs_input_grad[3] else None
        return grad if host_weight is None else None, grad_x, grad_down, grad_up, None, None, None, None, None


class _LowRankAddConv1x1(torch.autograd.Function):
    """The 1×1-conv form of `_LowRankAddLinear`: x [B, in, H, W], down [r, in(, 1, 1)], up [out, r(, 1, 1)], host
    weight [out, in, 1, 1], as batched matmuls over the channel axis (no conv, no copy to channels-last)."""

    @staticmethod
    def forward(ctx, output, x, down, up, scale, host_weight, in_place):
        batch = x.shape[0]
        x3 = x.reshape(batch, x.shape[1], -1)  # [B, in, HW]
        down2, up2 = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        h = torch.bmm(down2.expand(batch, -1, -1), x3)  # [B, r, HW]
        ctx.save_for_backward(x3, h, down2, up2, host_weight)
        ctx.scale, ctx.x_shape, ctx.down_shape, ctx.up_shape = scale, x.shape, down.shape, up.shape
        if _own_output(ctx, output, in_place):
            output.detach().view(batch, up2.shape[0], -1).baddbmm_(up2.expand(batch, -1, -1), h, alpha=scale)
            return output
        out3 = output.reshape(batch, up2.shape[0], -1)
        return _fresh_view(torch.baddbmm(out3, up2.expand(batch, -1, -1), h, alpha=scale), output.shape)

    @staticmethod
    def backward(ctx, grad):
        x3, h, down2, up2, host_weight = ctx.saved_tensors
        batch = x3.shape[0]
        g = grad.reshape(batch, up2.shape[0], -1)  # [B, out, HW]
        grad_h = _scaled(torch.bmm(up2.t().expand(batch, -1, -1), g), ctx.scale)  # [B, r, HW]
        grad_x = None
        if ctx.needs_input_grad[1]:
            down_t = down2.t().expand(batch, -1, -1)
            if host_weight is None:
                grad_x = torch.bmm(down_t, grad_h)
            else:  # accumulated in place into the host's product: no copy of it
                grad_x = torch.bmm(host_weight.flatten(1).t().expand(batch, -1, -1), g).baddbmm_(down_t, grad_h)
            grad_x = grad_x.view(ctx.x_shape)
        grad_down = torch.bmm(grad_h, x3.transpose(1, 2)).sum(0).view(ctx.down_shape) if ctx.needs_input_grad[2] else None
        grad_up = _scaled(torch.bmm(g, h.transpose(1, 2)).sum(0), ctx.scale).view(ctx.up_shape) if ctx.needs_input_grad[3] else None
        return grad if host_weight is None else None, grad_x, grad_down, grad_up, None, None, None


def _own_output(ctx, output: torch.Tensor, in_place: bool) -> bool:
    """Whether the up projection may be added into `output` in place (and marks it so for autograd): only the
    output of a sole frozen stock host (`in_place`: `host_weight` given, not compiling), which nothing else holds
    or saved for backward, laid out plainly and not a view (in place into a view, autograd would copy the whole
    gradient of its base in backward). This saves a copy of the layer's output per adapter; the Function returns
    no gradient for the host's output anyway."""
    if not in_place or output._is_view() or not output.is_contiguous():
        return False
    ctx.mark_dirty(output)
    return True


def _fresh_view(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`t` in `shape` as a tensor autograd does not track as a view (ATen's `_unsafe_view`, as `matmul` returns).

    A custom Function's output that is a view may not be modified in place, and host blocks do that to
    a layer's output (Forge's and ComfyUI's `x += attn(x)`); nothing else holds the product `t`.
    """
    return torch.ops.aten._unsafe_view(t, shape)


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1 else t.mul_(scale)  # in place on a fresh small product: no extra allocation


def low_rank_add(output: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, conv1x1: bool,
                 host_weight: torch.Tensor | None = None,
                 transposed: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> torch.Tensor:
    """output + scale·up(down(x)), in x's dtype: on a Linear host x [..., in], down [r, in], up [out, r];
    on a 1×1 stride-1 unpadded conv host (`conv1x1`) x [B, in, H, W], down [r, in(, 1, 1)], up [out, r(, 1, 1)].
    `transposed`, on a Linear host: (downᵀ, upᵀ) views kept from step to step (`Factor.transposed`), or None each.

    Give `host_weight` only when `output` is exactly the frozen host's x @ Wᵀ (+ b) in x's dtype: backward then
    computes x's whole gradient and sends none back through the host, and the product is added into the host's
    output in place (out of place otherwise, where another hook or the host's own backward may hold it, and under
    torch.compile).
    """
    in_place = host_weight is not None and not compiling()  # dynamo refuses the in-place add; inductor fuses it anyway
    if conv1x1:
        return _LowRankAddConv1x1.apply(output, x, down, up, scale, host_weight, in_place)
    down_t, up_t = transposed or (None, None)
    if in_place and _reshaped_product(output):  # F.linear with a bias: its [N, out] product, reshaped
        return _fresh_view(_LowRankAddLinear.apply(output._base, x, down, up, scale, host_weight, in_place, down_t, up_t), output.shape)
    return _LowRankAddLinear.apply(output, x, down, up, scale, host_weight, in_place, down_t, up_t)


def compiling() -> bool:
    """Whether dynamo is tracing this call (asked on every adapter forward: the check is looked up once)."""
    return _is_compiling_check()()


@functools.cache
def _is_compiling_check():
    """`torch.compiler.is_compiling` from torch 2.3, dynamo's own before it (the webui 1.10.1 ships torch 2.1, whose
    `torch.compiler` has no `is_compiling`); looked up at the first adapter forward, not at import, as importing
    torch._dynamo takes a second (in training it is imported already: every torch optimizer imports it)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is None:
        from torch._dynamo import is_compiling
    return is_compiling


def _reshaped_product(output: torch.Tensor) -> bool:
    """Whether `output` is a view of all of a contiguous tensor in another shape, as F.linear with a bias returns
    for a 3-D input (the addmm's product, viewed): the adapter may then add into that product in place."""
    base = output._base
    return (base is not None and base.is_contiguous() and output.is_contiguous() and base.numel() == output.numel()
            and base.storage_offset() == output.storage_offset())
