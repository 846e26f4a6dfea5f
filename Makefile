# comp: `make cv`, `make test`, `make submit` on a fresh clone. The first target that needs
# Python creates .venv from requirements.txt (pinned), so nothing is installed by hand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
EXP    ?= smooth_watershed
DATA   ?=
FOLDS  ?=
DATA_ARG  := $(if $(DATA),--data $(DATA))
FOLDS_ARG := $(if $(FOLDS),--folds $(FOLDS))
SET_ARG   := $(foreach s,$(SET),--set $(s))

.PHONY: venv cv test submit phantom proxy bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

cv: venv  ## cross-validate experiments/$(EXP).yaml (default data: data/raw, else the embedded phantom)
	$(PY) -m comp cv experiments/$(EXP).yaml $(DATA_ARG) $(FOLDS_ARG) $(SET_ARG)

test: venv  ## the whole test suite
	$(PY) -m pytest -q tests

submit: venv  ## fit on every annotated slice, predict X_test, write submissions/$(EXP).csv and validate it
	$(PY) -m comp submit experiments/$(EXP).yaml $(DATA_ARG) --out submissions/$(EXP).csv

phantom: venv  ## a full-size phantom (2000 train / 400 annotated / 500 test) in data/phantom_full
	$(PY) -m comp data phantom --out data/phantom_full

proxy: venv  ## real-CT proxy in data/proxy from the pinned TotalSegmentator sdist (EXTRA=dir adds unlabelled CTs)
	$(PY) -m comp data proxy --out data/proxy $(if $(EXTRA),--extra $(EXTRA))

bench: venv  ## benchmarks against their references; writes bench.json
	$(PY) -m comp bench

clean:
	rm -rf runs data/phantom data/.cache bench.json
