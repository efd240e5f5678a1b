"""The counted form of train_gpt.py (tools/submission/pack_script.py): exact round trips of its parts, and the packed file
importing where Triton really compiles kernels, which the interpreter that the other tests use would hide."""
import ast
import lzma
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

import train_gpt as tg
from conftest import REPO, SUBMISSION_TOOLS

import pack_script  # noqa: E402
import package_record  # noqa: E402

SCRIPT = os.path.join(REPO, "train_gpt.py")
LINECACHE_REGISTRATION = b"c.cache[f]=0,None,s.splitlines(1),f;"


@pytest.fixture(scope="module")
def source() -> str:
    with open(SCRIPT, encoding="utf-8") as f:
        return f.read()


def read_literal(literal: str) -> bytes:
    """What Python makes of the literal inside a Latin-1 source file, as the packed script's stub reads it."""
    program = b"#coding:latin-1\nvalue=" + literal.encode("latin-1") + b".encode('latin-1')\n"
    scope = {}
    exec(compile(program, "<literal>", "exec"), scope)
    return scope["value"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_latin1_literal_round_trips_any_bytes(data):
    assert read_literal(pack_script.latin1_literal(data)) == data


def test_latin1_literal_escapes_exactly_what_python_would_misread():
    tricky = b"\x00\x00" + b"\x000\x007\x008" + b"\\'\"\r\n\r\x85\x1a\x0c\xff\x00"
    literal = pack_script.latin1_literal(tricky)
    assert read_literal(literal) == tricky
    # a NUL before an octal digit needs the long escape, else "\0" + "7" would read as one character
    assert "\\x000" in literal and "\\x007" in literal and "\\08" in literal
    assert len(pack_script.latin1_literal(bytes(range(32, 256)).replace(b"\\", b"").replace(b"'", b""))) == 222 + 2


def unpacked_text(packed: bytes) -> str:
    literal = packed.split(b"lzma.decompress(", 1)[1].split(b".encode('latin-1')", 1)[0]
    return lzma.decompress(read_literal(literal.decode("latin-1"))).decode("utf-8")


@pytest.mark.parametrize("minifier", ["python-minifier", "ast"])
def test_packed_script_holds_the_minified_program(source, minifier):
    packed = pack_script.pack_source(source, minifier=minifier)
    assert pack_script.is_packed(packed) and packed.startswith(tg.PACKED_FIRST_LINE)
    assert len(packed.splitlines()) == 2 and len(packed) < len(source.encode()) / 5
    text = unpacked_text(packed)
    if minifier == "ast":  # the same syntax tree as the source without its docstrings
        assert ast.dump(ast.parse(text)) == ast.dump(ast.parse(pack_script.strip_docstrings(source)))
    else:
        assert text == pack_script.minify(source)
    with pytest.raises(ValueError):
        pack_script.pack_source(source, minifier="gzip")


def test_minifier_keeps_what_triton_and_the_dataclass_read(source):
    tree = ast.parse(pack_script.minify(source))
    kernels = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_softcap_ce_forward"}
    args = kernels["_softcap_ce_forward"].args.args
    assert [a.arg for a in args][-4:] == ["CAP", "VOCAB", "IGNORE", "BLOCK"]  # launched by keyword
    assert all(ast.unparse(a.annotation) == "tl.constexpr" for a in args[-4:])
    config = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters")
    assert sum(isinstance(s, ast.AnnAssign) for s in config.body) == len(tg.fields(tg.Hyperparameters))


def test_counted_code_bytes_of_the_readable_and_the_packed_script(source, tmp_path):
    packed = pack_script.pack_source(source)
    path = tmp_path / "train_gpt.py"
    path.write_bytes(packed)
    assert tg.counted_code_bytes(str(path)) == (len(packed), "")
    assert tg.counted_code_bytes(SCRIPT) == (len(packed), "")
    alone = tmp_path / "alone" / "train_gpt.py"  # a readable script without its packer beside it cannot be packed
    alone.parent.mkdir()
    alone.write_text(source, encoding="utf-8")
    size, note = tg.counted_code_bytes(str(alone))
    assert size == len(source.encode()) and "raw bytes" in note


def test_package_check_refuses_a_packed_script_that_real_triton_cannot_import(source, tmp_path):
    """The stub without its linecache registration is what shipped before: it ran under the interpreter only."""
    pytest.importorskip("triton")
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_bytes(pack_script.pack_source(source, minifier="ast"))
    bad.write_bytes(pack_script.pack_source(source, minifier="ast").replace(LINECACHE_REGISTRATION, b""))
    assert package_record.import_problems(str(good)) == []
    problems = package_record.import_problems(str(bad))
    assert len(problems) == 1 and "should be defined in a Python file" in problems[0]


def test_packing_tool_writes_the_file_it_reports(tmp_path):
    out = tmp_path / "packed.py"
    proc = subprocess.run([sys.executable, os.path.join(SUBMISSION_TOOLS, "pack_script.py"), str(out)],
                          capture_output=True, text=True, check=True)
    assert f"{out}: {out.stat().st_size} bytes packed" in proc.stdout
    assert tg.counted_code_bytes(SCRIPT)[0] == out.stat().st_size


def test_packing_tool_asked_for_help_prints_its_usage_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(SUBMISSION_TOOLS, "pack_script.py"), "--help"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "pack_script.py" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# Compiles each Triton kernel of the script at SCRIPT_PATH to a Hopper binary (sm_90), as the first training step
# would on the GPU: Triton needs no GPU to compile, so this catches in CI what the interpreter lets through.
COMPILE_KERNELS = """
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("submission", sys.argv[1])
tg = sys.modules["submission"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tg)
ce = dict(CAP=30.0, VOCAB=8192, IGNORE=tg.CE_IGNORE_INDEX, BLOCK=tg.CE_BLOCK)
bm, bn, bk, warps, stages = tg.MLP_TILES
mlp = dict(K=512, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, DOT_F32=False, EVEN=True)
kernels = [
    (tg._softcap_ce_forward, ["*bf16", "*i64", "*fp32", "*fp32", "i32"], ce, 4, 3),
    (tg._softcap_ce_backward, ["*bf16", "*i64", "*fp32", "*fp32", "*bf16", "i32", "i32"], ce, 4, 3),
    (tg._mlp_matmul, ["*bf16"] * 4 + ["i32"] * 6, dict(mlp, BACKWARD=False), warps, stages),
    (tg._mlp_matmul, ["*bf16"] * 4 + ["i32"] * 6, dict(mlp, BACKWARD=True), warps, stages),
]
for fn, types, constexprs, num_warps, num_stages in kernels:
    names = list(fn.signature.parameters)
    signature = {**dict(zip(names, types)), **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn, signature=signature, constexprs=constexprs)
    binary = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    print(fn.__name__, len(binary.asm["cubin"]))
"""


def test_packed_kernels_compile_for_hopper_with_real_triton(source, tmp_path):
    pytest.importorskip("triton")
    script = tmp_path / "train_gpt.py"
    script.write_bytes(pack_script.pack_source(source))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # a compile, not a cache hit
    proc = subprocess.run([sys.executable, "-c", COMPILE_KERNELS, str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = [line.split()[0] for line in proc.stdout.splitlines()]
    assert compiled == ["_softcap_ce_forward", "_softcap_ce_backward", "_mlp_matmul", "_mlp_matmul"]
