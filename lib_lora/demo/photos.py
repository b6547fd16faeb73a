"""Natural photos for the embedded VAE, from image files that packages ship inside their wheels.

Nothing is downloaded: scikit-image's wheel carries its sample images (`skimage/data/*.png`) and
matplotlib's (a dependency of gradio) carries `grace_hopper.jpg`. Only building the base model and
`bench/vae_quality.py` need them (`pip install -r requirements-build.txt`); the files are read with
PIL, the packages are never imported. Whole photos are held out of training, so the bench measures
the codec on photos it never saw.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

# (package, folder inside it, file names); grey photos are read as RGB.
TRAINING_PHOTOS = (
    ("skimage", "data", ("astronaut.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "ihc.png",
                         "hubble_deep_field.jpg", "color.png", "logo.png", "brick.png", "grass.png", "gravel.png",
                         "camera.png", "coins.png", "moon.png", "page.png", "text.png", "cell.png")),
    ("matplotlib", "mpl-data/sample_data", ("Minduka_Present_Blue_Pack.png",)),
)
HELD_OUT_PHOTOS = (
    ("skimage", "data", ("chelsea.png", "coffee.png", "rocket.jpg")),
    ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",)),
)


class PhotosMissing(FileNotFoundError):
    """A package that ships the photos is not installed."""


def photo_paths(groups=TRAINING_PHOTOS) -> list[Path]:
    """The files of `groups`, found in the installed packages without importing them."""
    paths = []
    for package, folder, names in groups:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise PhotosMissing(f"the natural photos need the {package!r} package (its wheel ships them): "
                                f"pip install -r requirements-build.txt")
        root = Path(next(iter(spec.submodule_search_locations))) / folder
        paths += [root / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PhotosMissing(f"photo files not found: {', '.join(missing)}; reinstall the package that ships them")
    return paths


def load_photos(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in paths]


def photo_crops(photos: list[Image.Image], count: int, rng: np.random.Generator, size: int = 64) -> list[Image.Image]:
    """`count` square crops at random positions and scales (from `size` px to the photo's short
    side, so from full detail to the whole photo), downscaled to `size` px, photos taken in turn."""
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = photo.size
        side = int(rng.integers(size, min(width, height) + 1))
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crops.append(photo.crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS))
    return crops
