#!/usr/bin/env python3
"""Fallback benchmark corpus, used when ../shared/bench/make_corpus.py is absent.

Deterministic (seeded): plain text, text+HTML alternatives and base64 attachments, whole
messages log-uniform between 2 KB and 2 MB, recipients @corp.example; writes manifest.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

WORDS = ("rendez-vous", "ordonnance", "patient", "analyse", "consultation", "courrier",
         "dossier", "suivi", "resultat", "bilan", "cabinet", "medecin", "secretariat", "facture",
         "planning")


def text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    n = 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(10))
        out.append(line)
        n += len(line) + 1
    return "\n".join(out) + "\n"


def make(rng: random.Random, i: int) -> tuple[bytes, dict[str, str]]:
    size = int(math.exp(rng.uniform(math.log(2_000), math.log(2_000_000))))
    sender = f"user{i % 50}@sender{i % 5}.example"
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = f"rcpt{i % 20}@corp.example"
    msg["Subject"] = f"Message {i}"
    msg["Date"] = "Thu, 01 Jan 2026 00:00:00 +0000"
    msg["Message-ID"] = f"<bench-{i}@sender{i % 5}.example>"
    kind = rng.random()
    if kind < 0.4 or size < 8_000:
        msg.set_content(text(rng, size))
    elif kind < 0.65:
        body = text(rng, size // 3)
        msg.set_content(body)
        msg.add_alternative(f"<html><body><p>{body}</p></body></html>", subtype="html")
    else:
        msg.set_content(text(rng, 1_000))
        blob = b"%PDF-1.7\n" + rng.randbytes(int(size * 0.74))
        msg.add_attachment(blob, maintype="application", subtype="pdf", filename=f"doc{i}.pdf")
    env = {"mail_from": sender, "rcpt_to": str(msg["To"])}
    return msg.as_bytes(policy=SMTP), env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("-o", required=True)
    args = ap.parse_args()
    out = Path(args.o)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20260101)
    manifest = []
    for i in range(1, args.n + 1):
        data, env = make(rng, i)
        name = f"msg-{i:05d}.eml"
        (out / name).write_bytes(data)
        manifest.append({"file": name, **env})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
