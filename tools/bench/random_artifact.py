#!/usr/bin/env python3
"""Write an artifact of the model that the environment describes (train_gpt.py's variables), untrained: for timing
evaluation and TTT, whose cost depends on the model's shape, not on what it learned.

  python3 tools/bench/random_artifact.py OUT.artifact

The weights are train_gpt.py's initialisation, with the zero-initialised matrices (the blocks' output
projections, the gates) drawn small instead, so that every path carries signal and gradient as in a trained
model; then quantized round-to-nearest (no calibration data), serialized and compressed as an export does.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train_gpt as tg  # noqa: E402

ZERO_INIT_STD = 0.02  # the scale given to matrices that train_gpt.py initialises to zero


def random_model(h: tg.Hyperparameters) -> tg.GPT:
    torch.manual_seed(h.seed)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(std=ZERO_INIT_STD)
    return model


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):  # --help: the usage, not a file named so
        raise SystemExit(__doc__)
    t0 = time.perf_counter()
    h = tg.Hyperparameters.from_env()
    quantized = tg.quantize_state_dict(random_model(h).state_dict(), h, None)
    blob = tg.compress_artifact(tg.serialize_quantized(quantized), h.compressor, h.brotli_quality)
    with open(sys.argv[1], "wb") as f:
        f.write(blob)
    print(f"random artifact {sys.argv[1]}: {len(blob)} bytes in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
