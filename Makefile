# Two commands do all the set-up on a fresh machine:
#   make demo   install what is missing, build the synthetic corpus, train, decode, score, transcribe
#   make test   install what is missing, run the test suite
# Each step is skipped when already done (the virtual environment is ~7 GB: it is built once).

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_PACKAGES := espeak-ng flite wamerican

.PHONY: demo test install system-deps clean-demo

demo: install
	bash recipes/demo/run.sh

test: install
	$(PY) -m pytest -q

install: $(STAMP) system-deps

# Re-run only when the dependencies change.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

# Text-to-speech voices for the offline corpus, and a word list to pick real words from.
system-deps:
	@missing=""; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v flite >/dev/null || missing="$$missing flite"; \
	test -f /usr/share/dict/words || missing="$$missing wamerican"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else \
	    echo "missing$$missing: install with 'sudo apt-get install $(APT_PACKAGES)'"; exit 1; \
	  fi; \
	fi

clean-demo:
	rm -rf data/synthetic exp/demo
