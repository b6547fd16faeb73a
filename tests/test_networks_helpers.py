"""Shared cases for the networks tests: host layers, random adapter tensors per algorithm, reference math.

No tests here; the property tests import these tables. Adapters are initialised non-zero so that
every property can fail.
"""

import pytest
import torch
from torch import nn

IN, OUT, RANK, ALPHA = 12, 20, 4, 2.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many small ops, where intra-op threads only cost hand-offs (30x slower on a busy
    shared CPU). Import this fixture into a test module to run it on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

LAYERS = {
    "linear": lambda: nn.Linear(IN, OUT),
    "linear_no_bias": lambda: nn.Linear(IN, OUT, bias=False),  # the UNet's q/k/v: their output is no view
    "conv1x1": lambda: nn.Conv2d(IN, OUT, 1),
    "conv3x3": lambda: nn.Conv2d(IN, OUT, 3, padding=1),
    "conv3x3_s2": lambda: nn.Conv2d(IN, OUT, 3, stride=2, padding=1),
}

# Which algorithm variants apply to which layer kinds (Tucker cores need a kernel > 1).
VARIANTS = {
    "lora": list(LAYERS),
    "lora_other_layout": ["linear", "conv1x1"],  # 4-D tensors on a Linear, 2-D on a 1x1 conv
    "lora_tucker": ["conv3x3", "conv3x3_s2"],
    "loha": list(LAYERS),
    "loha_tucker": ["conv3x3", "conv3x3_s2"],
    "lokr": list(LAYERS),
    "lokr_full": list(LAYERS),
    "lokr_tucker": ["conv3x3", "conv3x3_s2"],
}
CASES = [(variant, layer) for variant, layers in VARIANTS.items() for layer in layers]


def make_layer(kind: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return LAYERS[kind]().to(dtype).eval().requires_grad_(False)


def input_for(layer: nn.Module, seed: int = 1, dtype=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or layer.weight.dtype
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 5, IN, generator=g).to(dtype)  # [B, T, in] like transformer tokens
    return torch.randn(2, IN, 8, 8, generator=g).to(dtype)


def kernel(layer: nn.Module) -> tuple[int, ...]:
    return tuple(layer.weight.shape[2:])


def random_tensors(variant: str, layer: nn.Module, seed: int = 2) -> dict[str, torch.Tensor]:
    """File tensors (keys after the module name) of one module of `variant` for `layer`."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    k = kernel(layer)
    kk = int(torch.Size(k).numel()) if k else 1
    alpha = {"alpha": torch.tensor(ALPHA)}
    if variant == "lora":
        return {"lora_down.weight": rnd(RANK, IN, *k), "lora_up.weight": rnd(OUT, RANK, *([1, 1] if k else [])), **alpha}
    if variant == "lora_other_layout":
        if k:
            return {"lora_down.weight": rnd(RANK, IN), "lora_up.weight": rnd(OUT, RANK), **alpha}
        return {"lora_down.weight": rnd(RANK, IN, 1, 1), "lora_up.weight": rnd(OUT, RANK, 1, 1), **alpha}
    if variant == "lora_tucker":
        return {"lora_down.weight": rnd(RANK, IN, 1, 1), "lora_mid.weight": rnd(RANK, RANK, *k),
                "lora_up.weight": rnd(OUT, RANK, 1, 1), **alpha}
    if variant == "loha":
        return {"hada_w1_a": rnd(OUT, RANK), "hada_w1_b": rnd(RANK, IN * kk),
                "hada_w2_a": rnd(OUT, RANK), "hada_w2_b": rnd(RANK, IN * kk), **alpha}
    if variant == "loha_tucker":
        return {"hada_t1": rnd(RANK, RANK, *k), "hada_w1_a": rnd(RANK, OUT), "hada_w1_b": rnd(RANK, IN),
                "hada_t2": rnd(RANK, RANK, *k), "hada_w2_a": rnd(RANK, OUT), "hada_w2_b": rnd(RANK, IN), **alpha}
    # LoKr: out 20 = 4·5, in 12 = 3·4; W1 [4, 3] full, W2 [5, 4(, kh, kw)]
    if variant == "lokr":
        return {"lokr_w1": rnd(4, 3), "lokr_w2_a": rnd(5, 2), "lokr_w2_b": rnd(2, 4 * kk), **alpha}
    if variant == "lokr_full":
        return {"lokr_w1": rnd(4, 3), "lokr_w2": rnd(5, 4, *k), **alpha}
    if variant == "lokr_tucker":
        return {"lokr_w1_a": rnd(4, 2), "lokr_w1_b": rnd(2, 3), "lokr_t2": rnd(2, 2, *k),
                "lokr_w2_a": rnd(2, 5), "lokr_w2_b": rnd(2, 4), **alpha}
    raise KeyError(variant)


def reference_delta(variant: str, t: dict[str, torch.Tensor], layer: nn.Module) -> torch.Tensor:
    """scale·ΔW written out independently of lib_lora (einsums per formula of lora-format.md)."""
    shape = layer.weight.shape
    k = kernel(layer) or None
    if variant.startswith("lora"):
        up = t["lora_up.weight"].reshape(OUT, RANK)
        down = t["lora_down.weight"]
        if "lora_mid.weight" in t:
            delta = torch.einsum("om,mnkl,ni->oikl", up, t["lora_mid.weight"], down.reshape(RANK, IN))
        elif k:
            delta = torch.einsum("or,rikl->oikl", up, down.reshape(RANK, IN, *k))
        else:
            delta = up @ down.reshape(RANK, IN)
        return delta.reshape(shape) * ALPHA / RANK
    if variant.startswith("loha"):
        if "hada_t1" in t:
            def factor(i):
                a, b, core = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"], t[f"hada_t{i}"]
                out = torch.zeros(OUT, IN, *k)
                for p in range(k[0]):
                    for q in range(k[1]):
                        out[:, :, p, q] = a.T @ core[:, :, p, q] @ b
                return out
            return factor(1) * factor(2) * ALPHA / RANK
        f = [(t[f"hada_w{i}_a"] @ t[f"hada_w{i}_b"]).reshape(shape) for i in (1, 2)]
        return f[0] * f[1] * ALPHA / RANK
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2, scale = t["lokr_w2"], 1.0  # both factors full: alpha is ignored
    elif "lokr_t2" in t:
        w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        scale = ALPHA / t["lokr_w2_b"].shape[0]
    else:
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(5, 4, *(k or ()))
        scale = ALPHA / t["lokr_w2_b"].shape[0]
    if k:
        return torch.kron(w1[:, :, None, None], w2.contiguous()) * scale
    return torch.kron(w1, w2) * scale
