"""What presets and pre-run advice need to know of the base model: its architecture, eps|v, native size and,
on a GPU, its memory.

The tab tailors its preset list to `arch`; `model_warnings` says where the options do not fit the model.
Built from a host (`BaseModel.of`) at the edge, so the advice itself is plain and testable without one.
"""

from dataclasses import dataclass

from ..models.checkpoint import ARCH_NAMES
from .config import TrainConfig
from .memory import ModelMemory, memory_warning

# A side this far from the native one, as a ratio, draws noticeably worse (SD1 at 768 px is still usual).
SIZE_TOLERANCE = (0.75, 1.5)


def native_size(arch: str, parameterization: str = "eps") -> int:
    """The side the released base models were trained at: SD1 512, SD2 512-base (eps) or 768-v, SDXL 1024."""
    if arch == "sdxl":
        return 1024
    return 768 if arch == "sd2" and parameterization == "v" else 512


@dataclass(frozen=True)
class BaseModel:
    arch: str  # "sd1" | "sd2" | "sdxl"
    parameterization: str = "eps"  # "eps" | "v"
    size: int = 0  # side in px the model was trained at; 0: its architecture's (`native_size`)
    memory: ModelMemory | None = None  # on a GPU: what the memory estimate needs (None: no estimate)

    @classmethod
    def of(cls, host) -> "BaseModel":
        return cls(host.arch, host.schedule.parameterization, host.native_size or 0, ModelMemory.of(host))

    @property
    def native_size(self) -> int:
        return self.size or native_size(self.arch, self.parameterization)

    @property
    def name(self) -> str:
        """SD1, SD2 512-base, SD2 768-v, SDXL (v-pred SDXL fine-tunes are still SDXL)."""
        if self.arch == "sd2":
            return "SD2 768-v" if self.parameterization == "v" else "SD2 512-base"
        return ARCH_NAMES[self.arch]


def model_warnings(config: TrainConfig, model: BaseModel | None) -> list[str]:
    """Options that do not fit the base model: a size far from its own, a clip skip it ignores, ZTSNR without v."""
    notes = []
    v_prediction = config.v_parameterization or (model is not None and model.parameterization == "v")
    if config.zero_terminal_snr and not v_prediction:
        notes.append("zero_terminal_snr on an eps-prediction model: at the last step the input is pure noise, so predicting the "
                     "noise teaches nothing (kohya warns the same); use it only on v-prediction models trained so")
    if model is None:
        return notes
    if config.clip_skip != 1 and model.arch != "sd1":
        notes.append(f"clip_skip {config.clip_skip} is ignored on {ARCH_NAMES[model.arch]}: its text encoders use fixed layers, "
                     "as in the webui; set it to 1")
    notes += size_warnings(config.resolution, model)
    too_big = memory_warning(config, model.arch, model.memory) if model.memory is not None else None
    return notes + ([too_big] if too_big else [])


def size_warnings(resolution: tuple[int, int], model: BaseModel) -> list[str]:
    """A training size whose area is far from the model's own (compared by the side of a square of that area)."""
    width, height = resolution
    native, side = model.native_size, (width * height) ** 0.5
    low, high = SIZE_TOLERANCE
    said = f"the base model ({model.name}) was trained at {native} px; {width}x{height} is far "
    if side < low * native:
        return [said + f"below it, so the LoRA learns images the model draws poorly: train at {native} px"]
    if side > high * native:
        return [said + f"above it: {(side / native) ** 2:.1f}x the memory and time per image, at a size it composes poorly"]
    return []
