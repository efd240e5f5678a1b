"""Tests of data/caseops.py: the CaseOps transform is exactly invertible, token byte counts sum to the original
text's UTF-8 length, byte sidecars round-trip and are refused when they do not match; and of
data/prepare_corpus.py --caseops. CPU only, a small SentencePiece model trained here."""
from __future__ import annotations

import os
import string
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "data")):
    if path not in sys.path:
        sys.path.insert(0, path)

import caseops  # noqa: E402
from caseops import ALLCAPS, CAPNEXT, ESC, OPERATORS, TITLE, decode, decode_with_weights, encode  # noqa: E402
from train_gpt import BOS_ID, ShardError, read_shard, write_shard  # noqa: E402

SAMPLE_CORPUS = os.path.join(REPO, "data", "sample", "devils_dictionary.jsonl.xz")

# characters that exercise the rules: clean case pairs, characters without one, marks, private use, operators
TRICKY = ("aAzZ ßẞİıiIΣσςǅǄǆ\u0301\u0308ÉéⅫⅻⓐⒶＡａKkĸΩωȺⱥ" + "".join(OPERATORS) + "\ue000\uf8ff\U000f0000"
          "0123'-_.\n\t😀ﬁ中文")
tricky_text = st.text(alphabet=st.sampled_from(TRICKY), max_size=40)
any_text = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(TRICKY)), max_size=60)
# documents: what UTF-8 can encode (no lone surrogate)
utf8_text = st.text(alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(TRICKY)), max_size=60)
surrogate_text = st.text(alphabet=st.one_of(st.characters(categories=["Cs"]), st.sampled_from(TRICKY)), max_size=20)


# ----------------------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("original,transformed", [
    ("", ""),
    ("hello world", "hello world"),
    ("Hello World", f"{TITLE}hello {TITLE}world"),
    ("NASA", f"{ALLCAPS}nasa"),
    ("I", f"{TITLE}i"),
    ("iPhone", f"i{CAPNEXT}phone"),
    ("McDonald's", f"{TITLE}mc{CAPNEXT}donald's"),
    ("HTTPServer", f"{TITLE}h{CAPNEXT}t{CAPNEXT}t{CAPNEXT}p{CAPNEXT}server"),
    ("MP3 X1", f"{ALLCAPS}mp3 {TITLE}x1"),  # digits end a word
    ("STRAßE", f"{ALLCAPS}straße"),  # 'ß' has no one-character capital: it does not stop ALLCAPS
    ("ΟΔΟΣ", f"{ALLCAPS}οδοσ"),  # per character: no final-sigma rule
    ("E\u0301COLE", f"{ALLCAPS}e\u0301cole"),  # a combining mark is inside the word
    ("İstanbul ẞ ǅ \u212a", "İstanbul ẞ ǅ \u212a"),  # no clean case pair (\u212a: Kelvin sign): left as is
    ("a\ue001b\ue000", f"a{ESC}\ue001b{ESC}\ue000"),  # private use is escaped
])
def test_encode_examples(original, transformed):
    assert encode(original) == transformed
    assert decode(transformed) == original


@settings(max_examples=1500, deadline=None)
@given(any_text)
def test_round_trip_any_string(s):
    e = encode(s)
    assert decode(e) == s
    restored, weights = decode_with_weights(e)
    assert restored == s
    assert int(weights.sum()) == len(s.encode("utf-8", "surrogatepass"))  # a lone surrogate counts 3


@settings(max_examples=1500, deadline=None)
@given(tricky_text)
def test_round_trip_tricky_characters(s):
    e = encode(s)
    assert decode(e) == s
    # every capital with a clean case pair is gone from the output; what is left of the private-use area
    # is an operator, or an escaped character
    capitals = caseops._build_tables()["capitals"]
    assert not any(c in capitals for c in e)
    assert int(decode_with_weights(e)[1].sum()) == len(s.encode("utf-8"))


@settings(max_examples=200, deadline=None)
@given(surrogate_text)
def test_round_trip_lone_surrogates(s):
    assert decode(encode(s)) == s


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=string.printable, max_size=80))
def test_ascii_output_has_no_capitals(s):
    e = encode(s)
    assert not any(c in string.ascii_uppercase for c in e)
    assert decode(e) == s
    assert e.replace(TITLE, "").replace(ALLCAPS, "").replace(CAPNEXT, "") == s.lower()


@settings(max_examples=500, deadline=None)
@given(any_text)
def test_decode_accepts_any_string(s):
    decode(s)  # dangling operators are dropped, never an error
    decode_with_weights(s)


