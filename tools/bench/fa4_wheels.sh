#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4: CuTe DSL kernels, Hopper's among them) for a GPU machine that has no package
# index, from the repo root. Its CUDA 13 library wheel (92 MB) exceeds what one device call carries (64 MiB), so it
# travels recompressed (xz) and split over two calls:
#   tools/bench/fa4_wheels.sh pack       # here (PyPI reachable): the wheels into .fa4a/ and .fa4b/ (git-ignored)
#   tools/bench/fa4_wheels.sh stage a    # device call 1, carry [".fa4a"]: the first part to /tmp/fa4
#   tools/bench/fa4_wheels.sh stage b    # device call 2, carry [".fa4b"]: the rest; installs into /tmp/fa4/site
# then `PYTHONPATH=/tmp/fa4/site:/tmp/fa4/site/nvidia_cutlass_dsl/dsl_packages python3 tools/bench/attention_bench.py`
# times its cases (fa4_*): the second entry is what the package's .pth file adds in a site-packages, which a
# PYTHONPATH entry does not read. The two calls must follow each other while the machine is held (/tmp is lost
# when it is given back).
set -eu
VERSION=4.0.0b36 DSL=4.8.1
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
case "${1:-}" in
pack)
  tmp=$(mktemp -d)
  for p in flash-attn-4==$VERSION nvidia-cutlass-dsl==$DSL nvidia-cutlass-dsl-libs-base==$DSL \
           nvidia-cutlass-dsl-libs-core==$DSL nvidia-cutlass-dsl-libs-cu13==$DSL quack-kernels apache-tvm-ffi \
           torch-c-dlpack-ext; do
    python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$tmp" "$p"
  done
  mkdir -p "$tmp/libs" && (cd "$tmp/libs" && unzip -q "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl)
  rm "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl
  rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
  (cd "$tmp/libs" && tar cf - .) | xz -9 -T0 | split -b 33000000 - .fa4a/libs_cu13.tar.xz.part-
  mv .fa4a/libs_cu13.tar.xz.part-a[b-z] .fa4b/ && mv "$tmp"/*.whl .fa4b/
  rm -rf "$tmp"
  du -sh .fa4a .fa4b
  ;;
stage)
  mkdir -p /tmp/fa4
  case "${2:-}" in
    a) cp .fa4a/* /tmp/fa4/ ;;
    b) cp .fa4b/* /tmp/fa4/
       # the wheels first: pip --upgrade --target replaces the top-level folders it installs, the libraries'
       # nvidia_cutlass_dsl/ among them, so the CUDA 13 libraries are unpacked into it afterwards
       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fa4/site \
           /tmp/fa4/*.whl
       cat /tmp/fa4/libs_cu13.tar.xz.part-* | xz -d | tar xf - -C /tmp/fa4/site
       PYTHONPATH=/tmp/fa4/site:/tmp/fa4/site/nvidia_cutlass_dsl/dsl_packages python3 -c \
           "import flash_attn.cute.interface as f; print('flash-attn-4 imports:', f.__file__)" ;;
    *) echo "usage: $0 stage a|b" >&2; exit 2 ;;
  esac
  ;;
*)
  echo "usage: $0 pack | stage a|b" >&2; exit 2 ;;
esac
