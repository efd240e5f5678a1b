"""Tests of the data tools: the shard format, data/prepare_corpus.py, the bundled sample, and
data/cached_challenge_fineweb.py against a loopback server that fakes the Hugging Face Hub.

CPU only, no network beyond 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import lzma
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from train_gpt import (  # noqa: E402
    BOS_ID, SHARD_HEADER_BYTES, SHARD_MAGIC, SHARD_VERSION, ShardError, read_shard, read_shard_header, write_shard,
)

PREPARE = os.path.join(REPO, "data", "prepare_corpus.py")
DOWNLOAD = os.path.join(REPO, "data", "cached_challenge_fineweb.py")
SAMPLE_DIR = os.path.join(REPO, "data", "sample")
SAMPLE_TOKENIZER = os.path.join(REPO, "tokenizers", "sample_1024_bpe.model")


def run(args, env=None, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)


def prepare(args, capsys):
    """Run data/prepare_corpus.py's main in this process (spares a torch import per run); (rc, stdout, stderr)."""
    sys.path.insert(0, os.path.join(REPO, "data"))
    import prepare_corpus

    capsys.readouterr()
    try:
        rc = prepare_corpus.main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def split_documents(tokens: np.ndarray) -> list[np.ndarray]:
    """Documents of a token stream that starts with BOS and has one BOS before every document."""
    assert tokens.size and tokens[0] == BOS_ID, "the stream must start with BOS"
    starts = np.flatnonzero(tokens == BOS_ID)
    ends = list(starts[1:]) + [tokens.size]
    return [tokens[s + 1:e] for s, e in zip(starts, ends)]


def concat_split(directory: str, split: str) -> np.ndarray:
    paths = sorted(p for p in os.listdir(directory) if re.fullmatch(rf"fineweb_{split}_\d{{6}}\.bin", p))
    assert paths, f"no {split} shards in {directory}"
    return np.concatenate([np.asarray(read_shard(os.path.join(directory, p))) for p in paths])


# ----------------------------------------------------------------------------------------------------
# Shard format
# ----------------------------------------------------------------------------------------------------

def test_shard_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65536, size=12345).astype(np.uint16)
    tokens[:2] = (0, 65535)
    path = str(tmp_path / "fineweb_train_000000.bin")
    write_shard(path, tokens)
    assert os.path.getsize(path) == SHARD_HEADER_BYTES + 2 * tokens.size
    assert read_shard_header(path) == tokens.size
    assert np.array_equal(read_shard(path), tokens)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p], "write_shard left a temporary file"
    empty = str(tmp_path / "empty.bin")
    write_shard(empty, np.array([], dtype=np.uint16))
    assert read_shard(empty).size == 0


def test_write_shard_refuses_ids_outside_uint16(tmp_path):
    path = str(tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="uint16"):
        write_shard(path, np.array([1, 70000]))
    assert not os.path.exists(path)


def _header(magic=SHARD_MAGIC, version=SHARD_VERSION, count=4):
    h = np.zeros(256, dtype="<i4")
    h[:3] = (magic, version, count)
    return h.tobytes()


@pytest.mark.parametrize("name,content,message", [
    ("magic.bin", _header(magic=12345) + b"\0" * 8, "magic"),
    ("version.bin", _header(version=2) + b"\0" * 8, "version"),
    ("truncated.bin", _header(count=4) + b"\0" * 7, "truncated"),
    ("toolong.bin", _header(count=4) + b"\0" * 10, "4 tokens"),
    ("short.bin", _header()[:100], "shorter than"),
])
def test_read_shard_refuses_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    for reader in (read_shard_header, read_shard):
        with pytest.raises(ShardError, match=message) as info:
            reader(str(path))
        assert str(path) in str(info.value)


def test_read_shard_refuses_missing_file(tmp_path):
    path = str(tmp_path / "nope" / "fineweb_val_000000.bin")
    with pytest.raises(ShardError, match="not found") as info:
        read_shard(path)
    assert path in str(info.value)


# ----------------------------------------------------------------------------------------------------
# prepare_corpus.py
# ----------------------------------------------------------------------------------------------------

WORDS = ("the quick brown fox jumps over lazy dog while seven wizards quietly hex judges "
         "and sphinx of black quartz judge my vow pack box with five dozen liquor jugs").split()