def test_case_pairs_are_a_bijection():
    t = caseops._build_tables()
    assert len(t["capitals"]) == len(t["smalls"]) > 1000
    for c in t["capitals"]:
        assert c.lower() in t["smalls"] and c.lower().upper() == c
    assert not any(0xE000 <= ord(c) <= 0xF8FF for c in t["capitals"] | t["smalls"])


# ----------------------------------------------------------------------------------------------------
# Token byte counts with a CaseOps SentencePiece model
# ----------------------------------------------------------------------------------------------------

def sample_documents() -> list[str]:
    import json
    import lzma

    with lzma.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def caseops_sp(tmp_path_factory):
    """A 400-piece CaseOps tokenizer trained on transformed sample text, operators as user-defined symbols."""
    import prepare_corpus
    import sentencepiece as spm

    prefix = str(tmp_path_factory.mktemp("tok") / "caseops_400")
    docs = [encode(d) for d in sample_documents()[:300]]
    model = prepare_corpus.train_tokenizer(docs, 400, prefix, num_threads=2, caseops_symbols=True)
    return spm.SentencePieceProcessor(model_file=model)


def test_tokenizer_declares_the_operators(caseops_sp):
    sp = caseops_sp
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(OPERATORS)
    assert caseops.operator_ids(sp).tolist() == [4, 5, 6, 7]
    assert sp.is_byte(8) and sp.id_to_piece(8) == "<0x00>"
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert not any(c.isupper() for p in pieces if not sp.is_byte(pieces.index(p)) for c in p if p[0] != "<")


EDGE_DOCUMENTS = [
    "Hello World",
    "  Leading and trailing spaces, and   runs   of\u3000spaces.  \n\n",
    "NASA's iPhone: HTTPServer, McDonald's, STRAßE, ΟΔΟΣ, İstanbul.",
    "emoji 😀😀 and 中文 Кириллица ΕΛΛΗΝΙΚΑ",  # byte fallback for characters the tokenizer lacks
    "private use \ue000\ue001\ue004\uf8ff\U000f0000 in the text",
    "ﬁ Ⅻ ＡＢＣ ｆｕｌｌ ①",  # NFKC changes these
    "combining e\u0301 E\u0301COLE and zero\u200bwidth",
    "tab\tand\rcarriage\x00control\x07",
    "Ⱥ ⱥ ȺȺ",  # capitals whose small letter has another UTF-8 length
    "😀",
    "\u200b",  # normalised away: no token at all
]


def check_counts(sp, text, ids, counts, caseops_on=True):
    assert counts.size == ids.size
    assert int(counts.sum()) == len(text.encode("utf-8")) or ids.size == 0
    assert (counts >= 0).all() and counts.max(initial=0) <= 65535
    op = caseops.operator_token_mask(ids, caseops.operator_ids(sp))
    assert (counts[op] == 0).all(), "operator tokens count 0 bytes"
    literal = np.isin(ids, caseops.operator_ids(sp)) & ~op  # escaped operator characters of the input
    assert (counts[literal] >= 3).all() and literal.sum() == sum(text.count(o) for o in OPERATORS) * caseops_on
    expected_ids = sp.encode(encode(text) if caseops_on else text)
    assert ids.tolist() == expected_ids


