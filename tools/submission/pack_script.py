#!/usr/bin/env python3
"""Write the counted form of train_gpt.py: minified, LZMA-compressed, behind a two-line self-extracting stub.

  python3 tools/submission/pack_script.py OUT.py [SOURCE.py]

The packed script runs the same program as its source, wherever Triton is installed: Triton's @jit reads
each kernel's source through `inspect`, so the stub registers the unpacked text in `linecache` under the
packed file's own name before it compiles and runs it. Nothing is written to disk at run time.

Packing steps, each chosen by measuring the bytes it leaves (RESULTS.md, "Counted code"):
- python-minifier (a packing-time tool, `pip install python-minifier`): docstrings dropped, locals renamed
  (but never a Triton kernel's arguments), annotations removed except on function arguments (Triton reads
  `tl.constexpr` from them) and on class attributes (the dataclass needs its fields' types). Without it,
  `ast.unparse` with the docstrings dropped.
- LZMA in its .lzma ("alone") container at preset 9e with lc=3, lp=0, pb=0, the best setting for text.
- The compressed bytes written raw into a Latin-1 string literal (the file declares `coding:latin-1`), with
  only NUL, CR, LF, the backslash and the quote escaped: about 2% over the compressed size, where base85 adds 25%.

Run the packed script with DATA_PATH and TOKENIZER_PATH set: the smoke preset's paths are relative to the
script's own folder. Its size is what train_gpt.py logs as "Code size (packed)".
"""
from __future__ import annotations

import ast
import lzma
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(REPO, "train_gpt.py")

# The stub's first line; train_gpt.PACKED_FIRST_LINE must say the same, so a running script knows it is packed.
FIRST_LINE = b"#coding:latin-1\n"
STUB = ("import lzma,linecache as c;f=__file__;s=lzma.decompress({blob}.encode('latin-1')).decode();"
        "c.cache[f]=0,None,s.splitlines(1),f;exec(compile(s,f,'exec'))\n")
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}]
LITERAL_ESCAPES = {0x5C: "\\\\", 0x27: "\\'", 0x0A: "\\n", 0x0D: "\\r"}


def strip_docstrings(source: str) -> str:
    """The source through ast.unparse with every docstring dropped (comments go with the parse)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def triton_kernel_arguments(source: str) -> list[str]:
    """The argument names of every @triton.jit function. The minifier would give a frequently used argument a short
    local alias (`D=BLOCK_M`), and Triton does not carry constexpr-ness through such an assignment."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            names.update(a.arg for a in node.args.args)
    return sorted(names)


def minify(source: str) -> str:
    """python-minifier with the options that keep the program's behaviour (module docstring above)."""
    import python_minifier
    keep_needed_annotations = python_minifier.RemoveAnnotationsOptions(
        remove_variable_annotations=True, remove_return_annotations=True,
        remove_argument_annotations=False, remove_class_attribute_annotations=False)
    return python_minifier.minify(source, remove_annotations=keep_needed_annotations, remove_literal_statements=True,
                                  hoist_literals=False, rename_locals=True, rename_globals=False,
                                  preserve_locals=triton_kernel_arguments(source))


def latin1_literal(data: bytes) -> str:
    """A single-quoted str literal whose characters, encoded in Latin-1, are `data`."""
    out = []
    for i, byte in enumerate(data):
        if byte in LITERAL_ESCAPES:
            out.append(LITERAL_ESCAPES[byte])
        elif byte == 0:  # "\0" is one octal escape only when no octal digit follows it
            out.append("\\x00" if i + 1 < len(data) and 0x30 <= data[i + 1] <= 0x37 else "\\0")
        else:
            out.append(chr(byte))
    return "'" + "".join(out) + "'"


def pack_source(source: str, minifier: str = "python-minifier") -> bytes:
    """The packed script's bytes. `minifier`: "python-minifier" (ImportError when it is not installed) or "ast"."""
    if minifier not in ("python-minifier", "ast"):
        raise ValueError(f"minifier {minifier!r}: python-minifier or ast")
    text = minify(source) if minifier == "python-minifier" else strip_docstrings(source)
    blob = lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_ALONE, filters=LZMA_FILTERS)
    return FIRST_LINE + STUB.format(blob=latin1_literal(blob)).encode("latin-1")


def is_packed(script: bytes) -> bool:
    return script.startswith(FIRST_LINE + b"import lzma,linecache")


def main() -> None:
    if len(sys.argv) not in (2, 3) or sys.argv[1].startswith("-"):  # --help: the usage, not a file named so
        raise SystemExit(__doc__)
    source_path = sys.argv[2] if len(sys.argv) == 3 else SOURCE
    with open(source_path, encoding="utf-8") as f:
        source = f.read()
    try:
        packed = pack_source(source)
    except ImportError:
        raise SystemExit("python-minifier is not installed: pip install python-minifier (a packing-time tool; "
                         "requirements.txt pins the version whose output the logs count)") from None
    with open(sys.argv[1], "wb") as f:
        f.write(packed)
    print(f"{source_path}: {len(source.encode())} bytes -> {sys.argv[1]}: {len(packed)} bytes packed")


if __name__ == "__main__":
    main()