def make_documents(n: int, seed: int) -> list[str]:
    """Texts the nmt_nfkc normalizer leaves unchanged: single spaces, no leading or trailing space, NFKC-stable
    characters; a few carry é (in the tokenizer's alphabet, probably) and 中 (rare: byte fallback)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=int(rng.integers(5, 40)))]
        words[0] = words[0].capitalize()
        words.append(str(int(rng.integers(0, 100000))))
        if i % 7 == 0:
            words.append("café")
        if i % 50 == 3:
            words.append("中文")
        docs.append(f"Doc {i}: " + " ".join(words) + ".")
    return docs


def write_jsonl(path, texts, compress=False, extra_lines=()):
    lines = [json.dumps({"text": t, "source": "test"}, ensure_ascii=False) for t in texts] + list(extra_lines)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if compress:
        data = lzma.compress(data)
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """As a subprocess, the way people run it."""
    """A tiny corpus in two files (one xz), 10% held out by --val-fraction, a 400-piece tokenizer."""
    tmp = tmp_path_factory.mktemp("prepared")
    docs = make_documents(300, seed=1)
    f1 = write_jsonl(tmp / "part1.jsonl", docs[:150], extra_lines=[""])
    f2 = write_jsonl(tmp / "part2.jsonl.xz", docs[150:], compress=True)
    out = tmp / "shards"
    r = run([PREPARE, "--train", f1, f2, "--val-fraction", "0.1", "--vocab-size", "400",
             "--tokenizer-prefix", str(tmp / "tok" / "test_400_bpe"), "--out-dir", str(out),
             "--shard-tokens", "2000", "--no-progress"])
    assert r.returncode == 0, r.stderr
    return {"docs": docs, "out": str(out), "model": str(tmp / "tok" / "test_400_bpe.model"), "stdout": r.stdout}


def test_prepare_tokenizer_settings(prepared):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=prepared["model"])
    assert sp.vocab_size() == 400
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    # byte fallback: ids 4..259 are the byte pieces, and an unseen character becomes its UTF-8 bytes
    assert sp.id_to_piece(4) == "<0x00>" and sp.id_to_piece(259) == "<0xFF>"
    assert all(sp.is_byte(i) for i in range(4, 260))
    assert sp.encode("ঌ", out_type=str) == ["<0xE0>", "<0xA6>", "<0x8C>"]
    assert sp.unk_id() not in sp.encode("ঌ Ω ∑")
    # split_digits: no piece spans two digits
    assert sp.encode("1234567", out_type=str) == list("1234567")
    # no dummy prefix: the first word is not given a leading "▁"
    assert not sp.encode("quick", out_type=str)[0].startswith("\u2581")
    # normalizer: nmt_nfkc (ﬁ -> fi), extra whitespace removed
    assert sp.decode(sp.encode("  over   the\nlazy ")) == "over the lazy"
    assert sp.decode(sp.encode("ﬁ")) == "fi"
    assert sp.piece_to_id("\u2581") != sp.unk_id(), "'▁' should be a piece of its own, as in the published models"


def test_prepare_documents_round_trip(prepared):
    import sentencepiece as spm

    sys.path.insert(0, os.path.join(REPO, "data"))
    from prepare_corpus import is_val_document

    sp = spm.SentencePieceProcessor(model_file=prepared["model"])
    docs = prepared["docs"]
    expected_val = [d for d in docs if is_val_document(d, 0.1)]
    expected_train = [d for d in docs if not is_val_document(d, 0.1)]
    assert 10 <= len(expected_val) <= 60  # about 10% of 300
    assert len(os.listdir(prepared["out"])) > 2, "--shard-tokens 2000 should give several train shards"
    for split, expected in (("val", expected_val), ("train", expected_train)):
        tokens = concat_split(prepared["out"], split)
        assert tokens[0] == BOS_ID and tokens.max() < 400
        decoded = [sp.decode(d.tolist()) for d in split_documents(tokens)]
        assert decoded == expected
    assert not set(expected_val) & set(expected_train)
    assert f"val: {len(expected_val)} documents" in prepared["stdout"]


def test_prepare_with_val_files_and_existing_tokenizer(tmp_path, prepared, capsys):
    import sentencepiece as spm

    docs = make_documents(40, seed=2)
    train = write_jsonl(tmp_path / "train.jsonl", docs[:30] + [docs[31]])  # docs[31] is also a val document
    val = write_jsonl(tmp_path / "val.jsonl.xz", docs[30:], compress=True)
    out = tmp_path / "out"
    rc, _, err = prepare(["--train", train, "--val", val, "--tokenizer", prepared["model"], "--out-dir", out,
                          "--no-progress"], capsys)
    assert rc == 0, err
    assert "dropped 1 training documents identical to validation documents" in err
    sp = spm.SentencePieceProcessor(model_file=prepared["model"])
    val_docs = [sp.decode(d.tolist()) for d in split_documents(concat_split(str(out), "val"))]
    train_docs = [sp.decode(d.tolist()) for d in split_documents(concat_split(str(out), "train"))]
    assert val_docs == docs[30:]
    assert train_docs == docs[:30]
    # a second run refuses to mix with the shards already there unless told to replace them
    rc, _, err = prepare(["--train", train, "--val", val, "--tokenizer", prepared["model"], "--out-dir", out,
                          "--no-progress"], capsys)
    assert rc == 1 and "--overwrite" in err


def write_bytes(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case", ["no_text", "bad_json", "text_not_string", "missing_file", "empty", "bad_xz"])
def test_prepare_refuses_bad_input(tmp_path, case, capsys):
    good = make_documents(5, seed=3)
    path = tmp_path / "docs.jsonl"
    expect = {
        "no_text": (lambda: write_jsonl(path, good, extra_lines=['{"content": "no text here"}']),
                    r'docs.jsonl:6: line has no "text" field'),
        "bad_json": (lambda: write_jsonl(path, good, extra_lines=['{"text": "unterminated']),
                     r"docs.jsonl:6: not valid JSON"),
        "text_not_string": (lambda: write_jsonl(path, good, extra_lines=['{"text": 42}']),
                            r'docs.jsonl:6: "text" is a int'),
        "missing_file": (lambda: str(tmp_path / "absent.jsonl"), r"--train file not found: .*absent.jsonl"),
        "empty": (lambda: write_jsonl(path, [], extra_lines=["", "  "]), r"training set is empty"),
        "bad_xz": (lambda: write_bytes(tmp_path / "docs.jsonl.xz", b"not xz at all"), r"docs.jsonl.xz: cannot read"),
    }
    make, message = expect[case]
    train = make()
    rc, _, err = prepare(["--train", train, "--val-fraction", "0.2", "--vocab-size", "300",
                          "--tokenizer-prefix", tmp_path / "tok", "--out-dir", tmp_path / "out", "--no-progress"],
                         capsys)
    assert rc == 1
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_prepare_bad_line_while_encoding_leaves_no_shards(tmp_path, prepared, capsys):
    # with a reused tokenizer the bad line is only met while the train shards are written, after val's
    docs = make_documents(30, seed=4)
    train = write_jsonl(tmp_path / "train.jsonl", docs, extra_lines=['{"txt": "typo"}'])
    val = write_jsonl(tmp_path / "val.jsonl", make_documents(5, seed=5))
    rc, _, err = prepare(["--train", train, "--val", val, "--tokenizer", prepared["model"], "--out-dir",
                          tmp_path / "out", "--no-progress"], capsys)
    assert rc == 1 and 'train.jsonl:31: line has no "text" field' in err, err
    assert os.listdir(tmp_path / "out") == []


def shard_bytes(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_prepare_overwrite_failing_late_keeps_the_earlier_shards(tmp_path, prepared, capsys):
    docs = make_documents(30, seed=6)
    val = write_jsonl(tmp_path / "val.jsonl", make_documents(5, seed=7))
    out = tmp_path / "out"
    args = ["--val", val, "--tokenizer", prepared["model"], "--out-dir", out, "--no-progress", "--shard-tokens", "500"]
    rc, _, err = prepare(["--train", write_jsonl(tmp_path / "good.jsonl", docs), *args], capsys)
    assert rc == 0, err
    before = shard_bytes(out)
    bad = write_jsonl(tmp_path / "bad.jsonl", docs[:10], extra_lines=['{"txt": "typo"}'])  # fewer shards, then a bad line
    rc, _, err = prepare(["--train", bad, *args, "--overwrite"], capsys)
    assert rc == 1 and 'bad.jsonl:11: line has no "text" field' in err, err
    assert shard_bytes(out) == before  # nothing deleted, nothing half-replaced, no staging folder left
    rc, _, err = prepare(["--train", write_jsonl(tmp_path / "short.jsonl", docs[:10]), *args, "--overwrite"], capsys)
    assert rc == 0, err
    after = shard_bytes(out)
    assert after != before and set(after) < set(before)  # the shorter set replaced it, leftovers dropped


# ----------------------------------------------------------------------------------------------------
# The bundled sample
# ----------------------------------------------------------------------------------------------------

def test_sample_shards_match_the_sample_and_tokenizer(tmp_path, capsys):
    """The shipped shards are what the command in data/sample/README.md makes from the shipped documents."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=SAMPLE_TOKENIZER)
    assert sp.vocab_size() == 1024
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    for split in ("train", "val"):
        tokens = concat_split(SAMPLE_DIR, split)
        assert tokens[0] == BOS_ID and int(tokens.max()) < 1024
    rc, _, err = prepare(["--train", os.path.join(SAMPLE_DIR, "devils_dictionary.jsonl.xz"), "--val-fraction",
                          "0.05", "--tokenizer", SAMPLE_TOKENIZER, "--vocab-size", "1024", "--out-dir", tmp_path,
                          "--no-progress"], capsys)
    assert rc == 0, err
    shipped = sorted(p for p in os.listdir(SAMPLE_DIR) if p.endswith(".bin"))
    assert shipped == sorted(os.listdir(tmp_path))
    for name in shipped:
        assert (tmp_path / name).read_bytes() == open(os.path.join(SAMPLE_DIR, name), "rb").read(), name
    with lzma.open(os.path.join(SAMPLE_DIR, "devils_dictionary.jsonl.xz"), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    val_docs = split_documents(concat_split(SAMPLE_DIR, "val"))
    assert 0.03 * len(texts) < len(val_docs) < 0.07 * len(texts)
    decoded = {sp.decode(d.tolist()) for d in val_docs}
    normalized = {sp.decode(sp.encode(t)) for t in texts}
    assert decoded <= normalized


# ----------------------------------------------------------------------------------------------------
# cached_challenge_fineweb.py against a fake Hugging Face Hub
# ----------------------------------------------------------------------------------------------------

REPO_ID = "test-org/fake-golf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves a dataset repo the way hf_hub_download reads it: HEAD and GET on
    /datasets/{repo_id}/resolve/{revision}/{path}, with X-Repo-Commit, ETag and Content-Length, Range for resumes,
    and 404 + X-Error-Code: EntryNotFound for a missing file. Faults, per repo path:
    drop[path] = n: GET sends only n bytes of the body (Content-Length stays the full size), then closes;
    short[path] = n: GET is a complete response of only the first n bytes while HEAD reports the full size."""

    def __init__(self, files: dict[str, bytes], repo_id: str = REPO_ID):
        self.files = dict(files)
        self.drop: dict[str, int] = {}
        self.short: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _resolve(self):
                prefix = f"/datasets/{repo_id}/resolve/main/"
                path = self.path.split("?")[0]
                if not path.startswith(prefix):
                    hub.unexpected.append(f"{self.command} {self.path}")
                    self._error(404, "RepoNotFound", "Repository not found")
                    return None
                rel = path[len(prefix):]
                hub.requests.append((self.command, rel))
                if rel not in hub.files:
                    self._error(404, "EntryNotFound", f"{rel} does not exist on main")
                    return None
                return rel

            def _error(self, code, error_code, message):
                body = json.dumps({"error": message}).encode()
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", message)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _headers(self, rel, status, length, extra=()):
                data = hub.files[rel]
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                rel = self._resolve()
                if rel is not None:
                    self._headers(rel, 200, len(hub.files[rel]))

            def do_GET(self):
                rel = self._resolve()
                if rel is None:
                    return
                data = hub.files[rel]
                if rel in hub.short:
                    data = data[:hub.short[rel]]
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m:
                    start = int(m.group(1))
                    self._headers(rel, 206, len(data) - start,
                                  [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")])
                else:
                    self._headers(rel, 200, len(data))
                end = hub.drop.get(rel, len(data))
                self.wfile.write(data[start:max(start, end)])
                self.wfile.flush()
                self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def gets(self):
        return sorted(rel for method, rel in self.requests if method == "GET")

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def make_fake_repo(tmp_path) -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    files = {}
    for name, n in (("fineweb_train_000000.bin", 3000), ("fineweb_train_000001.bin", 2000),
                    ("fineweb_val_000000.bin", 1000)):
        tokens = rng.integers(0, 1024, size=n).astype(np.uint16)
        tokens[0] = BOS_ID
        write_shard(str(tmp_path / name), tokens)
        files[f"datasets/datasets/fineweb10B_sp1024/{name}"] = (tmp_path / name).read_bytes()
    files["datasets/tokenizers/fineweb_1024_bpe.model"] = open(SAMPLE_TOKENIZER, "rb").read()
    files["datasets/tokenizers/fineweb_1024_bpe.vocab"] = open(SAMPLE_TOKENIZER[:-6] + ".vocab", "rb").read()
    manifest = {
        "version": 1,
        "datasets": [
            {"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192",
             "stats": {"files_train": 80, "files_val": 1}},
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
             "stats": {"files_train": 2, "files_val": 1, "tokens_train": 5000}},
        ],
        "tokenizers": [
            {"name": "sp_bpe_8192", "model_path": "tokenizers/fineweb_8192_bpe.model"},
            {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
             "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        ],
    }
    files["datasets/manifest.json"] = json.dumps(manifest, indent=1).encode()
    return files


@pytest.fixture
def hub(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    fake = FakeHub(make_fake_repo(served))
    yield fake
    fake.close()


def download(hub, local_dir, *extra, variant="sp1024", **env_vars):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "MATCHED_FINEWEB_")) and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(local_dir) + "_hf_home", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost", MATCHED_FINEWEB_REPO_ID=REPO_ID, **env_vars)
    return run([DOWNLOAD, "--variant", variant, "--local-dir", str(local_dir), "--no-progress", *extra], env=env)


SHARDS = "datasets/datasets/fineweb10B_sp1024/"


def local_files(local_dir) -> list[str]:
    """Every file under local_dir (relative paths), staging leftovers included."""
    out = []
    for root, _, names in os.walk(local_dir):
        out += [os.path.relpath(os.path.join(root, n), local_dir) for n in names]
    return sorted(out)


def test_download_full_then_nothing_to_do(hub, tmp_path):
    local = tmp_path / "data"
    r = download(hub, local)
    assert r.returncode == 0, r.stderr
    expected = {
        "datasets/fineweb10B_sp1024/fineweb_train_000000.bin": SHARDS + "fineweb_train_000000.bin",
        "datasets/fineweb10B_sp1024/fineweb_train_000001.bin": SHARDS + "fineweb_train_000001.bin",
        "datasets/fineweb10B_sp1024/fineweb_val_000000.bin": SHARDS + "fineweb_val_000000.bin",
        "tokenizers/fineweb_1024_bpe.model": "datasets/tokenizers/fineweb_1024_bpe.model",
        "tokenizers/fineweb_1024_bpe.vocab": "datasets/tokenizers/fineweb_1024_bpe.vocab",
    }
    assert local_files(local) == sorted(expected), "unexpected or leftover files"
    for mine, theirs in expected.items():
        assert (local / mine).read_bytes() == hub.files[theirs], mine
    assert "fewer" not in r.stderr and "note: fineweb10B_sp1024 has 2 training shards" in r.stderr
    assert "5 file(s) downloaded, 0 already complete" in r.stdout
    assert hub.unexpected == []

    hub.requests.clear()
    r = download(hub, local)
    assert r.returncode == 0, r.stderr
    assert hub.gets() == ["datasets/manifest.json"], "a second run should download nothing but the manifest"
    assert "0 file(s) downloaded, 5 already complete" in r.stdout

    # a damaged local shard and a tokenizer of the wrong size are fetched again; the rest is left alone
    shard = local / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    (local / "tokenizers/fineweb_1024_bpe.vocab").write_bytes(b"stale")
    hub.requests.clear()
    r = download(hub, local)
    assert r.returncode == 0, r.stderr
    assert hub.gets() == sorted(["datasets/manifest.json", SHARDS + "fineweb_train_000001.bin",
                                 "datasets/tokenizers/fineweb_1024_bpe.vocab"])
    assert shard.read_bytes() == hub.files[SHARDS + "fineweb_train_000001.bin"]


def test_download_one_train_shard(hub, tmp_path):
    local = tmp_path / "data"
    r = download(hub, local, "--train-shards", "1")
    assert r.returncode == 0, r.stderr
    shards = sorted(os.listdir(local / "datasets/fineweb10B_sp1024"))
    assert shards == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert SHARDS + "fineweb_train_000001.bin" not in [rel for _, rel in hub.requests]


def assert_failed_cleanly(r, local, message, absent):
    assert r.returncode != 0
    assert re.search(message, r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    files = local_files(local)
    assert absent not in files
    assert not [f for f in files if ".download-" in f or ".manifest-" in f or "incomplete" in f], files


def test_download_missing_remote_file(hub, tmp_path):
    del hub.files[SHARDS + "fineweb_train_000001.bin"]
    local = tmp_path / "data"
    r = download(hub, local)
    assert_failed_cleanly(r, local, r"missing on the server: datasets/datasets/fineweb10B_sp1024/"
                                    r"fineweb_train_000001\.bin in dataset repo test-org/fake-golf",
                          "datasets/fineweb10B_sp1024/fineweb_train_000001.bin")
    # what came before it is complete and kept
    assert "datasets/fineweb10B_sp1024/fineweb_train_000000.bin" in local_files(local)


def test_download_missing_variant_is_named(hub, tmp_path):
    local = tmp_path / "data"
    r = download(hub, local, variant="sp4096")
    assert r.returncode != 0 and "no dataset named 'fineweb10B_sp4096'" in r.stderr, r.stderr
    assert "'fineweb10B_sp1024'" in r.stderr, "the error should list the datasets there are"
    assert hub.gets() == ["datasets/manifest.json"]


def test_download_wrong_remote_root(hub, tmp_path):
    local = tmp_path / "data"
    r = download(hub, local, MATCHED_FINEWEB_REMOTE_ROOT_PREFIX="not-there")
    assert_failed_cleanly(r, local, r"missing on the server: not-there/manifest\.json in dataset repo "
                                    r"test-org/fake-golf.*MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "manifest.json")
    assert local_files(local) == []


def test_download_connection_dropped_mid_file(hub, tmp_path):
    # the server announces the whole shard but the connection ends after 1500 bytes, also on every resume
    hub.drop[SHARDS + "fineweb_val_000000.bin"] = 1500
    local = tmp_path / "data"
    r = download(hub, local)
    assert_failed_cleanly(r, local, r"incomplete download of datasets/datasets/fineweb10B_sp1024/"
                                    r"fineweb_val_000000\.bin.*closed the connection early",
                          "datasets/fineweb10B_sp1024/fineweb_val_000000.bin")


def test_download_short_body(hub, tmp_path):
    # the file's metadata says its full size, the body that comes is a shorter, complete response
    rel = "datasets/tokenizers/fineweb_1024_bpe.model"
    hub.short[rel] = 1000
    local = tmp_path / "data"
    r = download(hub, local)
    assert_failed_cleanly(r, local, r"truncated download of datasets/tokenizers/fineweb_1024_bpe\.model",
                          "tokenizers/fineweb_1024_bpe.model")


def test_download_shard_with_bad_header(hub, tmp_path):
    # a shard whose header promises more tokens than the file holds (served consistently, so HTTP sees no fault)
    rel = SHARDS + "fineweb_train_000000.bin"
    hub.files[rel] = hub.files[rel][:-100]
    local = tmp_path / "data"
    r = download(hub, local)
    assert_failed_cleanly(r, local, r"fineweb_train_000000\.bin downloaded but is not a valid shard: .*header says "
                                    r"3000 tokens", "datasets/fineweb10B_sp1024/fineweb_train_000000.bin")


@pytest.mark.parametrize("mutate,key", [
    (lambda m: m.pop("datasets"), "'datasets'"),
    (lambda m: m.pop("tokenizers"), "'tokenizers'"),
    (lambda m: m["datasets"][1].pop("tokenizer_name"), "'tokenizer_name'"),
    (lambda m: m["datasets"][1].pop("stats"), "'stats'"),
    (lambda m: m["datasets"][1]["stats"].pop("files_train"), "'files_train'"),
    (lambda m: m["datasets"][1]["stats"].pop("files_val"), "'files_val'"),
    (lambda m: m["tokenizers"][1].pop("model_path"), "'model_path'"),
    (lambda m: m["tokenizers"].pop(1), "'sp_bpe_1024'"),
    (lambda m: m["datasets"][1]["stats"].update(files_train="many"), "'files_train'"),
])
def test_manifest_errors_name_the_key(tmp_path, mutate, key):
    sys.path.insert(0, os.path.join(REPO, "data"))
    from cached_challenge_fineweb import ManifestError, plan_from_manifest

    manifest = json.loads(make_fake_repo(tmp_path)["datasets/manifest.json"])
    plan = plan_from_manifest(json.loads(json.dumps(manifest)), "sp1024")
    assert (plan.files_train, plan.files_val, plan.tokenizer_files) == (
        2, 1, ["tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"])
    mutate(manifest)
    with pytest.raises(ManifestError, match=re.escape(key)):
        plan_from_manifest(manifest, "sp1024")


def test_manifest_error_through_the_command(hub, tmp_path):
    manifest = json.loads(hub.files["datasets/manifest.json"])
    del manifest["datasets"][1]["stats"]["files_val"]
    hub.files["datasets/manifest.json"] = json.dumps(manifest).encode()
    local = tmp_path / "data"
    r = download(hub, local)
    assert r.returncode != 0 and "has no key 'files_val'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert local_files(local) == []


# ----------------------------------------------------------------------------------------------------
# cached_challenge_fineweb.py --variant sp8192_caseops: its own repo, byte sidecars beside the val shards
# ----------------------------------------------------------------------------------------------------

CASEOPS_REPO_ID = "test-org/fake-golf-caseops"
CASEOPS_TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
# a dataset name other than fineweb10B_sp8192_caseops: the downloader finds it by its tokenizer file
CASEOPS_DATASET = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_SHARDS = f"datasets/datasets/{CASEOPS_DATASET}/"


def make_fake_caseops_repo(tmp_path) -> dict[str, bytes]:
    sys.path.insert(0, os.path.join(REPO, "data"))
    from caseops import write_byte_sidecar

    rng = np.random.default_rng(11)
    files = {}
    for name, n in (("fineweb_train_000000.bin", 3000), ("fineweb_val_000000.bin", 1000),
                    ("fineweb_val_000001.bin", 500)):
        tokens = rng.integers(0, 8192, size=n).astype(np.uint16)
        tokens[0] = BOS_ID
        write_shard(str(tmp_path / name), tokens)
        files[CASEOPS_SHARDS + name] = (tmp_path / name).read_bytes()
        if "_val_" in name:
            side = name.replace("fineweb_val_", "fineweb_val_bytes_")
            counts = rng.integers(0, 12, size=n)
            counts[tokens == BOS_ID] = 0
            write_byte_sidecar(str(tmp_path / side), counts)
            files[CASEOPS_SHARDS + side] = (tmp_path / side).read_bytes()
    files[f"datasets/tokenizers/{CASEOPS_TOKENIZER}"] = open(SAMPLE_TOKENIZER, "rb").read()
    manifest = {
        "version": 1,
        "datasets": [{"name": CASEOPS_DATASET, "tokenizer_name": "sp_bpe_8192_caseops",
                      "stats": {"files_train": 1, "files_val": 2}}],
        "tokenizers": [{"name": "sp_bpe_8192_caseops", "model_path": f"tokenizers/{CASEOPS_TOKENIZER}"}],
    }
    files["datasets/manifest.json"] = json.dumps(manifest, indent=1).encode()
    return files


@pytest.fixture
def caseops_hub(tmp_path):
    served = tmp_path / "served_caseops"
    served.mkdir()
    fake = FakeHub(make_fake_caseops_repo(served), repo_id=CASEOPS_REPO_ID)
    yield fake
    fake.close()


def download_caseops(hub, local_dir, *extra):
    # MATCHED_FINEWEB_REPO_ID stays the main repo: the CaseOps variant must not use it
    return download(hub, local_dir, *extra, variant="sp8192_caseops", MATCHED_FINEWEB_CASEOPS_REPO_ID=CASEOPS_REPO_ID)


def test_download_caseops_variant_with_sidecars(caseops_hub, tmp_path):
    local = tmp_path / "data"
    r = download_caseops(caseops_hub, local)
    assert r.returncode == 0, r.stderr
    names = ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_000001.bin",
             "fineweb_val_bytes_000000.bin", "fineweb_val_bytes_000001.bin"]
    expected = {f"datasets/{CASEOPS_DATASET}/{n}": CASEOPS_SHARDS + n for n in names}
    expected[f"tokenizers/{CASEOPS_TOKENIZER}"] = f"datasets/tokenizers/{CASEOPS_TOKENIZER}"
    assert local_files(local) == sorted(expected), "unexpected or leftover files"
    for mine, theirs in expected.items():
        assert (local / mine).read_bytes() == caseops_hub.files[theirs], mine
    assert caseops_hub.unexpected == [], "requests for another repository than the CaseOps one"
    assert "6 file(s) downloaded, 0 already complete" in r.stdout
    assert "+ 2 val byte sidecar(s)" in r.stdout and "CASEOPS_ENABLED=1" in r.stdout

    caseops_hub.requests.clear()
    r = download_caseops(caseops_hub, local)
    assert r.returncode == 0, r.stderr
    assert caseops_hub.gets() == ["datasets/manifest.json"]
    assert "0 file(s) downloaded, 6 already complete" in r.stdout

    # a sidecar that no longer matches its shard is fetched again
    side = local / f"datasets/{CASEOPS_DATASET}/fineweb_val_bytes_000001.bin"
    sys.path.insert(0, os.path.join(REPO, "data"))
    from caseops import write_byte_sidecar
    write_byte_sidecar(str(side), np.ones(499, dtype=np.int64))
    caseops_hub.requests.clear()
    r = download_caseops(caseops_hub, local)
    assert r.returncode == 0, r.stderr
    assert caseops_hub.gets() == sorted(["datasets/manifest.json", CASEOPS_SHARDS + "fineweb_val_bytes_000001.bin"])
    assert side.read_bytes() == caseops_hub.files[CASEOPS_SHARDS + "fineweb_val_bytes_000001.bin"]


def test_download_plain_variant_fetches_no_sidecars(hub, tmp_path):
    # the main repo's variants are unchanged: no sidecar is asked for
    r = download(hub, tmp_path / "data", MATCHED_FINEWEB_CASEOPS_REPO_ID=CASEOPS_REPO_ID)
    assert r.returncode == 0, r.stderr
    assert not [rel for _, rel in hub.requests if "bytes" in rel] and "CASEOPS_ENABLED" not in r.stdout


def test_download_caseops_sidecar_of_wrong_length(caseops_hub, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "data"))
    from caseops import write_byte_sidecar

    bad = tmp_path / "bad.bin"
    write_byte_sidecar(str(bad), np.ones(999, dtype=np.int64))  # its shard has 1000 tokens
    caseops_hub.files[CASEOPS_SHARDS + "fineweb_val_bytes_000000.bin"] = bad.read_bytes()
    local = tmp_path / "data"
    r = download_caseops(caseops_hub, local)
    assert_failed_cleanly(r, local, r"fineweb_val_bytes_000000\.bin downloaded but .*999 byte counts, but "
                                    r"fineweb_val_000000\.bin holds 1000 tokens",
                          f"datasets/{CASEOPS_DATASET}/fineweb_val_bytes_000000.bin")


def test_download_caseops_missing_sidecar(caseops_hub, tmp_path):
    del caseops_hub.files[CASEOPS_SHARDS + "fineweb_val_bytes_000001.bin"]
    local = tmp_path / "data"
    r = download_caseops(caseops_hub, local)
    assert_failed_cleanly(r, local, rf"missing on the server: {re.escape(CASEOPS_SHARDS)}fineweb_val_bytes_000001\.bin "
                                    rf"in dataset repo {CASEOPS_REPO_ID}",
                          f"datasets/{CASEOPS_DATASET}/fineweb_val_bytes_000001.bin")


def test_caseops_manifest_dataset_found_by_name_or_tokenizer(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "data"))
    from cached_challenge_fineweb import ManifestError, plan_from_manifest

    manifest = json.loads(make_fake_caseops_repo(tmp_path)["datasets/manifest.json"])
    plan = plan_from_manifest(manifest, "sp8192_caseops")
    assert (plan.dataset_name, plan.files_val, plan.byte_sidecars) == (CASEOPS_DATASET, 2, True)
    manifest["datasets"][0]["name"] = "fineweb10B_sp8192_caseops"
    assert plan_from_manifest(manifest, "sp8192_caseops").dataset_name == "fineweb10B_sp8192_caseops"
    manifest["datasets"][0]["name"] = "other"
    manifest["tokenizers"][0]["model_path"] = "tokenizers/other.model"
    with pytest.raises(ManifestError, match="none uses the tokenizer " + re.escape(CASEOPS_TOKENIZER)):
        plan_from_manifest(manifest, "sp8192_caseops")
    assert not plan_from_manifest(json.loads(make_fake_repo(tmp_path)["datasets/manifest.json"]),
                                  "sp1024").byte_sidecars
