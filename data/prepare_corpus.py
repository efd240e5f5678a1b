#!/usr/bin/env python3
"""Turn a corpus of documents into challenge-format token shards, with a SentencePiece BPE tokenizer.

Input: one or more `.jsonl` or `.jsonl.xz` files, one JSON object per line with a string field "text"
(one document per line). Output, in --out-dir:

    fineweb_train_000000.bin, fineweb_train_000001.bin, ...   training documents
    fineweb_val_000000.bin, ...                               validation documents (a separate set)

Every document is written as BOS (id 1) followed by its tokens, so documents can be told apart in the
stream; shards are in the format of train_gpt.write_shard. A document may run over a shard boundary.

The tokenizer is trained on the training documents only (never on validation), with the settings of the
published FineWeb tokenizers (see TOKENIZER_TRAINER_SETTINGS), or reused from --tokenizer.

Examples:

    # separate validation files
    python3 data/prepare_corpus.py --train corpus/train_*.jsonl.xz --val corpus/val.jsonl.xz \\
        --vocab-size 8192 --out-dir data/datasets/mycorpus_sp8192 --tokenizer-prefix data/tokenizers/mycorpus_8192_bpe

    # hold out a deterministic 5% of the documents, reuse an existing tokenizer
    python3 data/prepare_corpus.py --train docs.jsonl --val-fraction 0.05 \\
        --tokenizer data/tokenizers/fineweb_8192_bpe.model --out-dir data/datasets/docs_sp8192

    # CaseOps (data/caseops.py): the tokenizer is trained on, and the shards hold, the case-factored text;
    # each validation shard gets fineweb_val_bytes_NNNNNN.bin, the original UTF-8 bytes of each of its tokens
    python3 data/prepare_corpus.py --caseops --train corpus/train_*.jsonl.xz --val corpus/val.jsonl.xz \\
        --vocab-size 8192 --out-dir data/datasets/mycorpus_sp8192_caseops \\
        --tokenizer-prefix data/tokenizers/mycorpus_8192_bpe_caseops

With --caseops (or --byte-sidecar, which writes the same sidecars for untransformed text), every validation
shard fineweb_val_NNNNNN.bin gets a sidecar fineweb_val_bytes_NNNNNN.bin: one uint16 per token, aligned token
for token, the number of bytes of the ORIGINAL document text that token accounts for (BOS 0, CaseOps operator
tokens 0); each document's counts sum to its UTF-8 length (a document that encodes to no token at all puts its
bytes on its BOS). Format: caseops.write_byte_sidecar. train_gpt.py scores val_bpb on them with CASEOPS_ENABLED=1.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import lzma
import os
import shutil
import sys
import tempfile
import time
from typing import Iterable, Iterator

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.dirname(os.path.abspath(__file__))
for _path in (REPO_ROOT, DATA_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from train_gpt import BOS_ID, write_shard  # noqa: E402  (after the sys.path set-up)

import caseops  # noqa: E402  (data/caseops.py, beside this file)

# Settings of the published FineWeb tokenizers (fineweb_1024_bpe.model, fineweb_8192_bpe.model), read from
# the trainer_spec and normalizer_spec of fineweb_8192_bpe.model (sentencepiece_model_pb2.ModelProto).
# Those set explicitly there: model_type, vocab_size, character_coverage, split_digits, byte_fallback,
# hard_vocab_limit and the four special ids; the normalizer is nmt_nfkc with add_dummy_prefix off and
# remove_extra_whitespaces on. The rest are SentencePiece's defaults, which the published model records and
# which are repeated here so that a change of SentencePiece's defaults cannot change our tokenizers.
# There are no user-defined or control symbols: "▁" (U+2581, the escaped space) is an ordinary piece that
# BPE learns as a character, as in the published model.
TOKENIZER_TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,  # unknown characters become <0x00>..<0xFF> byte pieces (ids 4..259; 8..263 with --caseops)
    split_digits=True,
    hard_vocab_limit=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    pad_piece="<pad>",
    bos_piece="<s>",
    eos_piece="</s>",
    unk_piece="<unk>",
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    remove_extra_whitespaces=True,
    # SentencePiece defaults, as recorded in the published model
    input_sentence_size=0,  # 0 = every sentence; --input-sentence-size samples instead (large corpora)
    shuffle_input_sentence=True,
    max_sentence_length=4192,
    max_sentencepiece_length=16,
    split_by_unicode_script=True,
    split_by_number=True,
    split_by_whitespace=True,
    treat_whitespace_as_suffix=False,
    allow_whitespace_only_pieces=False,
    vocabulary_output_piece_score=True,
)

SPECIAL_IDS = {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
DEFAULT_SHARD_TOKENS = 100_000_000  # as the published shards
VAL_SPLIT_SALT = b"parameter-golf-val-split-v1"


class CorpusError(Exception):
    """Bad input: a missing or unreadable file, a malformed line, an empty corpus."""


# ----------------------------------------------------------------------------------------------------
# Reading documents
# ----------------------------------------------------------------------------------------------------

def check_input_files(paths: list[str], what: str) -> list[str]:
    if not paths:
        raise CorpusError(f"no {what} files given")
    for path in paths:
        if not os.path.isfile(path):
            raise CorpusError(f"{what} file not found: {path}")
        if not (path.endswith(".jsonl") or path.endswith(".jsonl.xz")):
            raise CorpusError(f"{what} file {path}: expected a .jsonl or .jsonl.xz file")
    return paths


def _open_text(path: str):
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_documents(paths: Iterable[str]) -> Iterator[str]:
    """Yield the "text" of every line of every file, in order; blank lines are skipped, bad lines refused."""
    for path in paths:
        try:
            with _open_text(path) as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CorpusError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or "text" not in record:
                        raise CorpusError(f'{path}:{line_no}: line has no "text" field '
                                          f'(each line must be a JSON object like {{"text": "..."}})')
                    text = record["text"]
                    if not isinstance(text, str):
                        raise CorpusError(f'{path}:{line_no}: "text" is a {type(text).__name__}, expected a string')
                    if text.strip():
                        yield text
        except (lzma.LZMAError, UnicodeDecodeError, EOFError) as e:
            raise CorpusError(f"{path}: cannot read ({e}); expected UTF-8 JSON lines, optionally xz-compressed") from None


def text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def is_val_document(text: str, val_fraction: float) -> bool:
    """Deterministic split: a document goes to validation when a salted hash of its text falls below the
    fraction. It depends on the text only (not on file order), and identical documents share a side."""
    h = hashlib.sha256(VAL_SPLIT_SALT + text.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") < val_fraction * 2**64


class Corpus:
    """The train and val document streams, re-readable (the tokenizer is trained in a first pass)."""

    def __init__(self, train_files: list[str], val_files: list[str] | None, val_fraction: float | None):
        self.train_files = train_files
        self.val_files = val_files
        self.val_fraction = val_fraction
        self._val_hashes: set[bytes] | None = None
        self.dropped_train_duplicates = 0

    def val_hashes(self) -> set[bytes]:
        if self._val_hashes is None:
            self._val_hashes = {text_hash(t) for t in self.val()} if self.val_files else set()
        return self._val_hashes

    def train(self) -> Iterator[str]:
        if self.val_files:
            val_hashes = self.val_hashes()
            dropped = 0
            for text in read_documents(self.train_files):
                if text_hash(text) in val_hashes:  # keep validation a separate document set
                    dropped += 1
                    continue
                yield text
            self.dropped_train_duplicates = dropped
        else:
            for text in read_documents(self.train_files):
                if not is_val_document(text, self.val_fraction):
                    yield text

    def val(self) -> Iterator[str]:
        if self.val_files:
            yield from read_documents(self.val_files)
        else:
            for text in read_documents(self.train_files):
                if is_val_document(text, self.val_fraction):
                    yield text


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------

def training_sentences(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """SentencePiece trains on "sentences" and skips any longer than max_sentence_length bytes, so feed it
    the documents' lines (the normalizer turns newlines into spaces anyway), long lines cut at spaces."""
    for doc in documents:
        for line in doc.split("\n"):
            line = line.strip()
            while len(line.encode("utf-8")) > max_bytes:
                cut = max_bytes // 4  # characters: at most 4 bytes each in UTF-8, so this piece fits
                space = line.rfind(" ", 0, cut)
                if space > 0:
                    cut = space
                head, line = line[:cut].strip(), line[cut:].strip()
                if head:
                    yield head
            if line:
                yield line


