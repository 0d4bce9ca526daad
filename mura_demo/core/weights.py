"""Weights, their whole life: save a weights folder, load it strictly, download it from the
Hugging Face Hub and upload it there (one module, as timm's ``_hub.py``).

A weights folder holds ``config.json`` and ``model.safetensors``. Only safetensors is ever
read; every key and shape must match the architecture the config describes, and a model is
returned only when it loaded completely. Float tensors are stored as float16, or, where a folder
must hold two networks within the size budget, conv and linear weights of at least 64 weights an output
channel as int8 with one float32 scale per output channel beside each (stored under ``<name>:scale``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from .model import BodyPartPair, MuraNet, create_model

CARD_NAME = "README.md"
SCALE_SUFFIX = ":scale"
# Depthwise and stem filters (9-27 weights a channel, 6% of the weights) moved abnormality probabilities on
# the holdout by up to 0.09 at int8; they stay float16, which keeps the largest move near 0.03.
INT8_MIN_ROW = 64
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
ENV_VAR = "MURA_DEMO_WEIGHTS"
HUB_PREFIX = "hf://"


def bundled_folder() -> Path:
    """The weights shipped with the code: ``weights/`` beside the package in a checkout, or the copy
    ``pip install`` puts under ``<prefix>/share/mura-demo/weights``."""
    checkout = Path(__file__).resolve().parents[2] / "weights"
    installed = Path(sys.prefix) / "share" / "mura-demo" / "weights"
    return checkout if (checkout / WEIGHTS_NAME).is_file() or not (installed / WEIGHTS_NAME).is_file() else installed


BUNDLED = bundled_folder()


class WeightsError(RuntimeError):
    """Weights that cannot be used; the message says why and what to do."""


@dataclasses.dataclass
class LoadedModel:
    """A ready model with its config and a line saying where its weights came from."""

    model: MuraNet | BodyPartPair
    config: ModelConfig
    source: str  # "bundled weights/ (version 1.0.0)" or "hf://owner/name@<commit>"
    revision: str
    notice: str = ""  # e.g. why the Hub was not used


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf://owner/name@revision`` -> (repo id, revision or None)."""
    repo, _, revision = spec.removeprefix(HUB_PREFIX).partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise WeightsError(f"'{spec}' is not a Hub weights spec: use hf://owner/name@revision")
    return repo, revision or None


