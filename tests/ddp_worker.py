"""Run by tests under `torchrun --nproc_per_node 2`: a few gloo steps, then each rank saves its weights."""

import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from mura_demo.training.train import TrainSettings, train

out, data_root, init = sys.argv[1], sys.argv[2], sys.argv[3]
rank = int(__import__("os").environ["RANK"])
settings = TrainSettings(
    data_root=data_root,
    out_dir=out,
    export_dir=None,
    imagenet_init=init,
    limit=32,
    batch_size=4,
    max_steps=2,
    head_epochs=1,
    epochs=1,
    threads=1,
)
model = train(settings)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.safetensors")
assert not dist.is_initialized()
