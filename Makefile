# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	rm -rf $(DEMO)
	$(VENV)/bin/autoglm-export tiny-checkpoint $(DEMO)/checkpoint --seed 0
	$(VENV)/bin/autoglm-export inspect $(DEMO)/checkpoint
	$(VENV)/bin/autoglm-export --target xnnpack --checkpoint $(DEMO)/checkpoint --out $(DEMO)/bundle-xnnpack
	$(VENV)/bin/autoglm-export verify $(DEMO)/bundle-xnnpack
	@echo "--- run (the tiny checkpoint has random weights: expect random text; the parity table is the result)"
	$(VENV)/bin/autoglm-export run $(DEMO)/bundle-xnnpack --prompt "What is on the screen?" --image tests/data/screen.png --max-new-tokens 16

bench: setup
	$(PY) bench/export_bench.py

clean:
	rm -rf $(DEMO) build *.egg-info
