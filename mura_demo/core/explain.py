"""Explanations of the abnormality logit with pytorch-grad-cam.

Gradient-based CAMs (Grad-CAM, Grad-CAM++, HiResCAM, XGradCAM, LayerCAM) and the saliency map
all need the same forward and backward pass. :class:`SharedPassCAM` runs that pass once through
the library's own machinery (its hooks, registered and released in one place) and then applies
each method's weighting from the library's class, so the maps equal what each class computes on
its own (a test checks this) at a fraction of the cost. Methods that need passes of their own
(EigenCAM; ScoreCAM, one forward pass per feature channel, so about 40 s on a 2-core CPU) run
through their library class (ScoreCAM with its masked inputs built a batch at a time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from .model import explained_network

ColumnChooser = Callable[[torch.Tensor], "int | None"]


class BatchedScoreCAM(ScoreCAM):
    """The library's ScoreCAM, with the masked copies of the input built one batch at a time.

    The library builds all of them at once (one per feature channel: 1,280 copies of the input,
    over 1 GB at 256 px) before scoring them in batches, and its hooks keep every batch's
    activations; here the weights are the same numbers at a peak of about 0.2 GB over the model
    (small batches were also the fastest on a 2-core CPU: 4 -> 37 s, 32 -> 68 s per view).
    """

    batch_size = 4

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads) -> np.ndarray:
        weights = []
        with torch.no_grad():
            for target, x, act in zip(targets, input_tensor, torch.from_numpy(activations)):
                scores = []
                for start in range(0, len(act), self.batch_size):
                    maps = act[None, start : start + self.batch_size].to(x.device)
                    maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=True)[0]
                    low = maps.amin(dim=(1, 2), keepdim=True)
                    high = maps.amax(dim=(1, 2), keepdim=True)
                    masks = (maps - low) / (high - low + 1e-8)
                    scores += [target(out).cpu().item() for out in self.model(x[None] * masks[:, None])]
                    # the layer's activations were read before this call; these are the masked batch's
                    self.activations_and_grads.activations.clear()
                weights.append(torch.softmax(torch.tensor(scores), dim=-1).numpy())
        return np.stack(weights)


@dataclasses.dataclass(frozen=True)
class Method:
    """An explanation method: its label, the library class that defines it (None: saliency), and
    whether it comes from the shared pass, is slow (callers may run it apart) or is on by default."""

    label: str
    cam: type[BaseCAM] | None
    shared_pass: bool = True
    slow: bool = False
    default: bool = False


# The one table of methods, in the order they are offered.
METHODS: dict[str, Method] = {
    "gradcam": Method("Grad-CAM", GradCAM, default=True),
    "gradcam++": Method("Grad-CAM++", GradCAMPlusPlus, default=True),
    "saliency": Method("Saliency", None, default=True),
    "hirescam": Method("HiResCAM", HiResCAM),
    "xgradcam": Method("XGradCAM", XGradCAM),
    "layercam": Method("LayerCAM", LayerCAM),
    "eigencam": Method("EigenCAM", EigenCAM, shared_pass=False),
    "scorecam": Method("ScoreCAM", BatchedScoreCAM, shared_pass=False, slow=True),  # about 40 s a view on a CPU
}
DEFAULT_METHODS = tuple(name for name, m in METHODS.items() if m.default)


def method_slug(method: str) -> str:
    """A method name safe in file names and HTML ids ("gradcam++" -> "gradcampp")."""
    return method.replace("+", "p")


@contextlib.contextmanager
def requiring_grad(params: list[torch.nn.Parameter]):
    """``params`` require grad inside the block and are restored after it."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class SharedPassCAM(BaseCAM):
    """One forward/backward pass whose activations, gradients and input gradient feed many maps."""

    def __init__(self, model: torch.nn.Module, target_layer: torch.nn.Module):
        super().__init__(model, [target_layer])

    def run(
        self, input_tensor: torch.Tensor, choose_column: ColumnChooser, input_gradient: bool = True
    ) -> tuple[torch.Tensor, int | None]:
        """Forward, pick the output column to explain from the logits, and backward from it.

        The backward pass goes back to the input only when ``input_gradient`` (saliency) asks for it;
        otherwise it stops at the target layer, a small part of a full backward pass. The served model's
        weights are frozen, so the layer's own parameters require grad during the forward pass to give
        its output a gradient; no weight gradient is kept. Returns the logits and the column (None:
        nothing to explain, no backward pass).
        """
        params = list(self.target_layers[0].parameters())
        input_gradient = input_gradient or not params
        self.input = input_tensor.detach().clone().requires_grad_(input_gradient)
        self.input_grad = None
        with requiring_grad([] if input_gradient else params):
            self.outputs = self.activations_and_grads(self.input)
            logits = self.outputs.detach()
            column = choose_column(logits)
            if column is not None:
                self.targets = [ClassifierOutputTarget(column)]
                ends = [self.input] if input_gradient else params
                grads = torch.autograd.grad(self.targets[0](self.outputs[0]), ends)
                self.input_grad = grads[0] if input_gradient else None
        return logits, column

    def cam(self, method: str) -> np.ndarray:
        """The ``method`` map (H, W) in [0, 1], computed the way its library class does."""
        cls = METHODS[method].cam
        # Borrow the method's own weighting: BaseCAM.get_cam_image calls self.get_cam_weights.
        self.get_cam_weights = types.MethodType(cls.get_cam_weights, self)
        self.get_cam_image = types.MethodType(cls.get_cam_image, self)
        per_layer = self.compute_cam_per_layer(self.input, self.targets, False)
        return self.aggregate_multi_layers(per_layer)[0]

    def saliency(self) -> np.ndarray:
        """Vanilla gradient saliency (Simonyan et al.): |d logit / d pixel|, max over channels."""
        grad = self.input_grad.abs().amax(dim=1)[0].numpy()
        top = np.percentile(grad, 99.5)
        return np.clip(grad / top, 0, 1).astype(np.float32) if top > 0 else np.zeros_like(grad, dtype=np.float32)


def explain(
    model: torch.nn.Module,
    target_layer: torch.nn.Module,
    input_tensor: torch.Tensor,
    choose_column: ColumnChooser,
    methods=DEFAULT_METHODS,
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Logits and the requested maps of the column ``choose_column`` picks from the logits.

    Hooks are released before returning; no maps when the chooser returns None.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown explanation method(s) {unknown}; choose from {list(METHODS)}")
    maps: dict[str, np.ndarray] = {}
    if not methods:
        with torch.inference_mode():
            return model(input_tensor), maps
    with torch.enable_grad(), SharedPassCAM(model, target_layer) as shared:
        saliency = any(METHODS[m].cam is None for m in methods)
        logits, column = shared.run(input_tensor, choose_column, input_gradient=saliency)
        if column is None:
            return logits, maps
        for method in methods:
            if METHODS[method].cam is None:
                maps[method] = shared.saliency()
            elif METHODS[method].shared_pass:
                maps[method] = shared.cam(method)
    for method in methods:
        if not METHODS[method].shared_pass:
            with torch.enable_grad(), METHODS[method].cam(explained_network(model), [target_layer]) as cam:
                maps[method] = cam(input_tensor, [ClassifierOutputTarget(column)])[0]
    return logits, maps