@pytest.mark.parametrize("text", EDGE_DOCUMENTS)
def test_byte_counts_edge_documents(caseops_sp, text):
    (ids, counts), = caseops.encode_with_byte_counts(caseops_sp, [text])
    check_counts(caseops_sp, text, ids, counts)
    if text == "😀":
        assert [caseops_sp.id_to_piece(int(i)) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
        assert counts.tolist() == [1, 1, 1, 1], "the bytes of one character split evenly over its byte pieces"
    if text == "Hello World":
        assert counts.sum() == 11 and counts[ids == 4].sum() == 0


def test_byte_counts_sample_corpus(caseops_sp):
    docs = sample_documents()
    results = caseops.encode_with_byte_counts(caseops_sp, docs, num_threads=2)
    for text, (ids, counts) in zip(docs, results):
        assert int(counts.sum()) == len(text.encode("utf-8"))
    ops = sum(int(np.isin(ids, [4, 5, 6, 7]).sum()) for ids, _ in results)
    assert ops > 1000


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(utf8_text)
def test_byte_counts_any_document(caseops_sp, text):
    (ids, counts), = caseops.encode_with_byte_counts(caseops_sp, [text])
    check_counts(caseops_sp, text, ids, counts)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(utf8_text)
def test_byte_counts_without_caseops(caseops_sp, text):
    (ids, counts), = caseops.encode_with_byte_counts(caseops_sp, [text], caseops=False)
    assert counts.size == ids.size
    assert int(counts.sum()) == len(text.encode("utf-8")) or ids.size == 0


def test_offsets_without_protobuf(caseops_sp):
    # the serialized message read directly gives what the protobuf package gives
    texts = [encode(t) for t in EDGE_DOCUMENTS + sample_documents()[:50]]
    checked = 0
    for text, blob in zip(texts, caseops_sp.encode(texts, out_type="serialized_proto")):
        ids, begins = caseops.parse_serialized_pieces(blob)
        assert ids.tolist() == caseops_sp.encode(text)
        # on text that normalisation leaves as it is (single spaces), each offset starts its piece's own text
        plain = " ".join(text.split())
        pieces = [p.replace("▁", " ") for p in caseops_sp.encode(plain, out_type=str)]
        if "".join(pieces) == plain:
            _, starts = caseops.parse_serialized_pieces(caseops_sp.encode(plain, out_type="serialized_proto"))
            raw = plain.encode()
            assert [raw[a:b].decode() for a, b in zip(starts, [*starts[1:], len(raw)])] == pieces
            checked += 1
        try:
            proto = caseops_sp.encode(text, out_type="proto")
        except ImportError:
            continue
        assert begins.tolist() == [p.begin for p in proto.pieces]
    assert checked >= 40  # without the protobuf package, the offsets' check is the one above

    class NoProtobuf:  # a machine without the protobuf package
        def __init__(self, sp):
            self.sp = sp

        def encode(self, texts, out_type=int, **kw):
            if out_type == "proto":
                raise ImportError("protobuf is required when using out_type='proto'")
            return self.sp.encode(texts, out_type=out_type, **kw)

        def __getattr__(self, name):
            return getattr(self.sp, name)

    docs = EDGE_DOCUMENTS + sample_documents()[:50]
    got = caseops.encode_with_byte_counts(NoProtobuf(caseops_sp), docs)
    want = caseops.encode_with_byte_counts(caseops_sp, docs)
    assert all(a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist() for a, b in zip(got, want))


def test_original_byte_counts_checks_ids(caseops_sp):
    text = "The Quick brown FOX"
    ids = caseops_sp.encode(encode(text))
    counts = caseops.original_byte_counts(caseops_sp, text, ids=ids)
    assert counts.sum() == len(text)
    with pytest.raises(ValueError, match="not the encoding"):
        caseops.original_byte_counts(caseops_sp, text, ids=ids[:-1])


def test_huge_whitespace_run_fits_uint16(caseops_sp):
    text = "a" + " " * 70000 + "b c"
    (ids, counts), = caseops.encode_with_byte_counts(caseops_sp, [text])
    assert counts.max() <= 65535 and counts.sum() == len(text)


# ----------------------------------------------------------------------------------------------------
# Byte sidecars
# ----------------------------------------------------------------------------------------------------

def test_sidecar_round_trip(tmp_path):
    counts = np.array([0, 3, 65535, 1, 0, 7])
    path = str(tmp_path / "fineweb_val_bytes_000000.bin")
    caseops.write_byte_sidecar(path, counts, total_bytes=int(counts.sum()))
    got, total = caseops.read_byte_sidecar(path)
    assert got.tolist() == counts.tolist() and total == counts.sum()
    # the shard format: read_shard reads the values
    assert np.asarray(read_shard(path)).tolist() == counts.tolist()
    with pytest.raises(ValueError, match="sum to"):
        caseops.write_byte_sidecar(path, counts, total_bytes=1)
    with pytest.raises(ValueError, match="uint16"):
        caseops.write_byte_sidecar(path, [70000])


def test_sidecar_total_above_int32(tmp_path):
    counts = np.full(40000, 65535)
    path = str(tmp_path / "big.bin")
    caseops.write_byte_sidecar(path, counts)
    assert caseops.read_byte_sidecar(path)[1] == 40000 * 65535 > 2**31


def test_sidecar_with_wrong_total_is_refused(tmp_path):
    path = tmp_path / "fineweb_val_bytes_000000.bin"
    caseops.write_byte_sidecar(str(path), np.array([0, 5, 6]))
    data = bytearray(path.read_bytes())
    data[-2] = 9  # a count changed after the total was recorded
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sum to 14, the header records 11"):
        caseops.read_byte_sidecar(str(path))


def test_sidecar_truncated_or_foreign_is_refused(tmp_path):
    path = tmp_path / "s.bin"
    caseops.write_byte_sidecar(str(path), np.arange(10))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ShardError, match="truncated"):
        caseops.read_byte_sidecar(str(path))
    path.write_bytes(b"\x00" * 2000)
    with pytest.raises(ShardError, match="magic"):
        caseops.read_byte_sidecar(str(path))
    with pytest.raises(ShardError, match="not found"):
        caseops.read_byte_sidecar(str(tmp_path / "missing.bin"))


