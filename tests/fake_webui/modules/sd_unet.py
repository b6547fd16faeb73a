"""modules.sd_unet: an alternative UNet (TensorRT...) replaces the PyTorch one when set."""

current_unet = None