def download_from_hub(spec: str) -> tuple[Path, str]:
    """Download config.json and model.safetensors of a Hub model repo; returns (folder, commit).

    One ``snapshot_download`` resolves the revision once, so both files come from the same commit
    even when one lands on the branch between the two downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = parse_hub_spec(spec)
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except RevisionNotFoundError:
        raise WeightsError(f"The Hub repo {repo} has no revision '{revision}'.") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"The Hub has no model repo {repo} (or it is private).") from None
    except LocalEntryNotFoundError as err:
        raise WeightsError(f"{hub_failure(err)} for {repo}, and nothing is cached.") from None
    except HfHubHTTPError as err:
        raise WeightsError(f"The Hub answered an error for {repo}: {str(err).splitlines()[0]}") from None
    except (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError) as err:
        raise WeightsError(f"The Hugging Face cache folder (HF_HUB_CACHE) cannot be written: {err}") from None
    except OSError as err:
        raise WeightsError(f"Could not download {repo} from the Hub: {err}") from None
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise WeightsError(f"The Hub repo {repo}@{revision or 'main'} lacks {' and '.join(missing)}.")
    # The cache keeps each snapshot under snapshots/<commit>/; that folder name is the resolved revision.
    return folder, folder.name


def hub_failure(err: BaseException) -> str:
    """What went wrong underneath a 'not cached' error: an HTTP status, or no connection."""
    cause = err.__cause__ or err.__context__
    while cause is not None:
        response = getattr(cause, "response", None)
        if response is not None and getattr(response, "status_code", None):
            return f"The Hub answered HTTP {response.status_code}"
        cause = cause.__cause__ or cause.__context__
    return "The Hub could not be reached"


def load_folder(folder: str | Path) -> tuple[MuraNet | BodyPartPair, ModelConfig]:
    """Build the model from ``folder/config.json`` and load ``folder/model.safetensors`` strictly."""
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise WeightsError(f"{folder} has no {name}.")
    try:
        config = ModelConfig.load(folder / CONFIG_NAME)
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{folder / CONFIG_NAME} is not a valid model config: {err}") from None
    try:
        tensors = load_file(folder / WEIGHTS_NAME)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{folder / WEIGHTS_NAME} is corrupt or truncated: {err}") from None
    model = create_model(config)
    expected = model.state_dict()
    problems = tensor_problems(tensors, expected)
    if problems:
        parts = []
        for label, keys in problems.items():
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            parts.append(f"{label}: {shown}")
        raise WeightsError(f"{folder / WEIGHTS_NAME} does not match {config.architecture}: " + "; ".join(parts))
    model.load_state_dict(unpacked(tensors, expected), strict=True)
    # Convolutions on a CPU run faster channels-last: one 256 px image through Lite0 on 2 cores, about 57 -> 43 ms.
    model.to(memory_format=torch.channels_last)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config


def tensor_problems(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Keys missing, unexpected or of the wrong shape (an int8 tensor stands for a float one and needs its scales,
    one per output channel); empty when the file fits the model exactly."""
    scales = {k.removesuffix(SCALE_SUFFIX): v for k, v in tensors.items() if k.endswith(SCALE_SUFFIX)}
    stored = {k: v for k, v in tensors.items() if not k.endswith(SCALE_SUFFIX)}
    int8 = {k for k, v in stored.items() if v.dtype == torch.int8 and k in expected}
    missing = set(expected) - set(stored) | {k + SCALE_SUFFIX for k in int8 - set(scales)}
    unexpected = set(stored) - set(expected) | {k + SCALE_SUFFIX for k in set(scales) - int8}
    wrong = {k for k in set(expected) & set(stored) if stored[k].shape != expected[k].shape}
    wrong |= {k for k in int8 if not expected[k].is_floating_point()}
    wrong |= {k + SCALE_SUFFIX for k in int8 & set(scales) if scales[k].shape != (stored[k].shape[0],)}
    problems = {"missing": missing, "unexpected": unexpected, "wrong shape": wrong}
    return {label: sorted(keys) for label, keys in problems.items() if keys}


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``weight`` ~ ``q * scale`` (row-wise), ``|q| <= 127``."""
    rows = weight.detach().float().flatten(1)
    scale = rows.abs().amax(1).clamp_min(1e-12) / 127
    return torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).view_as(weight), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().view(-1, *[1] * (q.ndim - 1))


def unpacked(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored tensors in the model's own dtypes, int8 ones multiplied back by their scales."""
    state = {}
    for key, value in expected.items():
        stored = tensors[key]
        if stored.dtype == torch.int8:
            stored = dequantize_int8(stored, tensors[key + SCALE_SUFFIX])
        state[key] = stored.to(value.dtype)
    return state


def stored_as_int8(value: torch.Tensor) -> bool:
    """Whether int8 storage keeps this tensor as int8 (the wide conv and linear weights) or as float16."""
    return value.is_floating_point() and value.ndim >= 2 and value[0].numel() >= INT8_MIN_ROW


@torch.no_grad()
def round_as_stored(model: torch.nn.Module, int8: bool = False) -> None:
    """Set the model's float tensors to the numbers its weights file keeps (float16, or int8 with scales; storing
    them again stores the same file), so that choices made on the model hold for the folder that ships."""
    for value in model.state_dict().values():
        if int8 and stored_as_int8(value):
            value.copy_(dequantize_int8(*quantize_int8(value)))
        elif value.is_floating_point():
            value.copy_(value.half())


