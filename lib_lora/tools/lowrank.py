"""Low-rank math of the toolbox: modules as (up, down) pairs, exact concatenation, SVD truncation.

Pure functions over tensors. A delta is held flat, as kohya's `merge_lora.py`/`svd_merge_lora.py`
hold it: ΔW [out, in·kh·kw] = up [out, r] @ down [r, in·kh·kw], with the file's scale alpha/r
folded into `up`; `in_shape` keeps the layer's input dims ((in,) Linear, (in, kh, kw) conv) so a
k×k down and a 1×1 up come back in the layout kohya writes (lora-format.md §2). Rank rules follow
kohya's `networks/resize_lora.py` (`rank_resize`, `index_sv_fro`, `index_sv_cumulative`).
"""

import math
import re
from dataclasses import dataclass

import torch

from ..networks.base import AdapterModule

MIN_SV = 1e-6  # kohya resize_lora: a largest singular value below this is a zero delta, kept at rank 1
# kohya names of k×k convs (SD1/SD2 diffusers paths, SDXL ldm paths, LyCORIS's extra targets): where a
# LoHa/LoKr file stores a conv factor flattened, the name is all that tells the kernel (always 3×3 in SD).
KXK_CONV_NAME = re.compile(r"_(conv1|conv2|in_layers_2|out_layers_3|op|conv|conv_in|conv_out|input_blocks_0_0|out_2)$")


@dataclass(frozen=True)
class LowRank:
    """ΔW = up @ down (scale included): up [out, r], down [r, in·kh·kw]; `in_shape` is (in,) or (in, kh, kw)."""

    up: torch.Tensor
    down: torch.Tensor
    in_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def is_kxk_conv(self) -> bool:
        return is_kxk(self.in_shape)

    def delta(self) -> torch.Tensor:
        return self.up @ self.down  # [out, in·kh·kw]


@dataclass(frozen=True)
class Spectrum:
    """ΔW = u·diag(s)·vh with s descending; `full_len` = min(out, in·kh·kw), the rank ΔW could have."""

    u: torch.Tensor  # [out, k]
    s: torch.Tensor  # [k]
    vh: torch.Tensor  # [k, in·kh·kw]
    full_len: int


