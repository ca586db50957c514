"""Shared by the examples: the `--out DIR` argument (a temporary folder when it is not given)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def out_dir(description: str) -> Path:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", metavar="DIR", help="where the example writes its files (default: a temp dir)")
    args = parser.parse_args()
    path = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="torchgraft-example-"))
    path.mkdir(parents=True, exist_ok=True)
    return path
