#!/usr/bin/env python3
"""Download the challenge's published FineWeb shards and tokenizer from the Hugging Face Hub.

    python3 data/cached_challenge_fineweb.py --variant sp8192                 # tokenizer, all val, 80 train shards
    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 1

Writes (under --local-dir, by default this repository's data/ folder):

    datasets/fineweb10B_<variant>/fineweb_train_NNNNNN.bin, fineweb_val_NNNNNN.bin
    tokenizers/<the variant's tokenizer files>

It first reads <root>/manifest.json from the dataset repo, which names each dataset
(e.g. fineweb10B_sp1024), its tokenizer and its shard counts; shards are at
<root>/datasets/<name>/fineweb_{train,val}_NNNNNN.bin and tokenizers at <root>/<their path in the manifest>.
Every validation shard is fetched, and the first --train-shards training shards.

Files already complete are skipped: a shard whose header and size check out (train_gpt.read_shard_header),
a tokenizer file of the size the server reports. Each file is downloaded to a staging folder beside its
destination, checked (the size the server reported; a shard's header against its length), and only then
moved into place, so an interrupted or failed download never leaves a partial file where training reads.

CaseOps (data/caseops.py): `--variant sp8192_caseops` fetches the CaseOps variant, published in its own dataset
repo (romeerp/parameter-golf-caseops-v1, or MATCHED_FINEWEB_CASEOPS_REPO_ID) with the same manifest layout. Its
dataset is fineweb10B_sp8192_caseops, or else the one dataset of its manifest whose tokenizer is
fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model. Besides the shards and the tokenizer it fetches each
validation shard's byte sidecar, datasets/<name>/fineweb_val_bytes_NNNNNN.bin (one uint16 per token: its bytes
in the original text), and checks that the sidecar has as many entries as its shard has tokens. Train with
CASEOPS_ENABLED=1, so that val_bpb counts the original bytes.

Environment: MATCHED_FINEWEB_REPO_ID (default willdepueoai/parameter-golf), MATCHED_FINEWEB_CASEOPS_REPO_ID
(default romeerp/parameter-golf-caseops-v1, for --variant sp8192_caseops), MATCHED_FINEWEB_REMOTE_ROOT_PREFIX
(default "datasets"), MATCHED_FINEWEB_REVISION (default main); HF_ENDPOINT and HF_TOKEN as for huggingface_hub.
"""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import shutil
import sys
import tempfile
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.dirname(os.path.abspath(__file__))
for _path in (REPO_ROOT, DATA_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from train_gpt import ShardError, read_shard_header  # noqa: E402  (after the sys.path set-up)

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
# Variants published in a dataset repo of their own: variant -> (env override, default repo, tokenizer file
# that identifies the dataset in that repo's manifest). Their validation shards come with byte sidecars.
CASEOPS_VARIANTS = {
    "sp8192_caseops": ("MATCHED_FINEWEB_CASEOPS_REPO_ID", "romeerp/parameter-golf-caseops-v1",
                       "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"),
}
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80
DEFAULT_LOCAL_DIR = os.path.join(REPO_ROOT, "data")


class DownloadError(Exception):
    """A download that cannot be completed; the message says what is wrong and what to do."""


class ManifestError(DownloadError):
    """The manifest does not have the layout this script expects."""


# ----------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    dataset_name: str
    tokenizer_name: str
    tokenizer_files: list[str]  # paths relative to the remote root
    files_train: int
    files_val: int
    byte_sidecars: bool = False  # fetch datasets/<name>/fineweb_val_bytes_NNNNNN.bin beside each val shard


def _require(obj, key: str, kind: type, where: str):
    if not isinstance(obj, dict):
        raise ManifestError(f"manifest: {where} is a {type(obj).__name__}, expected an object with key {key!r}")
    if key not in obj:
        raise ManifestError(f"manifest: {where} has no key {key!r} (keys: {sorted(obj)})")
    value = obj[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
            raise ManifestError(f"manifest: {where}[{key!r}] is {value!r}, expected a non-negative integer")
        return int(value)
    if not isinstance(value, kind):
        raise ManifestError(f"manifest: {where}[{key!r}] is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def _safe_relative(path: str, where: str) -> str:
    norm = posixpath.normpath(path)
    if not path or norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise ManifestError(f"manifest: {where} path {path!r} is not a relative path inside the repository")
    return norm


def _find_named(manifest, list_key: str, name: str):
    """The entry of manifest[list_key] whose "name" is `name`, or None."""
    for i, entry in enumerate(_require(manifest, list_key, list, "top level")):
        if _require(entry, "name", str, f"{list_key}[{i}]") == name:
            return entry
    return None


def _names(manifest, list_key: str) -> list:
    return [e.get("name") for e in manifest[list_key] if isinstance(e, dict)]


def _tokenizer_model_path(manifest, tokenizer_name) -> str | None:
    tok = _find_named(manifest, "tokenizers", tokenizer_name) if isinstance(tokenizer_name, str) else None
    if not isinstance(tok, dict):
        return None
    path = tok.get("model_path", tok.get("path"))
    return path if isinstance(path, str) else None


def plan_from_manifest(manifest, variant: str) -> Plan:
    """Find the dataset fineweb10B_<variant> and its tokenizer in the manifest; errors name the missing key.
    For a CaseOps variant, a dataset of another name is found by its tokenizer file, and sidecars are planned."""
    name = f"fineweb10B_{variant}"
    entry = _find_named(manifest, "datasets", name)
    caseops = variant in CASEOPS_VARIANTS
    if entry is None and caseops:
        tokenizer_file = CASEOPS_VARIANTS[variant][2]
        matches = [e for e in manifest["datasets"] if isinstance(e, dict) and
                   posixpath.basename(_tokenizer_model_path(manifest, e.get("tokenizer_name")) or "") == tokenizer_file]
        if len(matches) == 1:
            entry = matches[0]
            name = _require(entry, "name", str, "datasets[...]")
        elif len(matches) > 1:
            raise ManifestError(f"manifest: several datasets use {tokenizer_file} "
                                f"({[e.get('name') for e in matches]}) and none is named {name!r}")
    if entry is None:
        raise ManifestError(f"manifest: no dataset named {name!r} in 'datasets' (has: {_names(manifest, 'datasets')})"
                            + (f" and none uses the tokenizer {CASEOPS_VARIANTS[variant][2]}" if caseops else "")
                            + "; check --variant")
    where = f"datasets[{name!r}]"
    tokenizer_name = _require(entry, "tokenizer_name", str, where)
    stats = _require(entry, "stats", dict, where)
    files_train = _require(stats, "files_train", int, f"{where}['stats']")
    files_val = _require(stats, "files_val", int, f"{where}['stats']")
    if files_val == 0:
        raise ManifestError(f"manifest: {where}['stats']['files_val'] is 0: the dataset has no validation shards")

    tok = _find_named(manifest, "tokenizers", tokenizer_name)
    if tok is None:
        raise ManifestError(f"manifest: dataset {name!r} uses tokenizer {tokenizer_name!r}, which is not in "
                            f"'tokenizers' (has: {_names(manifest, 'tokenizers')})")
    twhere = f"tokenizers[{tokenizer_name!r}]"
    if "model_path" in tok:
        model = _require(tok, "model_path", str, twhere)
    elif "path" in tok:
        model = _require(tok, "path", str, twhere)
    else:
        raise ManifestError(f"manifest: {twhere} has no key 'model_path' (nor 'path') (keys: {sorted(tok)})")
    files = [_safe_relative(model, f"{twhere}['model_path']")]
    if "vocab_path" in tok and tok["vocab_path"]:
        files.append(_safe_relative(_require(tok, "vocab_path", str, twhere), f"{twhere}['vocab_path']"))
    return Plan(name, tokenizer_name, files, files_train, files_val, byte_sidecars=caseops)


# ----------------------------------------------------------------------------------------------------
# Downloading one file
# ----------------------------------------------------------------------------------------------------

LISTED_BUT_MISSING = ("The manifest lists it but the repository does not have it (an incomplete upload?). Files "
                      "already complete are kept; with fewer --train-shards you may not need this file")


class Remote:
    def __init__(self, repo_id: str, root: str, revision: str):
        self.repo_id = repo_id
        self.root = root.strip("/")
        self.revision = revision

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if self.root else relative

    def _describe(self, remote_path: str) -> str:
        from huggingface_hub import constants
        return f"{remote_path} in dataset repo {self.repo_id} (revision {self.revision}) at {constants.ENDPOINT}"

    def _translate(self, e: Exception, remote_path: str, if_missing: str) -> DownloadError:
        """A huggingface_hub / network error as a DownloadError that says what is missing and what to do."""
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        what = self._describe(remote_path)
        if isinstance(e, RepositoryNotFoundError):
            return DownloadError(f"repository not found: {self.repo_id} (set MATCHED_FINEWEB_REPO_ID, or HF_TOKEN "
                                 f"if it is private)")
        if isinstance(e, RevisionNotFoundError):
            return DownloadError(f"revision {self.revision!r} not found in {self.repo_id} "
                                 f"(set MATCHED_FINEWEB_REVISION)")
        if isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code == 404:
            return DownloadError(f"missing on the server: {what}. {if_missing}")
        if isinstance(e, HfHubHTTPError):
            return DownloadError(f"the server refused {what}: {str(e).strip().splitlines()[0]}")
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            return DownloadError(f"truncated download of {what}: {str(e).splitlines()[0]} Run again to retry.")
        if type(e).__name__ == "RemoteProtocolError" and "complete message body" in str(e):
            return DownloadError(f"incomplete download of {what}: the server closed the connection early ({e}), "
                                 f"also on resuming. Run again later: complete files are kept")
        # huggingface_hub's HTTP client (httpx2 in huggingface_hub 2.x, httpx before) raises its own network errors
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in ("httpx", "httpx2"):
            return DownloadError(f"network error while fetching {what}: {e}. Check the connection (and HF_ENDPOINT) "
                                 f"and run again: complete files are kept")
        return DownloadError(f"download of {what} failed: {type(e).__name__}: {e}")

    def remote_size(self, remote_path: str, if_missing: str = LISTED_BUT_MISSING) -> int | None:
        """The file's size as the server reports it (HEAD), or None if it does not say."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(self.repo_id, remote_path, repo_type="dataset", revision=self.revision)
        try:
            return get_hf_file_metadata(url).size
        except Exception as e:  # noqa: BLE001 (translated, with the cause kept)
            raise self._translate(e, remote_path, if_missing) from e

    def fetch(self, remote_path: str, dest: str, expected_size: int | None = None, check=None,
              if_missing: str = LISTED_BUT_MISSING) -> None:
        """Download remote_path to dest through a staging folder beside dest: the file is checked (size, then
        `check(path)`) before an atomic os.replace; on any failure nothing is left at dest."""
        from huggingface_hub import hf_hub_download

        dest_dir = os.path.dirname(os.path.abspath(dest))
        os.makedirs(dest_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".download-", dir=dest_dir)
        try:
            if expected_size is None:
                expected_size = self.remote_size(remote_path, if_missing)
            try:
                local = hf_hub_download(self.repo_id, remote_path, repo_type="dataset", revision=self.revision,
                                        local_dir=staging)
            except Exception as e:  # noqa: BLE001 (translated, with the cause kept)
                raise self._translate(e, remote_path, if_missing) from e
            size = os.path.getsize(local)
            if expected_size is not None and size != expected_size:
                raise DownloadError(f"truncated download of {self._describe(remote_path)}: got {size} bytes, the "
                                    f"server reports {expected_size}. Run again to retry.")
            if check is not None:
                try:
                    check(local)
                except ShardError as e:
                    raise DownloadError(f"{remote_path} downloaded but is not a valid shard: {e}. Nothing was "
                                        f"written to {dest}; run again, and if it persists the remote file is "
                                        f"damaged") from None
            os.replace(local, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

def shard_is_complete(path: str) -> bool:
    try:
        read_shard_header(path)
        return True
    except ShardError:
        return False


def sidecar_checker(shard_path: str):
    """check(path) for a byte sidecar: the shard format, a consistent recorded total, and one entry per token
    of its (already downloaded) validation shard."""
    def check(path: str) -> None:
        from caseops import read_byte_sidecar  # data/caseops.py

        counts, _ = read_byte_sidecar(path)
        tokens = read_shard_header(shard_path)
        if counts.size != tokens:
            raise ShardError(f"{counts.size} byte counts, but {os.path.basename(shard_path)} holds {tokens} tokens")
    return check


def sidecar_is_complete(path: str, shard_path: str) -> bool:
    try:
        sidecar_checker(shard_path)(path)
        return True
    except ShardError:
        return False


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", required=True, help="tokenizer variant: sp1024 or sp8192 (the dataset is "
                                                    "fineweb10B_<variant>), or sp8192_caseops (CaseOps, from its "
                                                    "own repo, with byte sidecars)")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                   help=f"number of training shards (default {DEFAULT_TRAIN_SHARDS}, capped by the manifest); "
                        f"all validation shards are always fetched")
    p.add_argument("--local-dir", default=DEFAULT_LOCAL_DIR,
                   help="where datasets/ and tokenizers/ go (default: this repository's data/ folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.train_shards < 0:
        p.error("--train-shards must be 0 or more")
    if not args.variant or "/" in args.variant or args.variant.startswith("."):
        p.error(f"--variant {args.variant!r}: expected a name like sp1024 or sp8192")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from huggingface_hub.utils import disable_progress_bars
    from tqdm import tqdm

    disable_progress_bars()  # one bar over files instead of one per file
    repo_env, default_repo = CASEOPS_VARIANTS[args.variant][:2] if args.variant in CASEOPS_VARIANTS else (
        "MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID)
    remote = Remote(os.environ.get(repo_env, default_repo),
                    os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT),
                    os.environ.get("MATCHED_FINEWEB_REVISION", "main"))
    local_dir = os.path.abspath(args.local_dir)
    try:
        os.makedirs(local_dir, exist_ok=True)
        manifest_tmp = tempfile.mkdtemp(prefix=".manifest-", dir=local_dir)
        try:
            manifest_path = os.path.join(manifest_tmp, "manifest.json")
            remote.fetch(remote.path("manifest.json"), manifest_path,
                         if_missing=f"Check {repo_env} and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (the folder "
                                    "of manifest.json in the dataset repo), and HF_ENDPOINT if set")
            try:
                with open(manifest_path, encoding="utf-8") as f:
                    manifest = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ManifestError(f"manifest.json from {remote.repo_id} is not valid JSON: {e}") from None
        finally:
            shutil.rmtree(manifest_tmp, ignore_errors=True)
        plan = plan_from_manifest(manifest, args.variant)

        n_train = min(args.train_shards, plan.files_train)
        if args.train_shards > plan.files_train:
            print(f"note: {plan.dataset_name} has {plan.files_train} training shards; fetching all of them",
                  file=sys.stderr)
        dataset_dir = os.path.join(local_dir, "datasets", plan.dataset_name)
        jobs = []  # (remote relative path, local path, kind)
        for rel in plan.tokenizer_files:
            jobs.append((rel, os.path.join(local_dir, *rel.split("/")), "tokenizer"))
        for split, count in (("val", plan.files_val), ("train", n_train)):
            for i in range(count):
                name = f"fineweb_{split}_{i:06d}.bin"
                jobs.append((f"datasets/{plan.dataset_name}/{name}", os.path.join(dataset_dir, name), "shard"))
                if split == "val" and plan.byte_sidecars:  # after its shard, against which it is checked
                    name = f"fineweb_val_bytes_{i:06d}.bin"
                    jobs.append((f"datasets/{plan.dataset_name}/{name}", os.path.join(dataset_dir, name), "sidecar"))

        downloaded = skipped = 0
        bar = tqdm(jobs, desc=f"{plan.dataset_name}", unit="file", disable=args.no_progress, file=sys.stderr)
        for rel, dest, kind in bar:
            bar.set_postfix_str(os.path.basename(dest))
            remote_path = remote.path(rel)
            if kind == "shard":
                if shard_is_complete(dest):
                    skipped += 1
                    continue
                remote.fetch(remote_path, dest, check=read_shard_header)
            elif kind == "sidecar":
                shard = dest.replace("fineweb_val_bytes_", "fineweb_val_")
                if sidecar_is_complete(dest, shard):
                    skipped += 1
                    continue
                remote.fetch(remote_path, dest, check=sidecar_checker(shard))
            else:
                size = remote.remote_size(remote_path)
                if os.path.isfile(dest) and size is not None and os.path.getsize(dest) == size:
                    skipped += 1
                    continue
                remote.fetch(remote_path, dest, expected_size=size)
            downloaded += 1
        bar.close()
    except DownloadError as e:
        print(f"cached_challenge_fineweb: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cached_challenge_fineweb: interrupted; complete files are kept, run again to finish",
              file=sys.stderr)
        return 130

    tokenizer_model = os.path.join(local_dir, *plan.tokenizer_files[0].split("/"))
    print(f"{downloaded} file(s) downloaded, {skipped} already complete: {plan.files_val} val + {n_train} train "
          f"shard(s)" + (f" + {plan.files_val} val byte sidecar(s)" if plan.byte_sidecars else "")
          + f" in {dataset_dir}, tokenizer {tokenizer_model}")
    print(f"use: DATA_PATH={dataset_dir} TOKENIZER_PATH={tokenizer_model}"
          + (" CASEOPS_ENABLED=1" if plan.byte_sidecars else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
