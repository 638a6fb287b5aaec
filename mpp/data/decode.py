"""An image cell of a `datasets` table, decoded here to uint8 [3, H, W] RGB (mpp.data.table_readers reads
every image through these): decoded at once, so a truncated file fails where it is read, with its path,
and not in a transform; any PIL mode or pixel type converted by the conventions of the files that hold it.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import PIL.Image
import torch

# What PIL raises for a file that is not a readable image: unknown format, truncated data, bad headers.
UNREADABLE = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)


def open_image(cell: Any) -> Any:
    """A `datasets` image cell stored undecoded ({"path", "bytes"}) → a PIL image decoded now, so a
    truncated file fails here and not in a transform; anything else (PIL image, array) as it is."""
    if not isinstance(cell, dict):
        return cell
    image = PIL.Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])
    image.load()
    return image


def rgb_tensor(image: Any) -> torch.Tensor:
    """A decoded image of any PIL mode (L, P, RGBA, CMYK, 16-bit, 32-bit int or float ...) or an array ->
    uint8 [3, H, W] RGB. Pixels wider than a byte are scaled by their range (`byte_values`): PIL's
    own convert would clip them, so a float image in [0, 1] or 8-bit values stored in 16 bits came out black."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    if not isinstance(image, PIL.Image.Image):
        values = np.asarray(image)
        image = PIL.Image.fromarray(values if values.dtype in (np.uint8, np.bool_) else byte_values(values))
    elif image.mode == "F" or image.mode.startswith("I"):  # one channel of float32, int32 or uint16 values
        image = PIL.Image.fromarray(byte_values(np.asarray(image)))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
    return pil_to_tensor(image.convert("RGB"))  # uint8 [3, H, W]


def byte_values(values: np.ndarray) -> np.ndarray:
    """Integer or float pixels -> uint8, by the range the values lie in, the conventions of the files
    that hold them: 0..255 as they are (8-bit data saved wider, e.g. by astype(np.uint16)); integers up
    to 65535 as 16-bit (the top byte: 16-bit PNG and TIFF); floats in [0, 1] times 255 (the float-image
    convention); anything else (negative values, 32-bit counts, floats beyond 255) stretched from the
    image's own minimum to its maximum. NaN or infinite pixels: unreadable (ValueError), not guessed."""
    values = np.asarray(values)
    if values.dtype.kind not in "iuf":
        raise ValueError(f"pixels of type {values.dtype} are not numbers")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError("the image holds NaN or infinite pixel values")
    low, high = (values.min(), values.max()) if values.size else (0, 0)
    if values.dtype.kind == "f" and 0 <= low and high <= 1:
        return np.rint(values * 255).astype(np.uint8)
    if 0 <= low and high <= 255:
        return np.rint(values).astype(np.uint8)  # rint: a no-op on integers, the nearest byte for floats
    if values.dtype.kind in "iu" and 0 <= low and high <= 65535:
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    span = float(high) - float(low) or 1.0  # a constant image outside 0..255 becomes black: no range to show
    return np.rint((values.astype(np.float64) - low) * (255 / span)).astype(np.uint8)
