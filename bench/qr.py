#!/usr/bin/env python3
"""What reading QR codes costs (gateway.qr.Reader.image, as the worker runs it per image).

    python bench/qr.py

The images of the benchmark corpus (bench/out/corpus-shared-500, made by bench/run.py), then
4,000 x 4,000 images (a blank PNG, a JPEG of noise): the issue's bound is 200 ms.
"""

from __future__ import annotations

import email
import io
import sys
import time
from email import policy
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gateway.qr import Reader  # noqa: E402


def main() -> None:
    files = sorted((HERE / "out" / "corpus-shared-500").glob("*.eml"))
    images = []
    for f in files:
        msg = email.message_from_binary_file(f.open("rb"), policy=policy.default)
        images += [p.get_payload(decode=True) for p in msg.walk()
                   if p.get_content_maintype() == "image"]
    if images:
        start = time.perf_counter()
        reader = Reader(budget_s=1e9, max_images=10**9)
        for data in images:
            reader.image("corpus", data)
        spent = time.perf_counter() - start
        print(f"corpus: {len(files)} messages, {len(images)} images, "
              f"{spent * 1000 / len(images):.2f} ms per image, "
              f"{spent * 1000 / len(files):.2f} ms per message")
    for kind in ("PNG", "JPEG"):
        img = Image.new("L", (4000, 4000), 255) if kind == "PNG" else \
            Image.effect_noise((4000, 4000), 64)
        buf = io.BytesIO()
        img.save(buf, kind)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            Reader().image("4000", buf.getvalue())
            times.append(time.perf_counter() - start)
        print(f"4000x4000 {kind}: {min(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
