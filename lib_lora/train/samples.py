"""Sample prompts in kohya's line format, rendered during training.

`a zkz star --n blurry --s 20 --l 7 --w 64 --h 64 --d 5` = prompt, negative, steps, cfg scale,
width, height, seed (kohya `line_to_prompt_dict`; unknown options are an error, not ignored).
"""

import re

from ..models.pipeline import GenerationParams

OPTIONS = {"n": ("negative_prompt", str), "s": ("steps", int), "l": ("cfg_scale", float), "w": ("width", int), "h": ("height", int), "d": ("seed", int)}


def parse_sample_prompt(line: str, *, width: int, height: int, sampler: str, clip_skip: int, default_seed: int) -> GenerationParams:
    parts = re.split(r"\s--(?=[a-z]\s)", " " + line.strip())
    values = {"prompt": parts[0].strip(), "width": width, "height": height, "seed": default_seed}
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        if key not in OPTIONS:
            raise ValueError(f"sample prompt {line!r}: unknown option --{key} (known: {', '.join('--' + k for k in OPTIONS)})")
        name, kind = OPTIONS[key]
        try:
            values[name] = kind(value.strip())
        except ValueError as e:
            raise ValueError(f"sample prompt {line!r}: --{key} needs a {kind.__name__}, got {value.strip()!r}") from e
    return GenerationParams(sampler=sampler, clip_skip=clip_skip, **values)
