"""CaseOps: a lossless, case-factored text transform, and per-token byte counts of the original text.

The transform lower-cases capitals and marks them with operator characters from the Unicode private-use area,
so a tokenizer trained on transformed text spends no vocabulary on case variants ("the", "The", "THE" share
pieces). It is the one of the published tokenizer fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model,
whose ids 4..7 are these four characters, declared as user-defined symbols, in this order:

    TITLE   U+E001  the next character is upper case (a word in Title case: first letter upper, no other)
    ALLCAPS U+E002  every letter of the word that follows is upper case (two or more capitals, no small letter)
    CAPNEXT U+E003  the next character is upper case (a capital inside a word, or any capital of a word that
                    is neither Title case nor ALL CAPS, except a word-initial one, which gets TITLE)
    ESC     U+E004  the next character is literal (it protects the private-use characters of the input)

Definitions (all per character; nothing depends on locale or on neighbouring characters):
- A *capital* is a character c with a clean one-to-one case pair: c.lower() is one character l != c and
  l.upper() == c. Its small letter l is the *small letter*; these pairs are a bijection (1,396 of each in
  Python 3.11's Unicode 14 tables). Characters without a clean pair are never touched: 'İ' (lower() is two
  characters), 'ẞ' ('ß'.upper() is 'SS'), the Kelvin sign, title-case digraphs such as 'ǅ', final sigma 'ς'.
- A *word* is a maximal run of word characters: letters (str.isalpha()), combining marks (category M*), and
  every capital and small letter (so 'Ⅻ' and 'Ⓐ' count too). Digits, punctuation, spaces end a word.
- A word with no capital is left as it is. Otherwise, with its capitals mapped to their small letters:
    * two or more capitals and no small letter:          ALLCAPS word       ("NASA" -> ALLCAPS "nasa")
    * exactly one capital, its first character:          TITLE word         ("Hello" -> TITLE "hello", "I")
    * otherwise each capital gets an operator before it: TITLE for a first character, else CAPNEXT
      ("iPhone" -> "i" CAPNEXT "phone", "McDonald" -> TITLE "mc" CAPNEXT "donald").
  A word-character that is neither capital nor small letter (e.g. 'ß' in "STRAßE") does not prevent ALLCAPS:
  decoding only upper-cases small letters.
- Every character of the input in U+E000..U+F8FF (the BMP private-use area, which holds the operators) is
  written ESC + the character.
- An operator goes directly before the word (after any space): "Hello World" -> TITLE "hello " TITLE "world".

decode(encode(s)) == s for every str s. decode() accepts any string: an operator that is not followed by
what it expects (TITLE/CAPNEXT before a non-small-letter, ESC at the end) is dropped.

Byte counts. val_bpb is counted on the bytes of the original text. encode_with_byte_counts() tokenizes the
transformed text with SentencePiece and gives each token the number of original UTF-8 bytes it accounts for,
summing exactly to len(original.encode("utf-8")) per document. It uses SentencePiece's own alignment (each
piece's begin/end byte offsets in its input), so it holds even where the tokenizer's normalizer (nmt_nfkc,
whitespace collapsing) changes the text, which a decode of the pieces cannot give back. Sidecar files hold
these counts next to the validation shards (write_byte_sidecar / read_byte_sidecar).
"""
from __future__ import annotations

import os
import re
import sys
import unicodedata

import numpy as np

TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)  # user-defined symbols in this order: ids 4, 5, 6, 7
PRIVATE_USE_FIRST, PRIVATE_USE_LAST = 0xE000, 0xF8FF  # input characters in this range are escaped

_tables = None


