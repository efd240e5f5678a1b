#!/usr/bin/env python3
"""Convert Debian's dict-devil package (The Devil's Dictionary, Ambrose Bierce, public domain) into
devils_dictionary.jsonl.xz: one JSON line {"text": ...} per dictionary entry, in the book's order.

    apt-get download dict-devil          # dict-devil_1.0-13.1_all.deb
    python3 data/sample/make_devils_dictionary.py dict-devil_1.0-13.1_all.deb data/sample/devils_dictionary.jsonl.xz

The package holds the dictd database (usr/share/dictd/devil.index and devil.dict.dz). The index lists
"headword<TAB>offset<TAB>length" with dictd's base64 numbers; entries whose headword starts with
"00database" are dictd metadata (the database's URL, short name and the text's preface/header), and are left
out, as are repeated index lines that point at the same text (alternative headwords).
"""
from __future__ import annotations

import gzip
import io
import json
import lzma
import sys
import tarfile

DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(s: str) -> int:
    value = 0
    for ch in s:
        value = value * 64 + DICTD_B64.index(ch)
    return value


def deb_members(deb_path: str) -> dict[str, bytes]:
    """Files of a .deb's data archive (an `ar` archive holding data.tar.*), by path without the leading './'."""
    with open(deb_path, "rb") as f:
        blob = f.read()
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb_path}: not a Debian package (no ar header)")
    pos, data_tar = 8, None
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            data_tar = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    if data_tar is None:
        raise SystemExit(f"{deb_path}: no data.tar.* member")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
        for member in tar.getmembers():
            if member.isfile():
                files[member.name.lstrip("./")] = tar.extractfile(member).read()
    return files


def entries(index_text: str, dict_bytes: bytes) -> list[str]:
    seen, spans = set(), []
    for line in index_text.splitlines():
        headword, offset, length = line.split("\t")
        if headword.startswith("00database"):
            continue
        span = (dictd_number(offset), dictd_number(length))
        if span not in seen:
            seen.add(span)
            spans.append(span)
    spans.sort()
    texts = []
    for start, length in spans:
        text = dict_bytes[start:start + length].decode("utf-8").rstrip()
        if text:
            texts.append(text)
    return texts


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    deb_path, out_path = sys.argv[1:]
    files = deb_members(deb_path)
    index_text = files["usr/share/dictd/devil.index"].decode("utf-8")
    dict_bytes = gzip.decompress(files["usr/share/dictd/devil.dict.dz"])  # dictzip is gzip-compatible
    texts = entries(index_text, dict_bytes)
    payload = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
    with lzma.open(out_path, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(payload)
    print(f"{out_path}: {len(texts)} entries, {len(payload):,} bytes of JSON lines")


if __name__ == "__main__":
    main()
