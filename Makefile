# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out
# The distribution's CPython 3.11 where there is one: Debian's is built with PGO and LTO, a
# pyenv or source build by default is not, and an export is mostly Python (torch.export and
# ExecuTorch's FX passes): the tiny xnnpack export took about 15% less CPU on it (CHANGELOG, 2026-11-24).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) python3)

.PHONY: setup app-toolchain lint test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml autoglm_export/targets/qnn/qnn_htp_compat.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(PY) -m autoglm_export.targets.qnn.libs build   # QNN 2.37 -> 2.51 compatibility layer (gcc)
	touch $(STAMP)

# The Android demo's core logic is tested with Debian's kotlinc 1.3 + JUnit 4 (no Gradle, no SDK).
# Installed here when missing; the Kotlin tests fail (never skip) if this could not install them.
app-toolchain:
	@command -v kotlinc >/dev/null && test -f /usr/share/java/junit4.jar && test -f /usr/share/java/gson.jar || \
	  { echo "installing kotlin, junit4, gson (Debian packages) for the Android core tests"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q kotlin junit4 libgoogle-gson-java >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q kotlin junit4 libgoogle-gson-java >/dev/null; } || \
	    echo "could not install the Kotlin toolchain: tests/test_app_ports.py will fail"; }

test: setup app-toolchain lint
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile

# ruff (pinned in pyproject.toml): formatting and lint rules of [tool.ruff]; `ruff format .` fixes the first
lint: setup
	$(PY) -m ruff format --check --quiet .
	$(PY) -m ruff check --quiet .

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