def test_untagged_sidecar_is_accepted_without_total(tmp_path):
    path = str(tmp_path / "fineweb_val_bytes_000000.bin")
    write_shard(path, np.array([0, 4, 2], dtype=np.uint16))  # as a plain shard writer makes it
    counts, total = caseops.read_byte_sidecar(path)
    assert counts.tolist() == [0, 4, 2] and total is None


def test_sidecar_length_must_match_its_shard(tmp_path):
    import train_gpt as tg
    shard = str(tmp_path / "fineweb_val_000000.bin")
    write_shard(shard, np.array([BOS_ID, 10, 11, 12], dtype=np.uint16))
    assert caseops.byte_sidecar_path(shard) == str(tmp_path / "fineweb_val_bytes_000000.bin")
    assert tg.shard_paths(str(tmp_path), "val") == [shard]  # the sidecar is not taken for a shard
    caseops.write_byte_sidecar(caseops.byte_sidecar_path(shard), [0, 1, 2, 3])
    assert tg.load_validation_byte_counts(str(tmp_path), 4).tolist() == [0, 1, 2, 3]
    caseops.write_byte_sidecar(caseops.byte_sidecar_path(shard), [0, 1, 2])
    with pytest.raises(ShardError, match="3 byte counts, but fineweb_val_000000.bin holds 4 tokens"):
        tg.load_validation_byte_counts(str(tmp_path), 4)
    os.remove(caseops.byte_sidecar_path(shard))
    with pytest.raises(ShardError, match="not found"):
        tg.load_validation_byte_counts(str(tmp_path), 4)


# ----------------------------------------------------------------------------------------------------
# prepare_corpus.py --caseops
# ----------------------------------------------------------------------------------------------------

def run_prepare(args, capsys):
    import prepare_corpus

    capsys.readouterr()
    try:
        rc = prepare_corpus.main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def split_docs(tokens):
    starts = np.flatnonzero(tokens == BOS_ID)
    return list(zip(starts, list(starts[1:]) + [tokens.size]))


def test_prepare_corpus_caseops(tmp_path, capsys):
    import json

    docs = sample_documents()[:200] + EDGE_DOCUMENTS[:-1] + ["\u200b not empty"]
    val_docs = docs[:40] + EDGE_DOCUMENTS
    train = tmp_path / "train.jsonl"
    val = tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[40:]), encoding="utf-8")
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in val_docs), encoding="utf-8")
    out = tmp_path / "shards"
    rc, stdout, err = run_prepare(["--caseops", "--train", train, "--val", val, "--vocab-size", 400,
                                   "--tokenizer-prefix", tmp_path / "tok", "--out-dir", out, "--shard-tokens", 3000,
                                   "--no-progress", "--num-threads", 2], capsys)
    assert rc == 0, err
    assert "CaseOps operator tokens" in stdout and "byte sidecars summing to" in stdout
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert caseops.operator_ids(sp).tolist() == [4, 5, 6, 7]

    names = sorted(os.listdir(out))
    val_shards = [n for n in names if n.startswith("fineweb_val_") and "bytes" not in n]
    assert len(val_shards) >= 2, "several val shards, documents crossing shard boundaries"
    assert [n for n in names if "bytes" in n] == [n.replace("val_", "val_bytes_") for n in val_shards]
    assert not [n for n in names if n.startswith("fineweb_train_bytes")], "no sidecars for training shards"
    paths = [str(out / n) for n in val_shards]
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in paths])
    import train_gpt as tg
    counts = tg.load_validation_byte_counts(str(out), tokens.size)
    assert counts.size == tokens.size
    spans = split_docs(tokens)
    kept = [d for d in val_docs if d.strip()]  # blank documents are skipped, as without --caseops
    assert len(spans) == len(kept)
    for (s, e), text in zip(spans, kept):
        assert int(counts[s:e].sum()) == len(text.encode("utf-8")), text[:40]
        assert tokens[s + 1:e].tolist() == sp.encode(encode(text))
        if e > s + 1:
            assert counts[s] == 0, "BOS counts 0"
    assert (counts[caseops.operator_token_mask(tokens, caseops.operator_ids(sp))] == 0).all()
    # the zero-token document "\u200b" carries its 3 bytes on its BOS
    last_s, last_e = spans[-1]
    assert last_e == last_s + 1 and counts[last_s] == 3

    # reusing a plain tokenizer with --caseops is refused, and a CaseOps one without it
    rc, _, err = run_prepare(["--caseops", "--train", train, "--val", val, "--tokenizer",
                              os.path.join(REPO, "tokenizers", "sample_1024_bpe.model"), "--out-dir", tmp_path / "o2",
                              "--no-progress"], capsys)
    assert rc == 1 and "not a CaseOps tokenizer" in err
    rc, _, err = run_prepare(["--train", train, "--val", val, "--tokenizer", tmp_path / "tok.model",
                              "--out-dir", tmp_path / "o3", "--no-progress"], capsys)
    assert rc == 1 and "pass --caseops" in err