def _build_tables():
    """Capitals, small letters, and word characters, from one scan of the code space (about 1 s, once)."""
    global _tables
    if _tables is not None:
        return _tables
    capitals, word = [], []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        low = c.lower()
        if len(low) == 1 and low != c and low.upper() == c:
            capitals.append(c)
        elif c.isalpha() or unicodedata.category(c)[0] == "M":
            word.append(c)
    to_lower = {c: c.lower() for c in capitals}
    smalls = list(to_lower.values())
    to_upper = {s: c for c, s in to_lower.items()}
    word_cps = sorted({ord(c) for c in word} | {ord(c) for c in capitals} | {ord(c) for c in smalls})

    def char_class(cps):
        parts, start, prev = [], None, None
        for cp in cps:
            if start is None:
                start = prev = cp
            elif cp == prev + 1:
                prev = cp
            else:
                parts.append((start, prev))
                start = prev = cp
        if start is not None:
            parts.append((start, prev))
        return "[" + "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                             for a, b in parts) + "]"

    w = char_class(word_cps)
    cap = char_class(sorted(ord(c) for c in capitals))
    pua = f"[{re.escape(chr(PRIVATE_USE_FIRST))}-{re.escape(chr(PRIVATE_USE_LAST))}]"
    _tables = {
        "capitals": frozenset(capitals),
        "smalls": frozenset(smalls),
        "lower": str.maketrans(to_lower),
        "upper": str.maketrans(to_upper),
        # a whole word that holds a capital (the look-behind pins the match to the word's start), or a
        # private-use character
        "encode_re": re.compile(f"(?<!{w}){w}*?{cap}{w}*|{pua}"),
        "needs_encoding_re": re.compile(f"{cap}|{pua}"),
        "word_run_re": re.compile(f"{w}*"),
        "operator_re": re.compile(f"[{TITLE}{ALLCAPS}{CAPNEXT}{ESC}]"),
    }
    return _tables


def _encode_match(m: re.Match) -> str:
    t = _tables
    word = m.group()
    if len(word) == 1 and PRIVATE_USE_FIRST <= ord(word) <= PRIVATE_USE_LAST:
        return ESC + word
    capitals = t["capitals"]
    caps = [i for i, c in enumerate(word) if c in capitals]
    lowered = word.translate(t["lower"])
    if len(caps) >= 2 and not any(c in t["smalls"] for c in word):
        return ALLCAPS + lowered
    if caps == [0]:
        return TITLE + lowered
    parts, prev = [], 0
    for i in caps:
        parts.append(lowered[prev:i])
        parts.append(TITLE if i == 0 else CAPNEXT)
        prev = i
    parts.append(lowered[prev:])
    return "".join(parts)


def encode(text: str) -> str:
    """The CaseOps transform of text (see the module docstring); decode() inverts it exactly."""
    t = _build_tables()
    if not t["needs_encoding_re"].search(text):
        return text
    return t["encode_re"].sub(_encode_match, text)


