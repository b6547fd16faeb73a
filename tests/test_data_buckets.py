"""Aspect-ratio buckets: kohya's bucket list and assignment, worked by hand."""
import pytest

from lib_lora.data import DatasetError, assign_bucket, check_resolution, make_buckets, select_bucket

# kohya make_bucket_resolutions((512, 512), 256, 1024, 64), by hand: area 262144; for each width w
# from 256 to 1024 the height is floor(262144 / w / 64) * 64 capped at 1024, e.g. w=320 -> 819 -> 768,
# w=448 -> 585 -> 576, w=704 -> 372 -> 320, w=832 -> 315 -> 256; both orientations, plus 512x512.
KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_bucket_list_matches_kohya_for_512():
    assert make_buckets((512, 512), 256, 1024, 64) == KOHYA_512
    assert make_buckets(512) == KOHYA_512


def test_buckets_keep_area_and_steps():
    for width, height in make_buckets((640, 448), 320, 960, 64):
        assert width % 64 == 0 and height % 64 == 0 and width * height <= 640 * 448
        assert 320 <= width <= 960 and 320 <= height <= 960


@pytest.mark.parametrize(
    "size, bucket",
    [
        ((768, 512), (640, 384)),  # aspect 1.5: 640/384 = 1.67 is nearer than 576/448 = 1.29
        ((512, 768), (384, 640)),
        ((1000, 1000), (512, 512)),
        ((576, 448), (576, 448)),  # an image the size of a bucket keeps it
        ((4000, 100), (1024, 256)),  # beyond the widest: the widest
    ],
)
def test_nearest_aspect_bucket(size, bucket):
    assert assign_bucket(size, KOHYA_512) == bucket


def test_select_bucket_resize_and_error():
    choice = select_bucket((768, 512), KOHYA_512)
    assert choice.resized_size == (640, 427)  # covers 640x384: widths match, height rounded
    assert choice.ar_error == pytest.approx(640 / 384 - 1.5)


def test_without_bucketing_one_bucket():
    assert assign_bucket((123, 456), [(512, 512)]) == (512, 512)


def test_no_upscale_small_images_keep_their_size_rounded_down():
    choice = select_bucket((300, 200), KOHYA_512, no_upscale=True, resolution=(512, 512))
    assert (choice.bucket, choice.resized_size) == ((256, 192), (300, 200))
    # larger than the area: scaled to 512*512 area first. 2000x1000 -> 724x362 -> height rounded
    # to 320 keeps the 2:1 aspect exactly (width rounding would give 704x320 = 2.2): 640x320.
    choice = select_bucket((2000, 1000), [], no_upscale=True, resolution=512)
    assert (choice.bucket, choice.resized_size) == ((640, 320), (640, 320))
    with pytest.raises(DatasetError, match="smaller than the bucket step"):
        select_bucket((50, 500), [], no_upscale=True, resolution=512)
    with pytest.raises(DatasetError, match="needs the training resolution"):
        select_bucket((50, 500), [], no_upscale=True)


@pytest.mark.parametrize("resolution", [(500, 512), (512, 100), 0, (768, 513)])
def test_resolution_not_a_multiple_of_64(resolution):
    with pytest.raises(DatasetError, match="not a multiple of 64"):
        make_buckets(resolution)
    with pytest.raises(DatasetError):
        check_resolution(resolution)


def test_bucket_range_errors():
    with pytest.raises(DatasetError, match="smaller than the resolution"):
        make_buckets((1024, 1024), 256, 768)
    with pytest.raises(DatasetError, match="multiples of the step"):
        make_buckets(512, 250, 1024)
    with pytest.raises(DatasetError, match="bucket step"):
        make_buckets(512, step=60)
