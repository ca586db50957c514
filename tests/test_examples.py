"""Every script in examples/ runs as a user would run it, checks its own claims with assert, and says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CASES = {
    "detector_resnet50.py": "detector: backbone by structure",
    "resnet_4ch_21cls.py": "conv1 adapted (input_channels), fc new",
    "model_surgery.py": "surgery: features + classifier.1 reloaded",
    "finetune_folder.py": "finetune: cat-vs-dog run",
    "legacy_resnet18.py": "legacy: 102 loaded, 20 num_batches_tracked",
    "strict_false_vs_transfer.py": "detach: right for a fixed extractor in front",
    "yolo_resnet50.py": "yolo: 318 backbone tensors loaded",
}


def test_every_example_is_covered() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script: str, tmp_path: Path, mobilenet_v2_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert CASES[script] in proc.stdout, proc.stdout[-3000:]
