"""Class-name files: one reader (`read_class_names`), and `known_classes` for the file beside a checkpoint."""

from __future__ import annotations

import locale

import pytest

from torchgraft.classes import known_classes, read_class_names
from torchgraft.errors import GraftError


def test_names_one_per_line_in_order(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("  cat\n\ndog \r\nbird\n\n")
    assert read_class_names(path) == ["cat", "dog", "bird"]
    assert read_class_names(str(path)) == ["cat", "dog", "bird"]


def test_missing_empty_and_unreadable_files(tmp_path):
    with pytest.raises(GraftError, match=r"nope\.txt: class list not found; expected a text file with one class "
                       r"name per line\.$"):
        read_class_names(tmp_path / "nope.txt")
    with pytest.raises(GraftError, match=r"class list not found"):  # a folder is not a class list
        read_class_names(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(GraftError, match=r"empty\.txt: the class list is empty; expected one class name per line\.$"):
        read_class_names(empty)


@pytest.mark.skipif(locale.getpreferredencoding(False).lower().replace("-", "") != "utf8",
                    reason="bytes that are not text depend on the locale's encoding")
def test_a_binary_file_is_not_a_class_list(tmp_path):
    binary = tmp_path / "classes.bin"
    binary.write_bytes(b"\x80\x02\xff\xfe not text")
    with pytest.raises(GraftError, match=r"classes\.bin: the class list is not readable text \(UnicodeDecodeError\); "
                       r"expected a text file with one class name per line\.$"):
        read_class_names(binary)


def test_known_classes_reads_classes_txt_beside_the_checkpoint(tmp_path):
    weights = tmp_path / "model.safetensors"
    assert known_classes(weights) is None  # no file beside it, and not a torchvision file name
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert known_classes(weights) == ["cat", "dog"]
    assert known_classes(tmp_path) == ["cat", "dog"]  # a model folder
    (tmp_path / "classes.txt").write_text("\n")  # names nothing: no names known
    assert known_classes(weights) is None
