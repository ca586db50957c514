"""A sweep over the command line: every documented command form parses, and every malformed value or bad input
ends in one short `error:` line — exit 2 for usage, 1 for bad input — with no traceback and nothing written.

Fast by design: parsing only for the documented forms, argument errors before anything is loaded, and bad inputs
that fail before a model is built. Runs in-process through `torchgraft.cli.main`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from torchgraft.cli import _subcommands, build_parser, main
from torchgraft.cli.common import JSON_OBJECT
from torchgraft.train.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[2]
MAX_ERROR = 300


def _commands(text: str) -> list[list[str]]:
    """`graft ...` command lines in a text's examples: continuation lines joined, prompts, paths and comments off."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = re.sub(r"^\s*(\$ )?(\.venv/bin/)?", "", line)
        if not line.startswith("graft ") or "$(" in line:
            continue
        words = shlex.split(line, comments=True)
        found.append(words[1:])
    return found


def documented() -> list[list[str]]:
    """Every command form that `--help` (its Examples) and the README show."""
    forms = []
    for name, (make, _, _) in _subcommands().items():
        forms += [f for f in _commands(make().description or "") if f and f[0] == name]
    readme = "\n".join(re.findall(r"```(?:bash|text|console)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S))
    forms += [f for f in _commands(readme) if f and f[0] in _subcommands()]
    return forms


def test_documented_forms_are_found():
    forms = documented()
    assert {f[0] for f in forms} >= {"inspect", "diff", "plan", "transfer", "finetune", "evaluate", "predict"}
    assert ["finetune", "--resume", "runs/pets"] in forms


@pytest.mark.parametrize("form", documented(), ids=lambda f: " ".join(f)[:60])
def test_every_documented_form_parses(form, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "finetune.yaml").write_text("epochs: 3\n")  # the file `--config finetune.yaml` names
    build_parser().parse_args(form)  # raises on a usage error


@pytest.mark.parametrize("value", ["features.*=0.5", '{"layer4.*": 0.5}'])
def test_lr_mult_documented_forms(value):
    ns = build_parser().parse_args(["finetune", "--lr-mult", value])
    assert ns.finetune.lr_mult in ([{"features.*": 0.5}], [{"layer4.*": 0.5}])


def _malformed() -> list[tuple[str, str, str]]:
    """(command, flag, bad value) for every option that takes a typed value, a choice or JSON."""
    cases = []
    for name, (make, _, _) in _subcommands().items():
        for action in make()._actions:
            if not action.option_strings or action.nargs == 0 or action.option_strings[0] in ("--config", "-h"):
                continue
            flag = action.option_strings[0]
            if action.choices:
                cases.append((name, flag, "bogus"))
            elif action.type is JSON_OBJECT:
                cases += [(name, flag, "{bad"), (name, flag, "[1, 2]")]
            elif action.type in (int, float):
                cases.append((name, flag, "x"))
            elif flag == "--lr-mult":
                cases += [(name, flag, "layer4"), (name, flag, "layer4.*=fast"), (name, flag, "layer4.*=-1")]
    return cases


def run(capsys, tmp_path: Path, argv: list[str]) -> tuple[int, str, str]:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(argv)
    out, err = capsys.readouterr()
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, f"{argv} wrote {set(after) - set(before)}"
    return code, out, err


def assert_one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert len(lines[0]) <= MAX_ERROR, f"{len(lines[0])} characters: {lines[0]}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command,flag,value", _malformed(), ids=lambda x: str(x))
def test_malformed_values_are_usage_errors(capsys, tmp_path, monkeypatch, command, flag, value):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, tmp_path, [command, flag, value])
    assert code == 2, err
    assert_one_error_line(err, flag)
    assert out == ""


