"""The named errors of `lib_lora.networks`; all are ValueErrors with a message meant for the user."""


class LoraFormatError(ValueError):
    """A LoRA file (or state dict) that cannot be read or applied; the message names the file and key."""


class NamingError(ValueError):
    """A module path that has no kohya name (not an SD1/SD2 ldm UNet or HF CLIP text-encoder path)."""


class NetworkConfigError(ValueError):
    """Bad arguments to `make_network`; the message names the argument."""


class LoraNotFoundError(ValueError):
    """A `<lora:name:...>` tag whose name is no file in the LoRA folders; the message lists the names found."""


class PromptSyntaxError(ValueError):
    """A malformed `<lora:...>` tag (bad multiplier, block weights of the wrong length)."""