def _utf8_lengths(text: str) -> np.ndarray:
    """UTF-8 byte length of each character of text (lone surrogates count 3, as in 'surrogatepass')."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000).astype(np.int64)


def decode_with_weights(text: str) -> tuple[str, np.ndarray]:
    """decode(text), and for each character of text the number of UTF-8 bytes of the decoded text it stands
    for: 0 for an operator, the byte length of the restored capital for a small letter an operator applies to,
    its own byte length otherwise. The weights sum to len(decode(text).encode())."""
    t = _build_tables()
    weights = _utf8_lengths(text)
    out = []
    pos, n = 0, len(text)
    op_re, smalls, upper = t["operator_re"], t["smalls"], t["upper"]
    while True:
        m = op_re.search(text, pos)
        if m is None:
            out.append(text[pos:])
            break
        i = m.start()
        out.append(text[pos:i])
        weights[i] = 0
        op = text[i]
        if op == ESC:
            if i + 1 < n:
                out.append(text[i + 1])
            pos = i + 2
        elif op == ALLCAPS:
            end = t["word_run_re"].match(text, i + 1).end()
            run = text[i + 1:end]
            restored = run.translate(upper)
            out.append(restored)
            if not restored.isascii():
                weights[i + 1:end] = _utf8_lengths(restored)
            pos = end
        else:  # TITLE, CAPNEXT
            if i + 1 < n and text[i + 1] in smalls:
                cap = text[i + 1].translate(upper)
                out.append(cap)
                weights[i + 1] = len(cap.encode("utf-8"))
                pos = i + 2
            else:
                pos = i + 1  # a dangling operator is dropped
    return "".join(out), weights


def decode(text: str) -> str:
    """The inverse of encode(): decode(encode(s)) == s for every string s."""
    if not _build_tables()["operator_re"].search(text):
        return text
    return decode_with_weights(text)[0]


# ----------------------------------------------------------------------------------------------------
# Tokens and the original bytes they account for
# ----------------------------------------------------------------------------------------------------

def operator_ids(sp) -> np.ndarray:
    """Ids of the four operator pieces in the order TITLE, ALLCAPS, CAPNEXT, ESC (4..7 in a CaseOps model);
    empty unless the model has all four as pieces of their own."""
    ids = [sp.piece_to_id(op) for op in OPERATORS]
    if all(i != sp.unk_id() and sp.id_to_piece(i) == op for i, op in zip(ids, OPERATORS)):
        return np.array(ids, dtype=np.int64)
    return np.zeros(0, dtype=np.int64)


def operator_token_mask(ids: np.ndarray, op_ids: np.ndarray) -> np.ndarray:
    """True where a token is an operator at work. An operator character of the input was escaped, ESC + the
    character, and its token (the same id) is a literal: not an operator, it counts its 3 bytes."""
    ids = np.asarray(ids)
    if op_ids.size != len(OPERATORS):
        return np.zeros(ids.shape, dtype=bool)
    mask = np.isin(ids, op_ids)
    for j in np.flatnonzero(ids == op_ids[3]):
        if mask[j] and j + 1 < ids.size:
            mask[j + 1] = False
    return mask


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        b = buf[i]
        i += 1
        x |= (b & 0x7F) << shift
        if b < 0x80:
            return x, i
        shift += 7


def _skip(buf: bytes, i: int, wire_type: int) -> int:
    if wire_type == 0:
        return _varint(buf, i)[1]
    if wire_type == 2:
        n, i = _varint(buf, i)
        return i + n
    if wire_type == 5:
        return i + 4
    if wire_type == 1:
        return i + 8
    raise ValueError(f"unexpected protobuf wire type {wire_type}")


def parse_serialized_pieces(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(ids, begins) of a serialized sentencepiece.SentencePieceText (out_type="serialized_proto"), read from
    the protobuf wire format directly: field 2 = pieces, each with id = field 2 and begin = field 4 (byte
    offset of the piece's surface in the input). So the protobuf package is not needed."""
    ids, begins = [], []
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        if key == (2 << 3 | 2):  # pieces
            length, i = _varint(buf, i)
            j, end, pid, begin = i, i + length, 0, 0
            while j < end:
                k, j = _varint(buf, j)
                if k == (2 << 3 | 0):
                    pid, j = _varint(buf, j)
                elif k == (4 << 3 | 0):
                    begin, j = _varint(buf, j)
                else:
                    j = _skip(buf, j, k & 7)
            ids.append(pid)
            begins.append(begin)
            i = end
        else:
            i = _skip(buf, i, key & 7)
    return np.array(ids, dtype=np.int64), np.array(begins, dtype=np.int64)