def train_tokenizer(documents: Iterable[str], vocab_size: int, prefix: str, input_sentence_size: int = 0,
                    num_threads: int | None = None, verbose: bool = False, caseops_symbols: bool = False) -> str:
    """Train on `documents` as given (with --caseops the caller passes transformed text). caseops_symbols:
    declare the four CaseOps operators as user-defined symbols, ids 4..7 in the order TITLE, ALLCAPS,
    CAPNEXT, ESC, as in the published fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model (byte
    pieces then take ids 8..263); a user-defined symbol is always one piece, never merged."""
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    settings = dict(TOKENIZER_TRAINER_SETTINGS)
    settings["input_sentence_size"] = input_sentence_size
    if caseops_symbols:
        settings["user_defined_symbols"] = list(caseops.OPERATORS)
    seen = {"sentences": 0}

    def sentences():
        for s in training_sentences(documents, settings["max_sentence_length"]):
            seen["sentences"] += 1
            yield s

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=prefix,
            vocab_size=vocab_size,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 1,
            **settings,
        )
    except RuntimeError as e:
        if seen["sentences"] == 0:
            raise CorpusError("the training set is empty: no document text to train the tokenizer on") from None
        raise CorpusError(f"SentencePiece training failed: {e}") from None
    if seen["sentences"] == 0:
        raise CorpusError("the training set is empty: no document text to train the tokenizer on")
    return prefix + ".model"