USAGE = [
    ([], "command"),
    (["bogus"], "invalid choice"),
    (["inspect"], "exactly one"),
    (["inspect", "a.pth", "--model", "torchvision:resnet18"], "exactly one"),
    (["inspect", "a.pth", "--freeze"], "apply to a model"),
    (["inspect", "--model", "torchvision:resnet18", "--train-bn"], "needs --freeze"),
    (["inspect", "--nope"], "--nope"),
    (["diff", "a.pth"], "missing required B"),
    (["plan", "a.pth"], "missing required --model"),
    (["transfer", "a.pth"], "missing required --model"),
    (["transfer", "a.pth", "--model", "torchvision:resnet18"], "needs --out"),
    (["transfer", "a.pth", "--model", "torchvision:resnet18", "--out", "x.txt"], "'.txt' names no weights format"),
    (["transfer", "a.pth", "--model", "torchvision:resnet18", "--out", "x.pth", "--verify", "--dtype", "float16"],
     "--verify"),
    (["finetune"], "missing required --model, --weights, --data, --out"),
    (["finetune", "--data", "x"], "missing required --model, --weights, --out"),
    (["finetune", "--model", "m:f", "--weights", "w", "--data", "d", "--out", "o", "--epochs", "0"], "--epochs 0"),
    (["finetune", "--model", "m:f", "--weights", "w", "--data", "d", "--out", "o", "--unfreeze-at", "0:*"],
     "count from 1"),
    (["finetune", "--model", "m:f", "--weights", "w", "--data", "d", "--out", "o", "--unfreeze-at", "layer4"],
     "EPOCH:PATTERN"),
    (["predict", "--model", "torchvision:resnet18", "--weights", "w"], "missing required IMAGE"),
    (["predict", "--model", "torchvision:resnet18", "--weights", "w", "a.jpg", "--topk", "0"], "--topk 0"),
]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder as `graft finetune` starts it (config.yaml), for --resume."""
    run = tmp_path / "run"
    run.mkdir()
    config = FinetuneConfig(model="torchvision:mobilenet_v2", weights=str(tmp_path / "w.pth"),
                            data=str(tmp_path / "data"), out=str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    return run


def test_resume_refuses_flags_it_would_ignore(capsys, tmp_path, run_dir):
    code, _, err = run(capsys, tmp_path, ["finetune", "--resume", str(run_dir), "--lr", "0.1", "--batch-size", "8"])
    assert code == 2
    assert_one_error_line(err, "--batch-size, --lr cannot change", "only --epochs")


BAD_INPUT = [
    (["inspect", "missing.pth"], "no such file"),
    (["diff", "missing.pth", "torchvision:resnet18"], "missing.pth"),
    (["plan", "missing.pth", "--model", "torchvision:resnet18"], "missing.pth"),
    (["transfer", "missing.pth", "--model", "torchvision:resnet18", "--out", "o.safetensors"], "missing.pth"),
    (["inspect", "--model", "torchvision:resnet_nope"], "resnet_nope"),
    (["inspect", "--model", "nocolon"], "no ':'"),
    (["finetune", "--resume", "nowhere"], "no config.yaml"),
    (["evaluate", "--model", "torchvision:resnet18", "--weights", "missing.safetensors", "--data", "."],
     "missing.safetensors"),
    (["evaluate", "--model", "torchvision:resnet18", "--weights", "missing.safetensors"], "missing.safetensors"),
    (["predict", "--model", "torchvision:resnet18", "--weights", "missing.safetensors", "a.jpg"],
     "missing.safetensors"),
]


@pytest.mark.parametrize("argv,needle,expected", [(a, n, 2) for a, n in USAGE] + [(a, n, 1) for a, n in BAD_INPUT],
                         ids=lambda x: " ".join(x) if isinstance(x, list) else str(x))
def test_usage_errors_exit_2_and_bad_input_1_with_one_line(capsys, tmp_path, monkeypatch, argv, needle, expected):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, tmp_path, argv)
    assert code == expected, err
    assert_one_error_line(err, needle)


def test_out_inside_data_is_refused(capsys, tmp_path, mobilenet_v2_path):
    data = tmp_path / "photos"
    (data / "cat").mkdir(parents=True)
    code, _, err = run(capsys, tmp_path, ["finetune", "--model", "torchvision:mobilenet_v2", "--weights",
                                          str(mobilenet_v2_path), "--data", str(data), "--out", str(data / "run")])
    assert code == 1
    assert_one_error_line(err, "is inside --data")


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception):
        main(["inspect", "missing.pth", "--debug"])
