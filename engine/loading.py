"""`load_engine`: resolve a model (folder or hub id), build it on meta, assign the weights strictly."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from engine.config import MedPLIBConfig
from engine.modeling.medplib import MedPLIBModel
from engine.results import ModelInfo
from engine.tokenizer import MedPLIBTokenizer
from engine.weights import checkpoint_files, finish_on_device, load_released_state, parameters_on_meta

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "medplib-tiny"
RELEASED_MODEL_ID = "Huangxs/MedPLIB-7b-2e"
QUANTIZATION_MODES = ("8bit", "4bit")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local folder nor a cached / downloadable hub id."""


def resolve_model(model: str | Path | None, *, revision: str | None = None) -> Path:
    """A local checkpoint folder for `model`: None → the shipped small model; a folder; or a hub id."""
    if model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ModelNotFoundError(
                f"the shipped small model is missing at {DEFAULT_MODEL_DIR}: pass --model FOLDER or a hub id")
        return DEFAULT_MODEL_DIR
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json: not a MedPLIB checkpoint")
        return path
    text = str(model)
    if text.count("/") != 1 or text.startswith((".", "/")) or path.suffix:
        raise ModelNotFoundError(f"unknown model {text!r}: give a checkpoint folder or a hub id like {RELEASED_MODEL_ID}")
    return _snapshot(text, revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    base = ["*.json", "*.model", "*.safetensors"]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=offline, allow_patterns=base))
        if not any(folder.glob("*.safetensors")):  # .bin shards only as a fallback: never fetch both formats
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                            allow_patterns=[*base, "pytorch_model*.bin"]))
        return folder
    except LocalEntryNotFoundError as err:
        raise ModelNotFoundError(
            f"{repo_id}@{revision or 'main'} is not in the local Hugging Face cache and "
            f"{'HF_HUB_OFFLINE=1 forbids downloading' if offline else 'could not be downloaded'}: "
            f"download it once with `huggingface-cli download {repo_id}` or pass a local folder") from err
    except Exception as err:  # hub errors: repository not found, network refused, ...
        raise ModelNotFoundError(f"could not get {repo_id!r} from the hub: {err}") from err


def pick_device_dtype(device: str | None, dtype: str | torch.dtype | None) -> tuple[str, torch.dtype]:
    """Defaults: CUDA with bf16 when available, else CPU with fp32."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    if dtype is None:
        return device, (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if isinstance(dtype, torch.dtype):
        return device, dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: one of {sorted(_DTYPES)}")
    return device, _DTYPES[dtype]


def build_model(config: MedPLIBConfig, folder: Path, *, device: str, dtype: torch.dtype) -> MedPLIBModel:
    """Build on the meta device, assign the checkpoint's tensors strictly, finish buffers on `device`."""
    with parameters_on_meta():
        model = MedPLIBModel(config)
    skipped = load_released_state(model, checkpoint_files(folder), dtype=dtype, device=device)
    if skipped:
        log.info("skipped %d harmless released buffers (e.g. %s)", len(skipped), skipped[0])
    finish_on_device(model, dtype=dtype, device=device)
    return model.eval()


def quantize(model: MedPLIBModel, mode: str, device: str) -> None:
    """Swap the decoder's Linear layers for bitsandbytes 8-/4-bit ones (CUDA only), on the device."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {mode!r}")
    if not device.startswith("cuda"):
        raise RuntimeError("8-bit/4-bit loading needs a CUDA GPU (bitsandbytes); on CPU load in float32")
    try:
        import bitsandbytes as bnb  # noqa: F401
    except ImportError as err:
        raise RuntimeError("8-bit/4-bit loading needs bitsandbytes: `pip install -r requirements-cuda.txt`") from err
    from engine.quantize import quantize_decoder

    compute = model.lm_head.weight.dtype
    n = quantize_decoder(model.llm, mode, compute_dtype=compute if compute != torch.float32 else torch.bfloat16)
    log.info("quantised %d decoder Linear layers to %s", n, mode)


def load_engine(model: str | Path | None = None, *, device: str | None = None, dtype: str | torch.dtype | None = None,
                revision: str | None = None, quantization: str | None = None, postprocess: str | None = None,
                decode: str = "fast", graphs: str = "auto"):
    """Load a MedPLIB checkpoint in the released layout and return an `Engine`.

    model: None (the shipped small model), a checkpoint folder, or a hub id such as "Huangxs/MedPLIB-7b-2e".
    postprocess: "medplib" (the released slice quirk), "crop" (corrected), or None for the model's own default.
    decode: "fast" (static cache, host-sync-free step, prefix reuse; CUDA graphs on CUDA) or "plain" (one eager
    forward per token, the reference loop). graphs: "auto", "cuda-graph", "compile" or "none" (fast only).
    """
    from engine.inference import Engine

    folder = resolve_model(model, revision=revision)
    device, torch_dtype = pick_device_dtype(device, dtype)
    config = MedPLIBConfig.from_folder(folder, postprocess=postprocess)
    tokenizer = MedPLIBTokenizer.from_folder(folder)
    if tokenizer.vocab_size != config.llm.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but config.json says {config.llm.vocab_size}")
    net = build_model(config, folder, device=device, dtype=torch_dtype)
    if quantization:
        quantize(net, quantization, device)
    info = ModelInfo(
        name=str(model) if model is not None and not Path(str(model)).is_dir() else folder.name,
        revision=revision,
        device=device,
        dtype=str(torch_dtype).removeprefix("torch."),
        n_parameters=sum(p.numel() for p in net.parameters()),
        n_layers=config.llm.num_layers,
        n_experts=config.moe.num_experts,
        is_demo_model=config.demo_model,
    )
    return Engine(model=net, tokenizer=tokenizer, config=config, info=info, decode=decode, graphs=graphs)
