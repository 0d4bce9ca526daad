"""No pickle loading anywhere in the package: weights come from safetensors only."""

from __future__ import annotations

import re

from conftest import ROOT


def test_no_pickle_loading_in_the_package():
    for path in [*(ROOT / "mura_demo").rglob("*.py"), ROOT / "app.py"]:
        source = path.read_text()
        assert not re.search(r"^\s*import pickle|from pickle|pickle\.load|cloudpickle|joblib\.load", source, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            # the single torch.load reads the ImageNet init at training time, with the weights-only unpickler
            assert "weights_only=True" in call, f"{path}: {call}"
