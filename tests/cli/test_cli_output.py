"""What the commands print and write reads well and never misleads (issue 14): the transfer table at 80, 120 and
200 columns, inspect's container totals, diff's notes, the output format an extension names, empty transfers,
plans that name a key the checkpoint lacks."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
import torchvision
from rich.console import Console
from safetensors.torch import load_file

from torchgraft.cli import main
from torchgraft.transfer import transfer


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def report_10_classes(mobilenet_v2_path):
    """The real MobileNetV2 weights into a 10-class MobileNetV2: two new classifier tensors, 312 loaded."""
    return transfer(str(mobilenet_v2_path), torchvision.models.mobilenet_v2(num_classes=10), source_model=None)


def rendered(report, width: int, **kwargs) -> str:
    from torchgraft.cli.transfer import render

    buffer = io.StringIO()
    render(report, out=Console(file=buffer, width=width, highlight=False, color_system=None), **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("width", [80, 120, 200])
def test_transfer_table_never_splits_a_name(report_10_classes, width):
    text = rendered(report_10_classes, width)
    names = {e.target for e in report_10_classes.entries} | {e.source for e in report_10_classes.entries
                                                             if isinstance(e.source, str)}
    words = set(re.findall(r"[\w.{},]+", text))
    # every collapsed label is whole on one line: `features.{0,18}.1.running_mean` and never `running_me`/`an`
    assert "features.{0,18}.1.running_mean" in text
    assert not any(w.endswith("running_me") for w in words)
    for line in text.splitlines():
        if not line.startswith("    "):
            assert len(line) <= width, line  # a table row fits the terminal
    assert all(n in text for n in ("classifier.1.weight", "classifier.1.bias"))
    assert names  # the report has names to show


def test_transfer_table_notes_and_more_rows(report_10_classes):
    narrow, wide = rendered(report_10_classes, 80), rendered(report_10_classes, 200)
    note = report_10_classes.entry("classifier.1.weight").note
    assert note and note.split()[0] in narrow  # a `new` row's note is shown, on its own line when narrow
    assert re.search(r"^    classifier with 10 outputs", narrow, re.M)
    more = [line for line in wide.splitlines() if line.startswith("... and ")]
    assert more and all("--all" in line and "--report" in line for line in more)
    every = rendered(report_10_classes, 200, every=True)
    assert "... and " not in every and "features.17.conv.2.weight" in every


def test_collapsed_rows_keep_the_words_their_notes_share():
    from torchgraft.cli.transfer import _common_note

    notes = ["classifier with 10 outputs shares no class name; it starts new (source fc.weight)",
             "classifier with 10 outputs shares no class name; it starts new (source fc.bias)"]
    assert _common_note(notes).startswith("classifier with 10 outputs shares no class name; it starts new")
    assert _common_note(notes[:1]) == notes[0]


def test_finetune_shows_a_three_line_transfer_summary(capsys, report_10_classes):
    from torchgraft.cli.finetune import _RichReporter

    _RichReporter("runs/x").transfer(report_10_classes)
    out, _ = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    assert lines[0].startswith("weights: 312 loaded, 0 adapted, 2 new")
    assert "classifier.1.weight (new)" in lines[1] and "--verbose" in lines[2]
    _RichReporter("runs/x", verbose=True).transfer(report_10_classes)
    assert len(capsys.readouterr().out.splitlines()) > 10


def test_transfer_warnings_go_to_stderr_and_an_empty_transfer_fails(capsys, tmp_path, minilm_dir):
    out = tmp_path / "o.safetensors"
    code, stdout, err = run(capsys, "transfer", str(minilm_dir), "--model", "torchvision:resnet18", "--out", str(out))
    assert code == 1 and not out.exists()
    assert err.startswith("error: nothing to load") and "--allow-empty" in err and len(err.splitlines()) == 1
    code, stdout, err = run(capsys, "transfer", str(minilm_dir), "--model", "torchvision:resnet18", "--out", str(out),
                            "--allow-empty")
    assert code == 0 and out.exists()
    assert "warning:" not in stdout and "right checkpoint for this model?" in err


def test_output_format_follows_the_extension(capsys, tmp_path, mobilenet_v2_path):
    source = torch.load(mobilenet_v2_path, weights_only=True)
    for name in ("o.pth", "o.pt", "o.bin"):
        code, _, err = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "torchvision:mobilenet_v2",
                           "--out", str(tmp_path / name))
        assert code == 0, err
        state = torch.load(tmp_path / name, weights_only=True)  # a torch zip state dict, not safetensors bytes
        assert torch.equal(state["features.3.conv.1.0.weight"], source["features.3.conv.1.0.weight"])
    code, _, err = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "torchvision:mobilenet_v2",
                       "--out", str(tmp_path / "o.npz"))
    assert code == 2 and "'.npz' names no weights format" in err and not (tmp_path / "o.npz").exists()


def test_transformers_target_writes_a_save_pretrained_folder(capsys, tmp_path, minilm_dir):
    from transformers import BertModel

    folder = tmp_path / "bert"
    code, _, err = run(capsys, "transfer", str(minilm_dir), "--model", "transformers:BertModel", "--model-kwargs",
                       json.dumps({"config": str(minilm_dir)}), "--out", f"{folder}/")
    assert code == 0, err
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded = BertModel.from_pretrained(folder)
    reference = load_file(minilm_dir / "model.safetensors")
    key = next(k for k in reference if k.endswith("encoder.layer.3.attention.self.query.weight"))
    assert torch.equal(loaded.state_dict()["encoder.layer.3.attention.self.query.weight"], reference[key])
    code, _, err = run(capsys, "transfer", str(minilm_dir), "--model", "torchvision:resnet18", "--allow-empty",
                       "--out", f"{tmp_path / 'resnet'}/")
    assert code == 1 and "transformers model" in err and not (tmp_path / "resnet").exists()


def test_a_plan_naming_a_key_the_checkpoint_lacks(capsys, tmp_path, mobilenet_v2_path):
    from torchgraft.errors import GraftError
    from torchgraft.match.plan import Plan
    from torchgraft.transfer import apply

    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(mobilenet_v2_path), "--model", "torchvision:mobilenet_v2", "--out", str(plan_path)]) == 0
    data = json.loads(plan_path.read_text())
    data["steps"][0]["source"] = "nonexistent.weight"
    plan_path.write_text(json.dumps(data))
    capsys.readouterr()
    code, _, err = run(capsys, "transfer", str(mobilenet_v2_path), "--model", "torchvision:mobilenet_v2", "--plan",
                       str(plan_path), "--out", str(tmp_path / "o.safetensors"))
    assert code == 1 and "'nonexistent.weight'" in err and "unexpected" not in err
    with pytest.raises(GraftError, match=r"the plan takes source tensor 'nonexistent.weight', which .* does not hold"):
        apply(Plan.read(plan_path), str(mobilenet_v2_path), torchvision.models.mobilenet_v2())


def test_inspect_model_totals_containers_and_keeps_types_apart(capsys):
    code, out, _ = run(capsys, "inspect", "--model", "torchvision:resnet18")
    assert code == 0
    rows = {line.split("│")[0].strip(): [c.strip() for c in line.split("│")] for line in out.splitlines() if "│" in line}
    assert rows["layer1"][2] == f"{sum(p.numel() for p in torchvision.models.resnet18().layer1.parameters()):,}"
    assert rows["(root)"][2] == "11,689,512"
    assert rows["layer2.0.downsample.0"][1] == "Conv2d" and rows["layer2.0.downsample.1"][1] == "BatchNorm2d"
    assert not any("downsample.{0..1}" in name for name in rows)


def test_diff_counts_and_notes(capsys, tmp_path):
    code, out, _ = run(capsys, "diff", "torchvision:resnet18", "torchvision:resnet34", "--json")
    assert code == 0
    assert not any("num_batches_tracked" in n for n in json.loads(out)["notes"])  # whole extra blocks, not history
    state = torchvision.models.resnet18().state_dict()
    del state["bn1.num_batches_tracked"]
    torch.save(state, tmp_path / "old.pth")
    code, out, _ = run(capsys, "diff", str(tmp_path / "old.pth"), "torchvision:resnet18", "--json")
    notes = json.loads(out)["notes"]
    assert any(n.startswith("1 key only in B is one of the BatchNorm `num_batches_tracked`") for n in notes), notes
    assert not any("1 keys" in n for n in notes)


@pytest.mark.parametrize("command", ["inspect", "diff", "plan", "transfer", "finetune", "evaluate", "predict"])
def test_help_shows_defaults_as_a_user_reads_them(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: null" not in text and "default: )" not in text and "type: str" not in text
    assert "--print_config" not in text
    if command == "finetune":
        assert "(default: 5)" in text and "(default: on)" in text