def load_model(
    spec: str | None = None, bundled: str | Path = BUNDLED, require_trained: bool = True, body_part_alone: bool = False
) -> LoadedModel:
    """Load the weights named by ``spec`` (or $MURA_DEMO_WEIGHTS, or the bundled folder).

    ``body_part_alone``: only the body part will be read, so a network trained for it alone is accepted.

    A Hub spec that cannot be used falls back to the bundled weights when they exist, with a
    notice saying so; a local folder that cannot be used is an error.
    """
    spec = spec or os.environ.get(ENV_VAR) or str(bundled)
    if spec == str(bundled) and not (Path(bundled) / WEIGHTS_NAME).is_file():
        raise WeightsError(
            f"No bundled weights at {bundled} (an installed copy has none unless it was installed from a checkout). "
            f"Name a weights folder or hf://owner/name@revision with --weights or ${ENV_VAR}."
        )
    notice = ""
    if spec.startswith(HUB_PREFIX):
        try:
            folder, revision = download_from_hub(spec)
            model, config = load_folder(folder)
            loaded = LoadedModel(model, config, f"{spec.split('@')[0]}@{revision}", revision)
            return check_trained(loaded, require_trained, body_part_alone)
        except WeightsError as err:
            if not (Path(bundled) / WEIGHTS_NAME).is_file():
                raise
            notice = f"{err} Using the bundled weights instead."
            spec = str(bundled)
    model, config = load_folder(spec)
    where = "bundled weights/" if Path(spec).resolve() == Path(bundled).resolve() else spec
    loaded = LoadedModel(model, config, f"{where} (version {config.version})", config.version, notice)
    return check_trained(loaded, require_trained, body_part_alone)


def check_trained(loaded: LoadedModel, require_trained: bool, body_part_alone: bool = False) -> LoadedModel:
    """Refuse weights that were never trained: they must not be presented as a diagnosis."""
    if require_trained and not loaded.config.trained:
        raise WeightsError(
            f"The weights in {loaded.source} are not a trained model (config.json says trained: false). "
            "Train them with `python -m mura_demo train` (see README) before serving."
        )
    if require_trained and not body_part_alone and not loaded.config.reads_abnormality:
        raise WeightsError(
            f"The weights in {loaded.source} were trained for the body part alone (train --body-part-only): their "
            "abnormality head never learnt. Join them with an abnormality network (`python -m mura_demo pair`)."
        )
    if require_trained and not loaded.config.reads_body_part:
        raise WeightsError(
            f"The weights in {loaded.source} were trained for the abnormality alone (train --abnormality-only): their "
            "body-part head never learnt. Join them with a body-part network (`python -m mura_demo pair`)."
        )
    return loaded


def save_weights(model: torch.nn.Module, config: ModelConfig, folder: str | Path, int8: bool = False) -> Path:
    """Write ``model.safetensors`` (float tensors as float16; with ``int8``, the wide conv and linear weights as
    int8 with their scales) and ``config.json`` to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
        if int8 and stored_as_int8(value):
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize_int8(value)
            continue
        tensors[name] = (value.half() if value.is_floating_point() else value).contiguous()
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt", "version": config.version})
    config.save(folder)
    return folder / WEIGHTS_NAME


def upload_to_hub(folder: str | Path, repo_id: str, dry_run: bool = False, revision: str | None = None) -> list[str]:
    """Upload a weights folder and its model card to a Hub model repo; ``dry_run`` only checks and lists."""
    folder = Path(folder)
    missing = [n for n in FOLDER_FILES if not (folder / n).is_file()]
    if missing:
        raise WeightsError(f"{folder} lacks {', '.join(missing)}")
    load_folder(folder)  # never publish weights that do not load strictly
    files = [f"{n} ({(folder / n).stat().st_size} bytes)" for n in FOLDER_FILES]
    if not dry_run:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type="model",
            allow_patterns=list(FOLDER_FILES),
            revision=revision,
            commit_message="Upload mura-demo weights",
        )
    return files