@dataclass(frozen=True)
class RankRule:
    """How many singular values a module keeps (kohya resize_lora's `--new_rank` / `--dynamic_method`).

    `rank` alone: that rank. With `fro` (sv_fro: keep the fraction `fro` of the Frobenius norm), `energy`
    (sv_cumulative: of the sum of singular values) or `ratio` (sv_ratio: values above s[0]/ratio), `rank`
    is the cap. `conv_rank` replaces `rank` for k×k convs (svd_merge_lora's `--new_conv_rank`).
    """

    rank: int | None = None
    conv_rank: int | None = None
    fro: float | None = None
    energy: float | None = None
    ratio: float | None = None

    def __post_init__(self):
        dynamic = [name for name in ("fro", "energy", "ratio") if getattr(self, name) is not None]
        if len(dynamic) > 1:
            raise ValueError(f"choose one of --fro, --energy, --ratio, not {' and '.join(dynamic)}")
        if not dynamic and self.rank is None:
            raise ValueError("give a rank (--rank) or a dynamic rule (--fro, --energy, --ratio)")
        for name in ("rank", "conv_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("fro", "energy"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.ratio is not None and self.ratio < 1:
            raise ValueError(f"ratio must be >= 1 (keep values above s[0]/ratio), got {self.ratio!r}")

    def cap(self, kxk_conv: bool) -> int | None:
        return self.conv_rank if kxk_conv and self.conv_rank is not None else self.rank


def is_kxk(in_shape: tuple[int, ...]) -> bool:
    return len(in_shape) == 3 and tuple(in_shape[1:]) != (1, 1)


def lowrank_of(module: AdapterModule) -> LowRank | None:
    """A LoRA/LoCon module's factors with its scale folded into up; None for LoHa/LoKr (no low-rank pair).

    A Tucker LoCon (lora_mid) becomes a conventional k×k down exactly:
    down'[m, i, k, l] = Σ_n mid[m, n, k, l]·down[n, i] (the contraction of lora-format.md §2).
    """
    if module.algo != "lora":
        return None
    up = module.lora_up.weight.detach().float().flatten(1) * module.scale  # [out, r]
    down = module.lora_down.weight.detach().float()
    if module.lora_mid is not None:
        down = torch.einsum("m n k l, n i -> m i k l", module.lora_mid.weight.detach().float(), down.flatten(1))
    return LowRank(up, down.flatten(1), tuple(down.shape[1:]))  # down [r, in·kh·kw]


def module_in_shape(module: AdapterModule) -> tuple[int, ...]:
    """(in,) or (in, kh, kw) of the layer a module patches, as far as its tensors (or, failing that, its name) tell."""
    if (factors := lowrank_of(module)) is not None:
        return factors.in_shape
    _, flat_in = module.delta_shape()
    kernels = [tuple(t.shape[2:]) for t in module.state_dict().values() if t.dim() == 4]
    kernel = max(kernels, key=math.prod, default=(1, 1))
    if kernel == (1, 1) and KXK_CONV_NAME.search(module.lora_name) and flat_in % 9 == 0:
        kernel = (3, 3)  # LyCORIS stores a LoHa/LoKr conv factor as [r, in·kh·kw]
    return (flat_in,) if kernel == (1, 1) else (flat_in // math.prod(kernel), *kernel)


def dense_delta(module: AdapterModule) -> torch.Tensor:
    """scale·ΔW of any module, flat [out, in·kh·kw], fp32."""
    return module.delta_weight(module.delta_shape()).detach().float()


def merged_in_shape(shapes: list[tuple[int, ...]], what: str) -> tuple[int, ...]:
    """One input layout for modules of several files: a 4-D (conv) layout wins over a flat one of equal size."""
    convs = {s for s in shapes if len(s) == 3}
    if len(convs) > 1:
        raise ValueError(f"{what}: the files disagree on the conv kernel: {sorted(convs)}")
    return convs.pop() if convs else shapes[0]


def concatenate(parts: list[tuple[LowRank, float]], in_shape: tuple[int, ...]) -> LowRank:
    """Σ weight·ΔW_i exactly as one LowRank of rank Σ r_i: downs stacked, ups stacked with weight folded in."""
    up = torch.cat([weight * f.up for f, weight in parts], dim=1)  # [out, Σr]
    down = torch.cat([f.down for f, _ in parts], dim=0)  # [Σr, in·kh·kw]
    return LowRank(up, down, in_shape)


def spectrum_of_lowrank(f: LowRank) -> Spectrum:
    """The exact SVD of up @ down without forming it: QR of both factors, SVD of the small [r, r] core (fp64)."""
    q_up, r_up = torch.linalg.qr(f.up.double())  # [out, r'], [r', r]
    q_down, r_down = torch.linalg.qr(f.down.double().t())  # [n, r''], [r'', r]
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.t(), full_matrices=False)  # core [r', r'']
    out, n = f.up.shape[0], f.down.shape[1]
    return Spectrum((q_up @ u_core).float(), s.float(), (vh_core @ q_down.t()).float(), min(out, n))


def spectrum_of_dense(delta: torch.Tensor) -> Spectrum:
    """The SVD of a flat delta [out, n] (fp32, on the delta's device)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return Spectrum(u, s, vh, min(delta.shape))


def _index_above(fractions: torch.Tensor, target: float, full_len: int) -> int:
    """kohya's index_sv_*: first index whose cumulative fraction reaches `target`, plus one, in [1, full_len - 1]."""
    index = int(torch.searchsorted(fractions, torch.tensor([target], dtype=fractions.dtype))[0]) + 1
    return max(1, min(index, full_len - 1))


def kept_rank(rule: RankRule, spectrum: Spectrum, kxk_conv: bool = False) -> int:
    """How many singular values `rule` keeps (kohya `rank_resize`), never more than the delta has."""
    s = spectrum.s.double()
    cap = rule.cap(kxk_conv)
    if rule.fro is not None:
        rank = _index_above(torch.cumsum(s**2, 0) / (s**2).sum(), rule.fro**2, spectrum.full_len)
    elif rule.energy is not None:
        rank = _index_above(torch.cumsum(s, 0) / s.sum(), rule.energy, spectrum.full_len)
    elif rule.ratio is not None:
        rank = int((s > s[0] / rule.ratio).sum())
    else:
        rank = cap
    if s.numel() == 0 or float(s[0]) <= MIN_SV:
        return 1
    return max(1, min(rank, cap or rank, s.numel()))


def truncate(spectrum: Spectrum, rank: int, in_shape: tuple[int, ...]) -> LowRank:
    """The best rank-`rank` approximation, singular values folded into up (as kohya's extract and resize do)."""
    return LowRank(spectrum.u[:, :rank] * spectrum.s[:rank], spectrum.vh[:rank], in_shape)


def relative_error(spectrum: Spectrum, rank: int) -> float:
    """‖ΔW − ΔW_rank‖_F / ‖ΔW‖_F = sqrt(Σ_{i≥rank} s_i²) / sqrt(Σ s_i²) (Eckart–Young); 0 for a zero delta."""
    s2 = spectrum.s.double() ** 2
    total = float(s2.sum())
    return math.sqrt(float(s2[rank:].sum()) / total) if total > 0 else 0.0


def lora_tensors(name: str, f: LowRank, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """kohya keys of one module: down [r, in(, kh, kw)], up [out, r(, 1, 1)], alpha = scale·r, up divided by scale.

    `scale` is the alpha/r the file should carry (1 unless a resize keeps the source's); the product
    alpha/r·up@down is ΔW whatever it is.
    """
    scale = scale if scale > 0 else 1.0
    out = f.up.shape[0]
    kernel = [1, 1] if len(f.in_shape) == 3 else []
    return {
        f"{name}.lora_down.weight": f.down.reshape(f.rank, *f.in_shape).contiguous(),
        f"{name}.lora_up.weight": (f.up / scale).reshape(out, f.rank, *kernel).contiguous(),
        f"{name}.alpha": torch.tensor(scale * f.rank, dtype=torch.float32),
    }
