#!/usr/bin/env python3
"""Write the counted form of train_gpt.py: docstrings and comments dropped, LZMA + base85, a two-line stub.

  python3 tools/pack_script.py OUT.py [SOURCE.py]

The packed script runs the same program (run it with DATA_PATH and TOKENIZER_PATH set: the smoke preset's
paths are relative to the script's own folder). Its size is what train_gpt.py logs as "Code size (packed)".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_gpt import pack_source  # noqa: E402


def main() -> None:
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    source_path = sys.argv[2] if len(sys.argv) == 3 else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_gpt.py")
    with open(source_path, encoding="utf-8") as f:
        source = f.read()
    packed = pack_source(source)
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        f.write(packed)
    print(f"{source_path}: {len(source.encode())} bytes -> {sys.argv[1]}: {len(packed.encode())} bytes packed")


if __name__ == "__main__":
    main()
