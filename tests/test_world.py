"""The synthetic world is seeded, its captions agree with its geometry, and the demo dataset is
written in kohya's layout without clobbering anything."""
import re

import numpy as np
import pytest
from PIL import Image

from lib_lora.demo import world
from lib_lora.demo.analyzer import analyze
from lib_lora.demo.dataset import DemoDatasetError, concept_spec, make_lora_dataset

ALL_COLOURS = tuple(world.COLOURS)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize("seed", [0, 1, 17, 123456])
def test_same_seed_same_example(seed):
    first = world.make_example(seed, shapes=world.SHAPES, colours=ALL_COLOURS)
    second = world.make_example(seed, shapes=world.SHAPES, colours=ALL_COLOURS)
    assert first.caption == second.caption and first.scene == second.scene
    assert np.array_equal(_pixels(first.image), _pixels(second.image))


def test_different_seeds_differ():
    examples = [world.make_example(seed) for seed in range(20)]
    pixels = {_pixels(e.image).tobytes() for e in examples}
    assert len(pixels) == 20
    assert len({e.scene for e in examples}) == 20


def test_image_mode_and_size():
    for side in (32, 64, 96):
        image = world.make_example(3, size=side).image
        assert image.mode == "RGB" and image.size == (side, side)


def test_render_at_any_size_keeps_the_geometry():
    scene = world.make_example(8).scene
    centres = []
    for side in (64, 256):
        alpha = world.render_alpha(scene, side)
        ys, xs = np.mgrid[0:side, 0:side]
        centres.append(np.array([(xs * alpha).sum(), (ys * alpha).sum()]) / alpha.sum() / side)
    assert np.allclose(centres[0], centres[1], atol=0.01)
    assert np.allclose(centres[1], (scene.cx, scene.cy), atol=0.01)


def test_object_stays_inside_the_frame():
    for seed in range(100):
        scene = world.make_example(seed, shapes=world.SHAPES).scene
        alpha = world.render_alpha(scene, 64)
        assert alpha.max() == 1.0, "every object has fully covered pixels"
        border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
        assert border.max() == 0.0


def test_defaults_hold_out_star_and_purple():
    assert world.HELD_OUT_SHAPES == ("star",) and world.HELD_OUT_COLOURS == ("purple",)
    assert "star" not in world.SEEN_SHAPES and "purple" not in world.SEEN_COLOURS
    assert {"circle", "square", "triangle", "star", "ring"} <= set(world.SHAPES)
    scenes = [world.make_example(seed).scene for seed in range(300)]
    assert {s.shape for s in scenes} == set(world.SEEN_SHAPES)
    assert {s.colour_name for s in scenes} == set(world.SEEN_COLOURS)


def test_sample_only_what_is_asked():
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng, shapes=("star",), colours=("purple",)) for _ in range(20)]
    assert {(s.shape, s.colour_name) for s in scenes} == {("star", "purple")}


def test_random_rgb_contrasts_with_background():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = world.sample_scene(rng, shapes=world.SHAPES, random_rgb=True)
        assert scene.colour_name is None
        distance = np.linalg.norm(np.subtract(scene.rgb, scene.background.rgb))
        assert distance >= world.MIN_RANDOM_CONTRAST
    rgbs = {world.sample_scene(rng, random_rgb=True).rgb for _ in range(50)}
    assert len(rgbs) == 50


def test_backgrounds_are_dark_and_unlike_object_colours():
    for seed in range(100):
        scene = world.make_example(seed, shapes=world.SHAPES, colours=ALL_COLOURS).scene
        background = world.render_background(scene.background, 64)
        assert background.max() < 100
        nearest = min(np.linalg.norm(np.subtract(rgb, scene.background.rgb))
                      for rgb in world.COLOURS.values())
        assert nearest > 100


def test_unknown_names_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="hexagon"):
        world.sample_scene(rng, shapes=("hexagon",))
    with pytest.raises(ValueError, match="beige"):
        world.sample_scene(rng, colours=("red", "beige"))
    with pytest.raises(ValueError, match="style"):
        world.caption(world.make_example(0).scene, style="poem")