def load_tokenizer(path: str, vocab_size: int | None = None):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise CorpusError(f"tokenizer model not found: {path}")
    sp = spm.SentencePieceProcessor(model_file=path)
    ids = {"pad": sp.pad_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    if ids != SPECIAL_IDS:
        raise CorpusError(f"{path}: special ids {ids}, expected {SPECIAL_IDS} as in the published tokenizers")
    if sp.vocab_size() > 65536:
        raise CorpusError(f"{path}: vocabulary of {sp.vocab_size()} does not fit the uint16 shards")
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise CorpusError(f"{path}: vocabulary of {sp.vocab_size()} pieces, but --vocab-size {vocab_size}")
    return sp


def check_caseops_tokenizer(sp, path: str, caseops_wanted: bool) -> None:
    """A CaseOps tokenizer has each operator as one piece; refuse to mix CaseOps and plain text and models."""
    found = caseops.operator_ids(sp)
    if caseops_wanted and found.size != len(caseops.OPERATORS):
        raise CorpusError(f"{path}: not a CaseOps tokenizer (its pieces do not include the four operators "
                          f"U+E001..U+E004 as user-defined symbols); train one with --caseops --tokenizer-prefix")
    if not caseops_wanted and found.size == len(caseops.OPERATORS):
        raise CorpusError(f"{path}: a CaseOps tokenizer (it has the operators U+E001..U+E004 as pieces): "
                          f"pass --caseops, so that the text is transformed as it expects")


# ----------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------

def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_split(sp, documents: Iterable[str], out_dir: str, split: str, shard_tokens: int,
                progress: bool = True, num_threads: int | None = None, written: list[str] | None = None,
                caseops_transform: bool = False, byte_sidecars: bool = False) -> dict:
    """Encode documents as BOS + tokens into fineweb_{split}_NNNNNN.bin shards of shard_tokens tokens
    (the last one shorter). Returns counts; each shard's path is also appended to `written` as it is made.
    caseops_transform: encode the CaseOps transform of each document (caseops.encode). byte_sidecars: also
    write fineweb_{split}_bytes_NNNNNN.bin beside each shard, the original UTF-8 bytes of each token."""
    from tqdm import tqdm

    threads = num_threads or os.cpu_count() or 1
    buf = np.empty(shard_tokens, dtype=np.uint16)
    byte_buf = np.zeros(shard_tokens, dtype=np.uint16) if byte_sidecars else None
    op_ids = caseops.operator_ids(sp)
    fill = 0
    shards: list[str] = []
    n_docs = n_tokens = n_bytes = n_sidecar_bytes = n_operator_tokens = 0

    def flush():
        nonlocal fill
        path = os.path.join(out_dir, f"fineweb_{split}_{len(shards):06d}.bin")
        if byte_sidecars:  # the sidecar first: a shard on disk always has its sidecar
            sidecar = os.path.join(out_dir, f"fineweb_{split}_bytes_{len(shards):06d}.bin")
            if written is not None:
                written.append(sidecar)
            caseops.write_byte_sidecar(sidecar, byte_buf[:fill])
        write_shard(path, buf[:fill])
        shards.append(path)
        if written is not None:
            written.append(path)
        fill = 0

    bar = tqdm(desc=f"encoding {split}", unit=" docs", disable=not progress, file=sys.stderr)
    for batch in _batches(documents, 256):
        if byte_sidecars:
            encoded = caseops.encode_with_byte_counts(sp, batch, caseops_transform, threads, op_ids)
        else:
            texts = [caseops.encode(t) for t in batch] if caseops_transform else batch
            encoded = [(ids, None) for ids in sp.encode(texts, num_threads=threads)]
        for text, (ids, counts) in zip(batch, encoded):
            doc = np.empty(len(ids) + 1, dtype=np.uint16)
            doc[0] = BOS_ID
            doc[1:] = ids
            text_bytes = len(text.encode("utf-8"))
            if byte_sidecars:
                doc_bytes = np.empty(doc.size, dtype=np.int64)
                # BOS counts 0, except for a document that encodes to no token (its bytes go on its BOS)
                doc_bytes[0] = 0 if len(ids) else text_bytes
                doc_bytes[1:] = counts
                if int(doc_bytes.sum()) != text_bytes or doc_bytes.max() > 65535:
                    raise AssertionError(f"byte counts of a {split} document sum to {int(doc_bytes.sum())}, "
                                         f"not its {text_bytes} bytes")
                n_sidecar_bytes += text_bytes
            if op_ids.size:
                n_operator_tokens += int(caseops.operator_token_mask(doc, op_ids).sum())
            n_docs += 1
            n_tokens += doc.size
            n_bytes += text_bytes
            pos = 0
            while pos < doc.size:
                take = min(doc.size - pos, shard_tokens - fill)
                buf[fill:fill + take] = doc[pos:pos + take]
                if byte_sidecars:
                    byte_buf[fill:fill + take] = doc_bytes[pos:pos + take]
                fill += take
                pos += take
                if fill == shard_tokens:
                    flush()
        bar.set_postfix(tokens=f"{n_tokens:,}", shards=len(shards) + (fill > 0), refresh=False)
        bar.update(len(batch))
    bar.close()
    if fill:
        flush()
    if n_docs == 0:
        raise CorpusError(f"no {split} documents: the {split} set is empty"
                          + (" (raise --val-fraction or give --val files)" if split == "val" else ""))
    return {"split": split, "documents": n_docs, "tokens": n_tokens, "text_bytes": n_bytes, "shards": shards,
            "sidecar_bytes": n_sidecar_bytes if byte_sidecars else None, "operator_tokens": n_operator_tokens}


def existing_shards(out_dir: str) -> list[str]:
    """Shards and byte sidecars already in out_dir (fineweb_val_*.bin matches fineweb_val_bytes_*.bin too)."""
    return sorted(glob.glob(os.path.join(out_dir, "fineweb_train_*.bin"))
                  + glob.glob(os.path.join(out_dir, "fineweb_val_*.bin")))


def swap_in(staging: str, out_dir: str, old: list[str]) -> None:
    """Move the shards built in staging into out_dir, replacing same-named ones, then drop the old ones left over."""
    new = {name: os.path.join(out_dir, name) for name in sorted(os.listdir(staging))}
    for name, dest in new.items():
        os.replace(os.path.join(staging, name), dest)
    for path in old:
        if path not in new.values() and os.path.exists(path):
            os.remove(path)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", nargs="+", required=True, metavar="FILE", help="training document files")
    val = p.add_mutually_exclusive_group(required=True)
    val.add_argument("--val", nargs="+", metavar="FILE", help="validation document files (a separate set)")
    val.add_argument("--val-fraction", type=float, metavar="F",
                     help="hold out this fraction of the --train documents as validation (deterministic, by a "
                          "hash of each document's text)")
    p.add_argument("--vocab-size", type=int, help="vocabulary size of the tokenizer to train (e.g. 1024, 8192)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer-prefix", metavar="PATH",
                     help="train a tokenizer and write PATH.model and PATH.vocab")
    tok.add_argument("--tokenizer", metavar="MODEL", help="reuse this SentencePiece model instead of training one")
    p.add_argument("--out-dir", required=True, help="folder for the fineweb_{train,val}_NNNNNN.bin shards")
    p.add_argument("--caseops", action="store_true",
                   help="CaseOps (data/caseops.py): train the tokenizer on, and encode, the case-factored text, "
                        "with the operators as user-defined symbols; write byte sidecars beside the val shards")
    p.add_argument("--byte-sidecar", action="store_true",
                   help="write fineweb_val_bytes_NNNNNN.bin (original UTF-8 bytes per token) beside each val "
                        "shard without CaseOps, to score a plain tokenizer on original bytes (implied by --caseops)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train the tokenizer on a random sample of this many lines (default 0: all lines)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out-dir (only once the new ones are all built)")
    p.add_argument("--num-threads", type=int, default=None, help="threads for training and encoding")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    args = p.parse_args(argv)
    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        p.error("--val-fraction must be between 0 and 1")
    if args.tokenizer_prefix and not args.vocab_size:
        p.error("--vocab-size is needed to train a tokenizer (--tokenizer-prefix)")
    if args.vocab_size is not None and not 260 < args.vocab_size <= 65536:
        p.error("--vocab-size must be above 260 (4 special + 256 byte pieces) and at most 65536 (uint16 shards)")
    if args.shard_tokens <= 0:
        p.error("--shard-tokens must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        from tqdm import tqdm

        check_input_files(args.train, "--train")
        if args.val:
            check_input_files(args.val, "--val")
        if args.tokenizer:  # fail early on a bad model
            check_caseops_tokenizer(load_tokenizer(args.tokenizer, args.vocab_size), args.tokenizer, args.caseops)
        os.makedirs(args.out_dir, exist_ok=True)
        old = existing_shards(args.out_dir)
        if old and not args.overwrite:
            raise CorpusError(f"{args.out_dir} already has {len(old)} shard(s) ({os.path.basename(old[0])}, ...): "
                              f"pass --overwrite to replace them, or choose another --out-dir")
        corpus = Corpus(args.train, args.val, args.val_fraction)
        progress = not args.no_progress

        if args.tokenizer:
            model_path = args.tokenizer
        else:
            print(f"training a {args.vocab_size}-piece BPE tokenizer on the training documents "
                  f"(the SentencePiece step can take minutes on a large corpus)", file=sys.stderr)
            docs = tqdm(corpus.train(), desc="reading train for tokenizer", unit=" docs",
                        disable=not progress, file=sys.stderr)
            if args.caseops:
                docs = (caseops.encode(d) for d in docs)
            model_path = train_tokenizer(docs, args.vocab_size, args.tokenizer_prefix, args.input_sentence_size,
                                         args.num_threads, args.verbose, caseops_symbols=args.caseops)
            print(f"tokenizer: {model_path}", file=sys.stderr)
        sp = load_tokenizer(model_path, args.vocab_size)
        check_caseops_tokenizer(sp, model_path, args.caseops)
        sidecars = args.caseops or args.byte_sidecar

        # Built aside in a temporary folder, swapped in only once every shard is written: a failure late in the
        # input leaves the shards already in --out-dir as they were.
        staging = tempfile.mkdtemp(prefix=".prepare_corpus.", dir=args.out_dir)
        try:
            written: list[str] = []
            stats = [write_split(sp, corpus.val(), staging, "val", args.shard_tokens, progress,
                                 args.num_threads, written, args.caseops, sidecars),
                     write_split(sp, corpus.train(), staging, "train", args.shard_tokens, progress,
                                 args.num_threads, written, args.caseops)]
            swap_in(staging, args.out_dir, old)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for s in stats:
            s["shards"] = [os.path.join(args.out_dir, os.path.basename(path)) for path in s["shards"]]
    except CorpusError as e:
        print(f"prepare_corpus: error: {e}", file=sys.stderr)
        return 1

    if corpus.dropped_train_duplicates:
        print(f"dropped {corpus.dropped_train_duplicates} training documents identical to validation documents",
              file=sys.stderr)
    for s in stats:
        print(f"{s['split']}: {s['documents']:,} documents, {s['tokens']:,} tokens (BOS included), "
              f"{s['text_bytes']:,} text bytes, {s['text_bytes'] / max(s['tokens'], 1):.3f} bytes/token, "
              f"{len(s['shards'])} shard(s)"
              + (f", {s['operator_tokens']:,} CaseOps operator tokens" if args.caseops else "")
              + (f", byte sidecars summing to {s['sidecar_bytes']:,} bytes" if s["sidecar_bytes"] is not None
                 else ""))
    print(f"wrote shards to {args.out_dir} with tokenizer {model_path} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
