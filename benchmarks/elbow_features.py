"""Do features tuned with the elbow labels read elbow abnormality better? A screen of session 43's third question.

The abnormality network's last stage (block 6, the head convolution and its norm, the per-part logits) is fine-tuned
on its cached block-5 maps (image and mirror, one drawn per step; batch-norm statistics frozen) with every labelled
non-test MURA image of the parts named; the elbow row starts at the transfer guess. The non-test elbows fall into
the 5 patient folds of ``elbow_head``; each fold's patients are left out of training (all their parts) and its
elbows scored out of fold, image and mirror averaged, after every epoch. ``--without-elbow-labels`` is the twin that
tunes on forearm and humerus alone and reads the elbow with the guess re-derived from the tuned rows. No test image
is read.

    python -m benchmarks.elbow_features weights
    python -m benchmarks.elbow_features weights --without-elbow-labels
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from benchmarks.elbow_head import FOLDS, folds_of, study_auroc, versus
from mura_demo.core.malloc import tune_for_batch_work
from mura_demo.core.model import explained_network
from mura_demo.core.weights import load_folder
from mura_demo.training.data import load_images, load_splits
from mura_demo.training.train import borrow_transfer_guess, frozen_maps, logits_from_maps, set_phase

TUNED_PARTS = ("forearm", "humerus", "elbow")
LAST_STAGE = 6  # blocks before the tuned stage: its maps are made once


def served_logits(net, maps: torch.Tensor) -> torch.Tensor:
    """The abnormality logits as served (dropout off): the mean of the image's and its mirror's, from the
    (N, 2, C, H, W) maps of ``frozen_maps``."""
    net.eval()
    logits = (logits_from_maps(net, maps[:, 0], LAST_STAGE) + logits_from_maps(net, maps[:, 1], LAST_STAGE)) / 2
    return net.config.split_logits(logits)[1]


def tune(net, config, maps, parts, labels, epochs: int, on_epoch) -> None:
    """AdamW 1e-4 on the last stage, per-part class-balanced log loss, one view drawn per image and step."""
    # the body-part head gets no gradient from this loss, so AdamW leaves it as it is
    optimizer = torch.optim.AdamW(set_phase(net, "finetune", LAST_STAGE), lr=1e-4, weight_decay=1e-4)
    pos_weight = torch.ones(len(config.body_parts))
    for k in parts.unique():
        y = labels[parts == k]
        pos_weight[k] = (1 - y.mean()) / y.mean()
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, epochs + 1):
        set_phase(net, "finetune", LAST_STAGE)  # dropout on, batch-norm statistics frozen (scoring turned both off)
        for batch in torch.randperm(len(maps), generator=generator).split(32):
            view = torch.randint(0, 2, (len(batch),), generator=generator)
            logits = config.split_logits(logits_from_maps(net, maps[batch, view], LAST_STAGE))[1]
            picked = logits.gather(1, parts[batch, None])[:, 0]
            loss = F.binary_cross_entropy_with_logits(picked, labels[batch], pos_weight=pos_weight[parts[batch]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        on_epoch(epoch)


def fold_logits(base, config, maps, parts, labels, rows, scored, args) -> dict[int, torch.Tensor]:
    """A copy of ``base`` tuned on ``rows``; the elbow logits of ``scored`` after each epoch."""
    net, out, elbow = copy.deepcopy(base), {}, config.body_parts.index("elbow")

    @torch.no_grad()
    def score(epoch: int) -> None:
        if args.without_elbow_labels:  # the transfer guess, re-derived from the tuned rows as training does
            borrow_transfer_guess(net.abnormality_head, config.body_parts, ["forearm", "humerus"])
        out[epoch] = served_logits(net, maps[scored])[:, elbow].double()

    tune(net, config, maps[rows], parts[rows], labels[rows], args.epochs, score)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="a weights folder (a pair's abnormality network is the one tuned)")
    parser.add_argument("--without-elbow-labels", action="store_true", help="the twin: tune on forearm and humerus")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()
    tune_for_batch_work()
    torch.manual_seed(0)

    model, config = load_folder(args.weights)
    base = explained_network(model).eval()
    splits = load_splits(args.data_root)
    labelled = [s for s in splits["train"] + splits["holdout"]
                if s.source == "mura" and s.abnormal is not None and s.body_parts[0] in TUNED_PARTS]  # fmt: skip
    elbows = [i for i, s in enumerate(labelled) if s.body_parts == ("elbow",)]
    trained = [i for i, s in enumerate(labelled) if s.body_parts != ("elbow",) or not args.without_elbow_labels]
    maps = frozen_maps(base, load_images(labelled, config.input_size), LAST_STAGE)
    parts = torch.tensor([config.body_parts.index(s.body_parts[0]) for s in labelled])
    labels = torch.tensor([float(s.abnormal) for s in labelled])
    elbow = config.body_parts.index("elbow")
    fold_of = dict(zip(elbows, folds_of([labelled[i] for i in elbows])))
    out_of_fold = {e: torch.zeros(len(elbows), dtype=torch.float64) for e in range(1, args.epochs + 1)}
    print(f"{len(labelled)} labelled non-test images, {len(elbows)} of them elbows; trained on {len(trained)}")

    for f in range(FOLDS):
        scored = [i for i in elbows if fold_of[i] == f]
        left_out = {labelled[i].patient for i in scored}
        rows = torch.tensor([i for i in trained if labelled[i].patient not in left_out])
        where = [elbows.index(i) for i in scored]
        for epoch, logits in fold_logits(base, config, maps, parts, labels, rows, scored, args).items():
            out_of_fold[epoch][where] = logits
        print(f"fold {f + 1}: {len(rows)} training images, {len(scored)} elbows scored", flush=True)

    samples = [labelled[i] for i in elbows]
    y = labels[elbows].double()
    with torch.no_grad():
        guess = served_logits(base, maps[elbows])[:, elbow].double()
    print(f"transfer guess (the shipped network): {study_auroc(samples, y, guess)}")
    for epoch, logits in out_of_fold.items():
        print(f"epoch {epoch}, out of fold: {study_auroc(samples, y, logits)}; "
              f"{versus(samples, y, torch.sigmoid(logits), torch.sigmoid(guess))}")  # fmt: skip
    print("the figure that counts (session 43's plan): epoch 3")


if __name__ == "__main__":
    main()