def _side_word(position: float, low: str, high: str) -> set[str]:
    if position < world.SIDE_BELOW:
        return {low}
    return {high} if position > world.SIDE_ABOVE else set()


def _position_words(scene: world.Scene) -> set[str]:
    words = _side_word(scene.cx, "left", "right") | _side_word(scene.cy, "top", "bottom")
    return words or {"center"}


def test_captions_agree_with_the_scene():
    for seed in range(300):
        example = world.make_example(seed, shapes=world.SHAPES, colours=ALL_COLOURS)
        scene, words = example.scene, set(re.findall(r"[a-z]+", example.caption))
        assert {scene.shape, scene.colour_name} <= words, example.caption
        assert not (words & set(world.SHAPES)) - {scene.shape}, example.caption
        assert not (words & set(world.COLOURS)) - {scene.colour_name}, example.caption
        full = set(re.findall(r"[a-z]+", world.caption(scene, "full")))
        assert full & {"left", "right", "top", "bottom", "center"} == _position_words(scene)
        assert ("small" in full) == (scene.size < world.SMALL_BELOW)
        assert ("large" in full) == (scene.size > world.LARGE_ABOVE)


def test_caption_wording():
    scene = world.make_example(0).scene
    left_orange = world.Scene("circle", "orange", (245, 140, 30), 0.15, 0.3, 0.5, 0.0,
                              scene.background)
    assert world.caption(left_orange, "short") == "an orange circle"
    assert world.caption(left_orange, "full") == "a small orange circle on the left"
    corner = world.Scene("star", "red", (220, 40, 40), 0.22, 0.7, 0.25, 0.0, scene.background)
    assert world.caption(corner, "full") == "a red star in the top right"
    unnamed = world.Scene("ring", None, (1, 2, 3), 0.3, 0.5, 0.5, 0.0, scene.background)
    assert world.caption(unnamed, "full") == "a large ring in the center"


def test_shapes_are_what_they_claim():
    """Geometry checks independent of the analyzer: a ring has a hole, a star has 10 vertices."""
    background = world.make_example(0).scene.background
    ring = world.Scene("ring", "red", (220, 40, 40), 0.3, 0.5, 0.5, 0.0, background)
    assert world.render_alpha(ring, 64)[32, 32] == 0.0
    assert len(world.shape_polygon("star")) == 2 * world.STAR_POINTS
    radii = np.linalg.norm(world.shape_polygon("star", 17.0), axis=1)
    assert np.allclose(radii, np.tile([1.0, world.STAR_INNER_RATIO], world.STAR_POINTS))


def _read_dataset(root):
    folders = [p for p in root.iterdir() if p.is_dir()]
    assert len(folders) == 1
    pngs = sorted(folders[0].glob("*.png"))
    txts = sorted(folders[0].glob("*.txt"))
    assert [p.stem for p in pngs] == [t.stem for t in txts]
    pairs = [(Image.open(p).convert("RGB"), t.read_text().strip()) for p, t in zip(pngs, txts)]
    return folders[0], pairs


def test_star_dataset_layout(tmp_path):
    root = make_lora_dataset(tmp_path / "data", concept="star", trigger="zkz", n_images=6,
                             repeats=10)
    folder, pairs = _read_dataset(root)
    assert root == tmp_path / "data" and folder.name == "10_zkz"
    assert sorted(p.name for p in folder.iterdir())[:2] == ["img_000.png", "img_000.txt"]
    assert len(pairs) == 6
    for image, text in pairs:
        assert "zkz star" in text, text
        analysis = analyze(image)
        assert analysis.shape == "star" and analysis.colour in world.SEEN_COLOURS


