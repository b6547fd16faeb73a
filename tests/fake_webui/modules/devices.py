"""modules.devices."""

import torch

from modules import calls

device = torch.device("cpu")
cpu = torch.device("cpu")
dtype = dtype_vae = dtype_unet = torch.float32
fp8 = False


def torch_gc():
    calls.append("torch_gc")