def encode_with_offsets(sp, texts: list[str], num_threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each text, (token ids, byte offset in text.encode() where each piece's surface begins), from
    SentencePiece's own alignment, which follows its normaliser. Through the protobuf package when it is
    installed (faster), else by reading the serialized message."""
    try:
        protos = sp.encode(texts, out_type="proto", num_threads=num_threads)
    except ImportError:
        return [parse_serialized_pieces(b) for b in sp.encode(texts, out_type="serialized_proto",
                                                              num_threads=num_threads)]
    out = []
    for proto in protos:
        k = len(proto.pieces)
        out.append((np.fromiter((p.id for p in proto.pieces), dtype=np.int64, count=k),
                    np.fromiter((p.begin for p in proto.pieces), dtype=np.int64, count=k)))
    return out


def piece_byte_counts(ids: np.ndarray, begins: np.ndarray, char_weights: np.ndarray, text: str,
                      op_ids: np.ndarray) -> np.ndarray:
    """Original bytes per piece of SentencePiece's encoding of `text` (ids, and begins: byte offsets into
    text.encode() where each piece's surface starts). char_weights[j] = original bytes that character j of
    text stands for.

    Each piece takes the weights of the characters that start in [its begin, the next piece's begin); the
    first piece also takes what precedes it and the last what follows it (text the normalizer dropped, such
    as collapsed whitespace, goes to the piece before it). Pieces with equal begin (the byte-fallback pieces
    of one character, where only the last carries the span) share their total evenly. Operator pieces give
    any bytes they took to the next non-operator piece (or the previous one at the end), so they count 0.
    The counts sum to char_weights.sum()."""
    k = ids.size
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = _utf8_lengths(text)
    byte_weights = np.zeros(int(lengths.sum()) + 1, dtype=np.int64)
    byte_weights[np.cumsum(lengths) - lengths] = char_weights  # each character's weight at its first byte
    begins = begins.astype(np.int64, copy=True)
    begins[0] = 0
    begins = np.maximum.accumulate(begins)
    cum = np.concatenate([[0], np.cumsum(byte_weights)])
    ends = np.append(begins[1:], byte_weights.size)
    counts = cum[ends] - cum[begins]
    # pieces that share a begin (byte fallback of one character): split the group's bytes evenly
    same = np.flatnonzero(begins[1:] == begins[:-1])
    if same.size:
        i = 0
        while i < same.size:
            start = same[i]
            stop = start + 1
            while i < same.size and same[i] == stop - 1:
                stop += 1
                i += 1
            total = int(counts[start:stop].sum())
            q, r = divmod(total, stop - start)
            counts[start:stop] = q
            counts[start:start + r] += 1
    if op_ids.size:
        is_op = operator_token_mask(ids, op_ids)
        for j in np.flatnonzero(is_op & (counts != 0)):
            later = np.flatnonzero(~is_op[j + 1:])
            earlier = np.flatnonzero(~is_op[:j])
            if later.size:
                counts[j + 1 + later[0]] += counts[j]
                counts[j] = 0
            elif earlier.size:
                counts[earlier[-1]] += counts[j]
                counts[j] = 0
    return counts


def _spread_uint16(counts: np.ndarray, op_ids_mask: np.ndarray) -> np.ndarray:
    """Move what exceeds 65535 on a token (a huge run of dropped whitespace) to its non-operator neighbours,
    so every count fits a uint16 and the sum is kept."""
    counts = counts.copy()
    limit = 65535
    candidates = np.flatnonzero(~op_ids_mask)
    for j in np.flatnonzero(counts > limit):
        excess = int(counts[j]) - limit
        counts[j] = limit
        for other in np.concatenate([candidates[candidates > j], candidates[candidates < j][::-1]]):
            take = min(excess, limit - int(counts[other]))
            counts[other] += take
            excess -= take
            if excess == 0:
                break
        if excess:
            raise ValueError("a document's bytes do not fit its tokens' uint16 byte counts")
    return counts


def encode_with_byte_counts(sp, texts: list[str], caseops: bool = True, num_threads: int = 1,
                            op_ids: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each original document: (token ids of its transformed text, original UTF-8 bytes per token).
    The byte counts sum to len(text.encode("utf-8")); operator tokens count 0 (operator_token_mask). A document that encodes to
    no token at all gets ids and counts of length 0 (its bytes cannot be attributed; see the caller)."""
    if op_ids is None:
        op_ids = operator_ids(sp)
    transformed = [encode(t) for t in texts] if caseops else list(texts)
    results = []
    for original, text, (ids, begins) in zip(texts, transformed, encode_with_offsets(sp, transformed, num_threads)):
        if caseops:
            decoded, weights = decode_with_weights(text)
            if decoded != original:  # cannot happen: decode inverts encode
                raise AssertionError("CaseOps round trip failed")
        else:
            weights = _utf8_lengths(text)
        counts = piece_byte_counts(ids, begins, weights, text, op_ids)
        if counts.size and counts.max() > 65535:
            counts = _spread_uint16(counts, operator_token_mask(ids, op_ids))
        results.append((ids, counts))
    return results


def original_byte_counts(sp, text: str, caseops: bool = True, ids=None) -> np.ndarray:
    """Original UTF-8 bytes of each token of one document (see encode_with_byte_counts). With `ids`, check
    that they are the tokens this document encodes to."""
    got_ids, counts = encode_with_byte_counts(sp, [text], caseops)[0]
    if ids is not None and not np.array_equal(np.asarray(ids, dtype=np.int64), got_ids):
        raise ValueError("the token ids given are not the encoding of this document's transformed text")
    return counts


# ----------------------------------------------------------------------------------------------------
# Byte sidecars: one uint16 per validation token, next to each validation shard
# ----------------------------------------------------------------------------------------------------
# train_gpt.py reads and writes the format (beside the shard format it extends), so there is one copy of it.

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from train_gpt import BYTE_SIDECAR_TAG, byte_sidecar_path, read_byte_sidecar, write_byte_sidecar  # noqa: E402,F401