def test_purple_dataset_uses_seen_shapes(tmp_path):
    root = make_lora_dataset(tmp_path, concept="purple", trigger="pvx", n_images=8, repeats=3,
                             seed=4)
    folder, pairs = _read_dataset(root)
    assert folder.name == "3_pvx"
    for image, text in pairs:
        assert "pvx purple" in text, text
        analysis = analyze(image)
        assert analysis.colour == "purple" and analysis.shape in world.SEEN_SHAPES
    # every seen shape is shown, in turn, so none is left with a single example
    shapes = [analyze(image).shape for image, _ in pairs]
    assert shapes == [world.SEEN_SHAPES[i % len(world.SEEN_SHAPES)] for i in range(8)]


def test_dataset_is_seeded(tmp_path):
    _, first = _read_dataset(make_lora_dataset(tmp_path / "a", n_images=3, seed=7))
    _, second = _read_dataset(make_lora_dataset(tmp_path / "b", n_images=3, seed=7))
    _, other = _read_dataset(make_lora_dataset(tmp_path / "c", n_images=3, seed=8))
    assert [t for _, t in first] == [t for _, t in second]
    assert all(np.array_equal(_pixels(a), _pixels(b)) for (a, _), (b, _) in zip(first, second))
    assert not all(np.array_equal(_pixels(a), _pixels(b)) for (a, _), (b, _) in zip(first, other))


def test_dataset_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DemoDatasetError, match=re.escape(str(tmp_path))):
        make_lora_dataset(tmp_path, n_images=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_dataset_overwrite_replaces_the_image_folder(tmp_path):
    make_lora_dataset(tmp_path, n_images=5)
    make_lora_dataset(tmp_path, n_images=2, overwrite=True)
    (tmp_path / "keep.md").write_text("kept")
    make_lora_dataset(tmp_path, n_images=3, overwrite=True)
    assert len(list((tmp_path / "10_zkz").glob("*.png"))) == 3
    assert (tmp_path / "keep.md").read_text() == "kept"


@pytest.mark.parametrize("kwargs", [dict(concept="circle"), dict(trigger="two words"),
                                    dict(trigger=""), dict(n_images=0), dict(repeats=0)])
def test_dataset_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_lora_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_concepts():
    star, purple = concept_spec("star"), concept_spec("purple")
    assert star.shapes == ("star",) and "purple" not in star.colours and star.part == "shape"
    assert purple.colours == ("purple",) and "star" not in purple.shapes and purple.part == "colour"


def test_light_backgrounds_are_light_leave_earlier_scenes_alone_and_are_read():
    plain = [world.sample_scene(np.random.default_rng(seed)) for seed in range(20)]
    assert plain == [world.sample_scene(np.random.default_rng(seed), light_share=0.0) for seed in range(20)]
    rng = np.random.default_rng(3)
    scenes = [world.sample_scene(rng, world.SHAPES, ALL_COLOURS, light_share=1.0) for _ in range(60)]
    light = [s for s in scenes if min(s.background.rgb) >= world.LIGHT_LEVELS[0] - world.LIGHT_TINT]
    assert len(light) > 40
    # an object that would not stand out (white on the lightest) keeps a dark background
    assert all(np.linalg.norm(np.subtract(s.rgb, s.background.rgb)) >= world.MIN_RANDOM_CONTRAST for s in light)
    readings = [analyze(world.render(s)) for s in light]
    assert all((r.colour, r.shape) == (s.colour_name, s.shape) for r, s in zip(readings, light))


def test_dataset_variants_light_backgrounds_and_fewer_shapes(tmp_path):
    root = make_lora_dataset(tmp_path / "v", concept="purple", n_images=6, light_share=1.0, shown=("circle", "triangle"))
    _, pairs = _read_dataset(root)
    assert [analyze(image).shape for image, _ in pairs] == ["circle", "triangle"] * 3
    assert all(_pixels(image)[:3].mean() > 150 for image, _ in pairs)  # light top border
    with pytest.raises(ValueError, match="hexagon"):
        make_lora_dataset(tmp_path / "w", concept="purple", shown=("hexagon",))
