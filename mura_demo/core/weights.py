"""Weights, their whole life: save a weights folder, load it strictly, download it from the
Hugging Face Hub and upload it there (one module, as timm's ``_hub.py``).

A weights folder holds ``config.json`` and ``model.safetensors``. Only safetensors is ever
read; every key and shape must match the architecture the config describes, and a model is
returned only when it loaded completely.
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
from .model import MuraNet, create_model

CARD_NAME = "README.md"
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

    model: MuraNet
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


def load_folder(folder: str | Path) -> tuple[MuraNet, ModelConfig]:
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
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise WeightsError(f"{folder / WEIGHTS_NAME} does not match {config.architecture}: " + "; ".join(parts))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config


def load_model(spec: str | None = None, bundled: str | Path = BUNDLED, require_trained: bool = True) -> LoadedModel:
    """Load the weights named by ``spec`` (or $MURA_DEMO_WEIGHTS, or the bundled folder).

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
            return check_trained(loaded, require_trained)
        except WeightsError as err:
            if not (Path(bundled) / WEIGHTS_NAME).is_file():
                raise
            notice = f"{err} Using the bundled weights instead."
            spec = str(bundled)
    model, config = load_folder(spec)
    where = "bundled weights/" if Path(spec).resolve() == Path(bundled).resolve() else spec
    loaded = LoadedModel(model, config, f"{where} (version {config.version})", config.version, notice)
    return check_trained(loaded, require_trained)


def check_trained(loaded: LoadedModel, require_trained: bool) -> LoadedModel:
    """Refuse weights that were never trained: they must not be presented as a diagnosis."""
    if require_trained and not loaded.config.trained:
        raise WeightsError(
            f"The weights in {loaded.source} are not a trained model (config.json says trained: false). "
            "Train them with `python -m mura_demo train` (see README) before serving."
        )
    return loaded


def save_weights(model: torch.nn.Module, config: ModelConfig, folder: str | Path) -> Path:
    """Write ``model.safetensors`` (float tensors as float16) and ``config.json`` to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
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
