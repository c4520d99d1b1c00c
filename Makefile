# The two README commands: `make demo` and `make test`. Everything installs from this repo's files.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: test demo install fashion-mnist clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; where apt is missing (or we are not root)
# the tests that need it skip with that reason.
fashion-mnist:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist \
	      || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	  else echo "note: apt-get unavailable or not root; Fashion-MNIST tests will skip"; fi; \
	fi

test: install fashion-mnist
	$(PY) -m pytest -q

# Converts Fashion-MNIST, starts a local Ray head, submits the InterCLR demo job, stops Ray.
# Extra job flags: make demo ARGS="--base moco"
demo: install fashion-mnist
	PY=$(PY) RAY=$(VENV)/bin/ray bash scripts/demo.sh $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
