"""Client-side image pre-processing: every input kind, EXIF, colour modes, pad/crop, limits."""

from __future__ import annotations

import functools
import http.server
import io
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minigpt5_client.errors import ImageError, InvalidArgument
from minigpt5_client.preprocess import encode_png, load_image, preprocess_image, preprocess_images

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"


def photo(width=300, height=200, seed=0) -> np.ndarray:
    """A smooth RGB test picture (gradients + noise), uint8 HxWx3."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    return (picture + rng.integers(0, 20, picture.shape)).clip(0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    return encode_png(array)


@pytest.fixture(scope="module")
def file_server(tmp_path_factory):
    """A local HTTP server for URL inputs: serves files from a temporary directory."""
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_every_input_kind_gives_the_same_pixels(tmp_path, file_server):
    array = photo()
    encoded = png_bytes(array)
    path = tmp_path / "photo.png"
    path.write_bytes(encoded)
    www, base_url = file_server
    (www / "photo.png").write_bytes(encoded)

    expected = preprocess_image(array)
    sources = [
        str(path),
        path,
        encoded,
        bytearray(encoded),
        Image.open(io.BytesIO(encoded)),
        array,
        f"{base_url}/photo.png",
    ]
    for source in sources:
        assert np.array_equal(preprocess_image(source), expected), type(source)
    assert expected.shape == (224, 224, 3) and expected.dtype == np.uint8


def test_pad_centres_the_image_on_white():
    red = np.zeros((100, 200, 3), np.uint8)
    red[..., 0] = 255
    padded = preprocess_image(red, "pad")
    assert (padded[:50] == 255).all() and (padded[-50:] == 255).all()  # white bands above and below
    assert (padded[60:164, :, 0] == 255).all() and (padded[60:164, :, 1:] == 0).all()  # red middle, full width


def test_crop_keeps_the_centre():
    stripes = np.zeros((100, 300, 3), np.uint8)  # blue | red | blue, the red third in the middle
    stripes[:, :, 2] = 255
    stripes[:, 100:200] = (255, 0, 0)
    cropped = preprocess_image(stripes, "crop")
    assert cropped.shape == (224, 224, 3)
    assert (cropped[:, 20:204, 0] == 255).all() and (cropped[:, 20:204, 2] == 0).all()


@pytest.mark.parametrize("width,height", [(225, 301), (640, 224), (223, 1000), (50, 60)])
def test_odd_sizes_give_224_squares(width, height):
    for mode in ("pad", "crop"):
        assert preprocess_image(photo(width, height), mode).shape == (224, 224, 3)


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_a_preprocessed_square_passes_through_unchanged(mode):
    """What the HTTP transport relies on: a 224x224 PNG is pre-processed to the very same pixels."""
    square = photo(224, 224, seed=3)
    assert np.array_equal(preprocess_image(png_bytes(square), mode), square)


def test_deterministic():
    source = png_bytes(photo(333, 251, seed=5))
    assert np.array_equal(preprocess_image(source, "crop"), preprocess_image(source, "crop"))


def test_exif_orientation_is_applied():
    image = Image.fromarray(photo(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (20, 40)


def _encoded(image: Image.Image, format="PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_colour_modes_become_rgb():
    grey = Image.fromarray(np.full((8, 8), 100, np.uint8))
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    grey16 = Image.fromarray(np.full((8, 8), 0x8000, np.uint16))
    cases = {
        "L": (_encoded(grey), (100, 100, 100)),
        "RGBA transparent": (_encoded(transparent), (255, 255, 255)),  # transparency becomes white
        "LA": (_encoded(grey.convert("LA")), (100, 100, 100)),
        "P transparent": (_encoded(palette), (255, 255, 255)),
        "CMYK": (_encoded(cmyk, "JPEG", quality=100), None),
        "16-bit grey": (_encoded(grey16), (128, 128, 128)),
    }
    for name, (data, colour) in cases.items():
        image = load_image(data)
        assert image.mode == "RGB", name
        if colour is not None:
            assert image.getpixel((4, 4)) == colour, name
    red = load_image(cases["CMYK"][0]).getpixel((4, 4))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_numpy_shapes():
    grey = np.full((30, 40), 7, np.uint8)
    assert load_image(grey).getpixel((0, 0)) == (7, 7, 7)
    assert load_image(grey[..., None]).getpixel((0, 0)) == (7, 7, 7)
    rgba = np.zeros((30, 40, 4), np.uint8)
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match="uint8"):
        load_image(grey.astype(np.float32))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((30, 40, 2), np.uint8))


def test_several_images_keep_prompt_order():
    first, second = photo(seed=1), photo(seed=2)
    batch = preprocess_images([first, png_bytes(second)], "crop")
    assert batch.shape == (2, 224, 224, 3)
    assert np.array_equal(batch[0], preprocess_image(first, "crop"))
    assert np.array_equal(batch[1], preprocess_image(second, "crop"))
    assert preprocess_images([]).shape == (0, 224, 224, 3)


def test_unknown_mode_is_invalid():
    with pytest.raises(InvalidArgument, match="pad, crop"):
        preprocess_image(photo(), "stretch")


def test_file_size_limit(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(photo()))
    with pytest.raises(ImageError, match="over the .* MiB limit"):
        load_image(path, max_file_bytes=1000)
    with pytest.raises(ImageError, match="over the .* MiB limit"):
        load_image(path.read_bytes(), max_file_bytes=1000)


def test_pixel_limit():
    with pytest.raises(ImageError, match=r"300x200 \(0.1 megapixels\), over the 0.01 megapixel limit"):
        load_image(png_bytes(photo()), max_pixels=10_000)
    with pytest.raises(ImageError, match="megapixel limit"):
        load_image(photo(), max_pixels=10_000)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's header)."""
    data = png_bytes(np.zeros((1, 1, 3), np.uint8))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def test_decompression_bomb_is_refused_from_its_header():
    for side in (10_000, 100_000):  # 100 MP (over our limit), 10 GP (over PIL's own bomb limit too)
        with pytest.raises(ImageError, match="megapixel limit"):
            load_image(bomb_png(side, side))


def test_unreadable_inputs(tmp_path, file_server):
    encoded = png_bytes(photo())
    with pytest.raises(ImageError, match="not a readable image") as refused:
        load_image(b"definitely not an image")
    assert " at 0x" not in str(refused.value)  # no object reprs from PIL in what the user reads
    with pytest.raises(ImageError, match="could not be decoded"):
        load_image(encoded[: len(encoded) // 2])  # truncated
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path)  # a directory
    _, base_url = file_server
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(f"{base_url}/missing.png")
    with pytest.raises(TypeError):
        load_image(42)


def test_download_size_limit(file_server):
    www, base_url = file_server
    (www / "large.png").write_bytes(png_bytes(photo(600, 400)))
    with pytest.raises(ImageError, match="MiB limit"):
        load_image(f"{base_url}/large.png", max_file_bytes=10_000)


def test_error_names_the_image_among_several():
    with pytest.raises(ImageError, match="^image 2 of 2: image bytes is not a readable image"):
        preprocess_images([photo(), b"garbage"])


def test_importing_the_client_loads_no_torch_and_no_transport():
    code = (
        "import sys, minigpt5_client, minigpt5_client.preprocess; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'diffusers', "
        "'tritonclient', 'grpc', 'aiohttp'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(CLIENT_DIR), "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip() == "[]"
