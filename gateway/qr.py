"""QR codes in images and PDFs, and the web addresses they lead to ("quishing": the link a
filter cannot read in the text, scanned by a phone outside the practice's protection).

CPU work for the worker process that reads attachments. Libraries: Pillow (image decoding,
header read first so an image's size is known before its pixels are), zxing-cpp (ZXing's C++
port: QR codes in a grey-scale image), pypdf (images inside PDFs).

Bounded: images of more than MAX_PIXELS are not decoded, sides longer than DECODE_SIDE are
scaled down first (a 4,000 x 4,000 photo is read in about 60-110 ms here: bench/RESULTS.md),
at most MAX_IMAGES images per message, in PDFs the first MAX_PDF_PAGES pages and
MAX_PDF_IMAGES images. QR codes drawn as vector paths in a PDF are not read.
"""

from __future__ import annotations

import io
import re
from typing import Any

import zxingcpp
from PIL import Image
from pypdf import PdfReader

MAX_PIXELS = 16_000_000
MAX_IMAGES = 20
MAX_PDF_PAGES = 3
MAX_PDF_IMAGES = 10
MAX_CODES = 5  # QR codes kept per image
DECODE_SIDE = 2000  # pixels a side images are read at
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp",
                         "image/x-ms-bmp", "image/tiff"})
_URL = re.compile(r"^\s*(?:https?://|www\.)\S+", re.IGNORECASE)

_QR = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own bomb guard, at the same bound


def image_links(data: bytes) -> list[str]:
    """The web addresses of the QR codes in an image ([] for anything unreadable)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS or min(width, height) < 21:
                return []
            # Large photos and scans are read at about 2,000 pixels a side: a JPEG decoder
            # scales while it decodes (draft), others are reduced after. A QR code meant to
            # be scanned by a phone survives it.
            factor = max(1, max(width, height) // DECODE_SIDE)
            if factor > 1 and img.format == "JPEG":
                img.draft("L", (width // factor, height // factor))
            return _links_in(img)
    except Exception:  # noqa: BLE001 - hostile images raise whatever the decoder raises
        return []


def pdf_links(data: bytes) -> tuple[list[str], int]:
    """The web addresses of the QR codes in the images of a PDF's first pages, and how many
    images were decoded."""
    links: list[str] = []
    decoded = 0
    try:
        reader = PdfReader(io.BytesIO(data))
        for page in reader.pages[:MAX_PDF_PAGES]:
            if not _images_fit(page):
                continue
            for image in page.images:
                if decoded >= MAX_PDF_IMAGES:
                    return links, decoded
                decoded += 1
                if image.image is not None:
                    links += _links_in(image.image)
    except Exception:  # noqa: BLE001 - hostile PDFs raise whatever pypdf raises
        pass
    return links, decoded


def _images_fit(page: Any) -> bool:
    """Every image of the page within MAX_PIXELS, read from its dictionary before decoding."""
    resources = page.get("/Resources")
    xobjects = resources.get_object().get("/XObject") if resources is not None else None
    if xobjects is None:
        return False
    for ref in xobjects.get_object().values():
        obj = ref.get_object()
        if obj.get("/Subtype") == "/Image" and \
                int(obj.get("/Width", 0)) * int(obj.get("/Height", 0)) > MAX_PIXELS:
            return False
    return True


def _links_in(img: Image.Image) -> list[str]:
    gray = img.convert("L")
    factor = max(gray.size) // DECODE_SIDE
    if factor > 1:
        gray = gray.reduce(factor)
    codes = zxingcpp.read_barcodes(gray, formats=_QR)
    return [c.text.strip()[:2048] for c in codes[:MAX_CODES] if _URL.match(c.text)]
