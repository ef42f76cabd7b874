"""Steering bundles: a folder with the vector, its contrastive pairs and file hashes.

Layout:
    vector.safetensors  tensors direction.<L> and the recipe as metadata
    pairs.jsonl         the contrastive pairs the vector was extracted from
    bundle.json         format name, version, recipe and SHA-256 of every other file
    refusal.safetensors only in orthogonalized bundles: the directions projected out,
                        so that an audit can re-derive the projected vector
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mergekit_ext import __version__
from mergekit_ext.errors import CheckpointError, MergekitExtError, OutputError
from mergekit_ext.steer.data import ContrastivePair, load_pairs, sha256_file, write_pairs
from mergekit_ext.steer.vector import SteeringVector

BUNDLE_FORMAT = "mergekit-ext-steering-bundle"
BUNDLE_VERSION = 1
VECTOR_FILE = "vector.safetensors"
PAIRS_FILE = "pairs.jsonl"
REFUSAL_FILE = "refusal.safetensors"
MANIFEST_FILE = "bundle.json"


class BundleIntegrityError(MergekitExtError):
    """A bundle file is missing or its SHA-256 differs from the one in bundle.json."""


@dataclass
class SteeringBundle:
    """A steering vector with the pairs that define it."""

    vector: SteeringVector
    pairs: list[ContrastivePair]
    refusal: SteeringVector | None = None


def save_bundle(bundle: SteeringBundle, folder: str | Path, force: bool = False) -> Path:
    """Write a bundle into `folder` atomically (temporary folder, then rename)."""
    target = Path(folder)
    if target.exists() and any(target.iterdir()) and not force:
        raise OutputError(f"output folder {target} exists and is not empty; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        bundle.vector.save(staging / VECTOR_FILE)
        write_pairs(bundle.pairs, staging / PAIRS_FILE)
        names = [VECTOR_FILE, PAIRS_FILE]
        if bundle.refusal is not None:
            bundle.refusal.save(staging / REFUSAL_FILE)
            names.append(REFUSAL_FILE)
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "tool": f"mergekit-ext {__version__}",
            "layers": bundle.vector.layers,
            "recipe": asdict(bundle.vector.recipe),
            "files": {name: sha256_file(staging / name) for name in names},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def verify_bundle(folder: str | Path) -> dict[str, str]:
    """Check every file hash listed in bundle.json; return {file: sha256} or raise."""
    source = Path(folder)
    manifest_path = source / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{source} is not a steering bundle: {MANIFEST_FILE} not found")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path}: invalid JSON ({error.msg})") from error
    if manifest.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    files = manifest.get("files", {})
    for required in (VECTOR_FILE, PAIRS_FILE):
        if required not in files:
            raise BundleIntegrityError(f"{manifest_path} lists no hash for {required}")
    for name, expected in files.items():
        path = source / name
        if not path.is_file():
            raise BundleIntegrityError(f"bundle file {path} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleIntegrityError(
                f"SHA-256 of {path} is {actual} but {MANIFEST_FILE} records {expected}: the file was changed "
                "after the bundle was written; do not use it unless you trust its new content"
            )
    return dict(files)


def load_bundle(folder: str | Path, verify: bool = True) -> SteeringBundle:
    """Read a bundle, checking file hashes first unless `verify` is False."""
    source = Path(folder)
    if verify:
        verify_bundle(source)
    vector = SteeringVector.load(source / VECTOR_FILE)
    pairs = load_pairs(source / PAIRS_FILE)
    refusal = SteeringVector.load(source / REFUSAL_FILE) if (source / REFUSAL_FILE).is_file() else None
    return SteeringBundle(vector=vector, pairs=pairs, refusal=refusal)


def load_vector(path: str | Path, allow_pickle: bool = False, verify: bool = True) -> SteeringVector:
    """Read the vector of a bundle folder, or a vector file (.safetensors, .gguf, or pickle if allowed)."""
    source = Path(path)
    if source.is_dir():
        return load_bundle(source, verify=verify).vector
    return SteeringVector.load(source, allow_pickle=allow_pickle)
