# Two entry points for a new user (see README.md):
#   make demo   set everything up, then run the demo stream on the embedded broker
#   make test   set everything up, then run the linters and the test suite
#   make lint   ruff and mypy only (configured in pyproject.toml)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SYSSTAMP := $(VENV)/.system-packages
APT_PACKAGES := prometheus chromium chromium-driver postgresql libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core

.PHONY: setup system-packages demo lint test bench chaos clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch first (a bare `torch` requirement pulls the multi-GB CUDA build): the +cpu wheel
	# where pip can find one (PyTorch's CPU index, or a local wheel directory), else the plain pin; it says which.
	$(BIN)/pip install --quiet "torch==2.13.0+cpu" --retries 1 --extra-index-url https://download.pytorch.org/whl/cpu \
	  || $(BIN)/pip install --quiet torch==2.13.0
	@$(BIN)/python -c "import torch; print('installed torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Debian tools the tests drive for real: promtool + prometheus, headless chromium, PostgreSQL 15 (ledger backend),
# Pango and a font for WeasyPrint (the PDF report).
$(SYSSTAMP):
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@mkdir -p $(VENV) && touch $(SYSSTAMP)

system-packages: $(SYSSTAMP)

demo: $(STAMP)
	$(BIN)/riskpipe demo

# A new lint or type error fails `make test` (and so CI) before any test runs.
lint: $(STAMP)
	$(BIN)/ruff check riskpipe tests bench
	$(BIN)/mypy

test: lint $(SYSSTAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

chaos: $(STAMP)
	PYTHONPATH=$(CURDIR) $(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