def test_prepare_corpus_plain_byte_sidecar(tmp_path, capsys):
    out = tmp_path / "shards"
    rc, stdout, err = run_prepare(["--byte-sidecar", "--train", SAMPLE_CORPUS, "--val-fraction", 0.05, "--tokenizer",
                                   os.path.join(REPO, "tokenizers", "sample_1024_bpe.model"), "--out-dir", out,
                                   "--no-progress", "--num-threads", 2], capsys)
    assert rc == 0, err
    tokens = np.asarray(read_shard(str(out / "fineweb_val_000000.bin")))
    counts, total = caseops.read_byte_sidecar(str(out / "fineweb_val_bytes_000000.bin"))
    assert counts.size == tokens.size and total == counts.sum()
    assert f"byte sidecars summing to {total:,} bytes" in stdout


# ----------------------------------------------------------------------------------------------------
# train_gpt.py's side (skipped until train_gpt.py has CASEOPS_ENABLED and its sidecar reader)
# ----------------------------------------------------------------------------------------------------

def _train_gpt_with_sidecars():
    import train_gpt

    if not hasattr(train_gpt, "load_validation_byte_counts"):
        pytest.skip("train_gpt.py has no byte-sidecar reader yet")
    return train_gpt


def test_train_gpt_reads_the_sidecars_of_prepare_corpus(tmp_path, capsys):
    tg = _train_gpt_with_sidecars()
    out = tmp_path / "shards"
    rc, _, err = run_prepare(["--caseops", "--train", SAMPLE_CORPUS, "--val-fraction", 0.05, "--vocab-size", 400,
                              "--tokenizer-prefix", tmp_path / "tok", "--out-dir", out, "--shard-tokens", 2000,
                              "--no-progress", "--num-threads", 2], capsys)
    assert rc == 0, err
    val_paths = tg.shard_paths(str(out), "val")
    assert not [p for p in val_paths if "bytes" in p], "shard_paths must not take the sidecars for shards"
    tokens = tg.load_validation_tokens(str(out), 0)
    counts = tg.load_validation_byte_counts(str(out), tokens.size)
    assert counts.size == tokens.size
    kept = [t for t in sample_documents() if prepare_corpus_is_val(t)]
    assert int(counts.sum()) == sum(len(t.encode("utf-8")) for t in kept)
    limited = tg.load_validation_tokens(str(out), 1000)
    assert tg.load_validation_byte_counts(str(out), limited.size).tolist() == counts[:1001].tolist()
    # refusals: a sidecar of another length than its shard, a total that does not match
    side = caseops.byte_sidecar_path(val_paths[0])
    good = open(side, "rb").read()
    caseops.write_byte_sidecar(side, counts[:10])
    with pytest.raises(tg.ShardError, match="byte counts, but"):
        tg.load_validation_byte_counts(str(out), tokens.size)
    bad = bytearray(good)
    bad[-1] ^= 1
    open(side, "wb").write(bytes(bad))
    with pytest.raises(tg.ShardError, match="the header records"):
        tg.load_validation_byte_counts(str(out), tokens.size)


def prepare_corpus_is_val(text: str) -> bool:
    import prepare_corpus

    return bool(text.strip()) and prepare_corpus.is_val_document(text, 0.05)
