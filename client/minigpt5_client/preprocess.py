"""Image pre-processing: any image source -> RGB uint8 [224, 224, 3], as MiniGPT-5's vision encoder takes it.

The server runs these same functions on encoded image bytes (`image_bytes`), so a served request and
the in-process pipeline see identical pixels. Only PIL and numpy: importable without torch.

Modes (upstream MiniGPT-5's demo, examples/playground.py:49-61, and its dataloader):
- ``pad``: pad to a square on white, centred (upstream demo), then resize to 224 (bilinear).
- ``crop``: resize the shorter side to 224 (bilinear), then centre-crop 224 (upstream eval dataloader);
  the sizes and crop box are computed as torchvision's ``Resize(224)`` + ``CenterCrop(224)`` do.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .contract import IMAGE_SIZE
from .errors import ImageError, InvalidArgument

MAX_IMAGE_FILE_BYTES = 20 * 2**20  # encoded size of one image (file, download or bytes)
MAX_IMAGE_PIXELS = 40_000_000  # declared width x height, checked before decoding
URL_TIMEOUT_S = 10.0
PREPROCESS_MODES = ("pad", "crop")
WHITE = (255, 255, 255)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray


def load_image(
    source: ImageSource,
    *,
    max_file_bytes: int = MAX_IMAGE_FILE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    url_timeout: float = URL_TIMEOUT_S,
) -> Image.Image:
    """Read an image from a path, http(s) URL, encoded bytes, PIL image or numpy array (HxW or HxWxC uint8).

    Returns an RGB image, EXIF orientation applied, transparency composited onto white.
    Raises ImageError (one line, naming the limit or the problem) for anything unreadable or too big.
    """
    if isinstance(source, Image.Image):
        image = source
        _check_pixels(image.size, "PIL image", max_pixels)
        _load(image, "PIL image")
    elif isinstance(source, np.ndarray):
        image = _image_from_array(source, max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source), "image bytes", max_file_bytes, max_pixels)
    elif isinstance(source, (str, os.PathLike)):
        location = os.fspath(source)
        if isinstance(location, str) and location.lower().startswith(("http://", "https://")):
            data = _download(location, max_file_bytes, url_timeout)
            image = _decode(data, f"image {location}", max_file_bytes, max_pixels)
        else:
            data = _read_file(location, max_file_bytes)
            image = _decode(data, f"image file {location}", max_file_bytes, max_pixels)
    else:
        raise TypeError(f"unsupported image source type: {type(source).__name__}")
    # A broken EXIF block must not make an otherwise good image unusable.
    with contextlib.suppress(OSError, ValueError, SyntaxError, KeyError, TypeError):
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def preprocess_image(
    source: ImageSource,
    mode: str = "pad",
    size: int = IMAGE_SIZE,
    **limits,
) -> np.ndarray:
    """One image source -> uint8 array [size, size, 3]. ``limits`` go to load_image."""
    if mode not in PREPROCESS_MODES:
        raise InvalidArgument(f"image_preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {mode!r}")
    image = load_image(source, **limits)
    if mode == "pad":
        image = _pad_to_square(image).resize((size, size), Image.Resampling.BILINEAR)
    else:
        image = _resize_shorter_side_and_centre_crop(image, size)
    return np.asarray(image, dtype=np.uint8)


def preprocess_images(
    sources: Iterable[ImageSource],
    mode: str = "pad",
    size: int = IMAGE_SIZE,
    **limits,
) -> np.ndarray:
    """Image sources in prompt order -> uint8 array [N, size, size, 3] (N may be 0)."""
    sources = list(sources)
    arrays = []
    for index, source in enumerate(sources):
        try:
            arrays.append(preprocess_image(source, mode, size, **limits))
        except ImageError as error:
            if len(sources) == 1:
                raise
            raise ImageError(f"image {index + 1} of {len(sources)}: {error}") from error
    if not arrays:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack(arrays)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 HxWx3 array (decoding it gives back the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_file(path: str, max_file_bytes: int) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > max_file_bytes:
            raise ImageError(f"image file {path} is {_mib(size)}, over the {_mib(max_file_bytes)} limit")
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except OSError as error:
        raise ImageError(f"cannot read image file {path}: {error.strerror or error}") from None


def _download(url: str, max_file_bytes: int, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "minigpt5-client"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_file_bytes:
                raise ImageError(f"image {url} is {_mib(int(declared))}, over the {_mib(max_file_bytes)} limit")
            data = response.read(max_file_bytes + 1)
    except urllib.error.HTTPError as error:
        raise ImageError(f"cannot download image {url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise ImageError(f"cannot download image {url}: {error.reason}") from None
    except (TimeoutError, OSError) as error:
        raise ImageError(f"cannot download image {url}: {error or 'timed out'}") from None
    if len(data) > max_file_bytes:
        raise ImageError(f"image {url} is over the {_mib(max_file_bytes)} limit")
    return data


def _decode(data: bytes, what: str, max_file_bytes: int, max_pixels: int) -> Image.Image:
    if len(data) > max_file_bytes:
        raise ImageError(f"{what} is {_mib(len(data))}, over the {_mib(max_file_bytes)} limit")
    try:
        # Image.open only parses the header: the size check below runs before any pixel is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageError(f"{what} is over the {max_pixels / 1e6:g} megapixel limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"{what} is not a readable image ({_reason(error)})") from None
    _check_pixels(image.size, what, max_pixels)
    _load(image, what)
    return image


def _load(image: Image.Image, what: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Exception as error:  # PIL decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise ImageError(f"{what} could not be decoded ({_reason(error)})") from None


def _check_pixels(size: tuple[int, int], what: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"{what} is {width}x{height} ({width * height / 1e6:.1f} megapixels), "
            f"over the {max_pixels / 1e6:g} megapixel limit"
        )
    if width == 0 or height == 0:
        raise ImageError(f"{what} is empty ({width}x{height})")


def _image_from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"numpy image must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(f"numpy image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    _check_pixels((array.shape[1], array.shape[0]), "numpy image", max_pixels)
    return Image.fromarray(np.ascontiguousarray(array))  # L, RGB or RGBA from the shape


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # 16-bit grey: keep the top 8 bits (PIL's own conversion clips at 255 instead of scaling).
        grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("LA", "La", "PA", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        # Transparent areas become white, like the padding, rather than whatever colour they hide.
        flattened = Image.new("RGB", image.size, WHITE)
        flattened.paste(image, mask=image.getchannel("A"))
        return flattened
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, I, F, ...


def _pad_to_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), WHITE)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _resize_shorter_side_and_centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left = int(round((new_width - size) / 2.0))
    top = int(round((new_height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.3g} MiB"


def _reason(error: Exception) -> str:
    """PIL's message without the object reprs it embeds (`<_io.BytesIO object at 0x...>`)."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(error)) or type(error).__name__
