"""Image decoding, one request at a time: formats, modes, orientation, limits."""

import base64
import resource

import numpy as np
import pytest
from PIL import Image

from handlers import BadRequest, ImageGeometry, ImageLimits, PayloadTooLarge, UnsupportedMediaType, decode_image
from handlers.ready_made.image_input import image_bytes, to_rgb

from .images import animated_gif, bomb_png, encode, in_mode, photo, with_corrupt_exif, with_exif_orientation

GEOMETRY = ImageGeometry(resize=256, crop=224)
LIMITS = ImageLimits()


def mean_abs_diff(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("fmt, options", [
    ("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 90}), ("GIF", {}), ("BMP", {}), ("TIFF", {}),
])
def test_every_format_decodes_to_an_rgb_uint8_crop_close_to_the_original(fmt, options):
    original = photo()
    pixels = decode_image(encode(original, fmt, **options), GEOMETRY, LIMITS)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    reference = decode_image(encode(original, "PNG"), GEOMETRY, LIMITS)
    # Lossy formats (and GIF's 256-colour palette) differ a little, never wildly.
    assert mean_abs_diff(pixels, reference) < 12


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode):
    image = in_mode(photo(), mode)
    assert image.mode == mode
    fmt = "TIFF" if mode in ("CMYK", "F", "I") else "PNG"
    pixels = decode_image(encode(image, fmt), GEOMETRY, LIMITS)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 10  # a real picture, not a blank


def test_16_bit_greyscale_is_rescaled_not_clipped():
    levels = np.array([[0, 32896, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(levels)))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_flattened_onto_white():
    clear = Image.new("RGBA", (300, 300), (10, 20, 30, 0))
    pixels = decode_image(encode(clear, "PNG"), GEOMETRY, LIMITS)
    assert pixels.min() == 255


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_honoured(orientation):
    upright = decode_image(encode(photo(), "JPEG", quality=95), GEOMETRY, LIMITS)
    rotated = decode_image(with_exif_orientation(photo(), orientation), GEOMETRY, LIMITS)
    assert mean_abs_diff(rotated, upright) < 3
    ignored = decode_image(encode(photo().rotate(90, expand=True), "JPEG", quality=95), GEOMETRY, LIMITS)
    assert mean_abs_diff(ignored, upright) > 20  # the check above could fail


def test_draft_decoding_of_a_12_megapixel_jpeg_is_close_to_full_decoding():
    big = encode(photo(size=(4032, 3024)), "JPEG", quality=90)
    drafted = decode_image(big, ImageGeometry(256, 224, draft=True), LIMITS)
    full = decode_image(big, ImageGeometry(256, 224, draft=False), LIMITS)
    assert mean_abs_diff(drafted, full) < 3


def test_the_first_frame_of_an_animated_gif_is_used():
    pixels = decode_image(animated_gif([(255, 0, 0), (0, 0, 255)]), GEOMETRY, LIMITS)
    assert pixels[..., 0].min() > 200 and pixels[..., 2].max() < 50


@pytest.mark.timeout(10)
def test_a_decompression_bomb_is_refused_before_its_pixels_are_allocated():
    bomb = bomb_png(60_000, 60_000)  # 3.6 gigapixels = 10.8 GB as RGB, in a file of under 100 bytes
    assert len(bomb) < 100
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(bomb, GEOMETRY, LIMITS)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 50_000


def test_an_image_over_the_pixel_limit_is_a_413_naming_both_numbers():
    with pytest.raises(PayloadTooLarge, match=r"640x480 = 307,200 pixels; the limit is 100,000"):
        decode_image(encode(photo(size=(640, 480)), "PNG"), GEOMETRY, ImageLimits(max_pixels=100_000))


def test_a_body_over_the_byte_limit_is_a_413():
    with pytest.raises(PayloadTooLarge, match="bytes; the limit is 1,000"):
        decode_image(encode(photo(), "PNG"), GEOMETRY, ImageLimits(max_bytes=1000))


@pytest.mark.parametrize("body, error", [
    (b"", BadRequest),
    (b"this is a text file, not a picture\n", UnsupportedMediaType),
    (bytes(range(256)) * 4, UnsupportedMediaType),
])
def test_bytes_that_are_not_an_image(body, error):
    with pytest.raises(error):
        decode_image(body, GEOMETRY, LIMITS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_is_a_400(fmt):
    data = encode(photo(), fmt)
    with pytest.raises(BadRequest, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], GEOMETRY, LIMITS)


def test_base64_in_json_text_and_data_urls_give_the_same_bytes():
    data = encode(photo(), "PNG")
    text = base64.b64encode(data).decode()
    assert image_bytes({"image": text}) == data
    assert image_bytes(text) == data
    assert image_bytes("data:image/png;base64," + text) == data


@pytest.mark.parametrize("body", [{"image": "not base64!!"}, "%%%%", {"image": 42}, {"picture": "AAAA"}, 3.5])
def test_bad_base64_or_json_is_a_400(body):
    with pytest.raises(BadRequest):
        image_bytes(body)


@pytest.mark.parametrize("tag, raised", [(0x0115, "struct.error"), (0x013F, "TypeError")])
def test_a_rotated_jpeg_with_a_corrupt_exif_block_is_a_400_not_a_500(tag, raised):
    # Pillow's exif_transpose rewrites the EXIF block after rotating and raised struct.error or
    # TypeError on a mistyped tag (3 of 412 mutated EXIF blocks): that used to be a 500.
    with pytest.raises(BadRequest, match=f"EXIF metadata is corrupt: {raised}"):
        decode_image(with_corrupt_exif(photo(), 6, tag), GEOMETRY, LIMITS)
