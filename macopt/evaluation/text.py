"""Where ``macopt eval`` and ``macopt calibrate`` get their defaults: the tiny model of the
source checkout, and text files (plain or gzip, files or directories).

>>> from macopt.evaluation.text import read_text, tiny_model_dir
>>> text = read_text([tiny_model_dir() / "heldout.txt.gz"])  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import macopt

TEXT_SUFFIXES = (".py", ".txt", ".md", ".gz")


def tiny_model_dir() -> Path:
    """``examples/tiny-lm`` of the source checkout macopt runs from (it may be missing)."""
    return Path(macopt.__file__).resolve().parent.parent / "examples" / "tiny-lm"


def default_model() -> Path:
    """The tiny model, or an error saying how to get one."""
    path = tiny_model_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no MODEL given and the default tiny model is not at {path}. It ships with the "
            "source checkout (git clone the macopt repository and `pip install -e .` there), "
            "or train one with `python examples/train_tiny_lm.py --out DIR`; or pass a model "
            "directory or a transformers model type as MODEL.")
    return path


def held_out_file(model: str | Path) -> Path | None:
    """A model directory's own held-out text (``heldout.txt.gz`` or ``heldout.txt``)."""
    for name in ("heldout.txt.gz", "heldout.txt"):
        path = Path(model) / name
        if path.is_file():
            return path
    return None


def stdlib_text_files() -> list[Path]:
    """Real text present everywhere: the Python sources of the standard library's ``email``
    package (disjoint from the tiny model's held-out files)."""
    import email

    return sorted(Path(email.__file__).parent.glob("*.py"))


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its text files (sorted, not recursive)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"{path}: a directory without text files ({TEXT_SUFFIXES})")
            files += found
        else:
            files.append(path)
    return files


def read_text(paths: Sequence[str | Path]) -> str:
    """The files' text joined by newlines; ``.gz`` files are decompressed."""
    parts = []
    for path in expand(paths):
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
        else:
            parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)
