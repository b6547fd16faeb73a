"""backend/nn/unet.py: Forge's UNet blocks, written for inference. CrossAttention calls the module global
`attention_function` (imported from backend.attention at start); BasicTransformerBlock adds into its input in
place (`x += n`) after its LayerNorms saw it. `as_forge_unet` gives our UNet's blocks these classes."""

from torch import nn

from backend.attention import attention_function  # noqa: F401  (read as a module global at each call, as in Forge)
from lib_lora.models.unet import BasicTransformerBlock as OurBlock
from lib_lora.models.unet import CrossAttention as OurAttention


class CrossAttention(OurAttention):
    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        context = x if context is None else context
        return self.to_out(attention_function(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask))


class BasicTransformerBlock(OurBlock):
    def forward(self, x, context=None, transformer_options={}):
        n = self.attn1(self.norm1(x))
        x += n
        n = self.attn2(self.norm2(x), context)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


def as_forge_unet(unet: nn.Module) -> nn.Module:
    for module in unet.modules():
        if type(module) is OurAttention:
            module.__class__ = CrossAttention
        elif type(module) is OurBlock:
            module.__class__ = BasicTransformerBlock
    return unet
