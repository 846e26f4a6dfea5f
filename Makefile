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
ENS    ?= default
TRIALS ?= 40
STORAGE ?=
# `make tune` / `make submit`: EXP=name on the command line means that experiment (tuned into
# runs/ensembles/EXP.yaml); otherwise the ensemble ENS. `make tune` with neither selects over every
# finished map run, or tunes EXP's default (its parameters and contrast window) when there is none.
# `make submit` uses the tuned/selected file when it exists, else fits EXP on every annotated slice.
TARGET_ENS := $(if $(filter command line,$(origin EXP)),$(EXP),$(ENS))
SUBMIT_ENS := $(wildcard runs/ensembles/$(TARGET_ENS).yaml)

.PHONY: venv cv test submit ensemble tune report results leaderboard phantom proxy bench clean

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

submit: venv  ## the tuned/selected file (EXP= on the command line, else ENS) if it exists, else fit EXP on every annotated slice; validated CSV
ifneq ($(SUBMIT_ENS),)
	$(PY) -m comp submit --ensemble $(TARGET_ENS) $(DATA_ARG) --out submissions/$(TARGET_ENS).csv
else
	$(PY) -m comp submit experiments/$(EXP).yaml $(DATA_ARG) --out submissions/$(EXP).csv
endif

ensemble: venv  ## greedy OOF selection over every finished map run (or MEMBERS="exp1 exp2") -> runs/ensembles/$(ENS).yaml
	$(PY) -m comp ensemble $(MEMBERS) --name $(ENS) $(DATA_ARG)

tune: venv  ## Optuna on cached OOF maps (+ LightGBM merging) for ENS, or a non-learned EXP's parameters + window; STORAGE=postgresql://...
	$(PY) -m comp tune $(TARGET_ENS) --exp $(EXP) --trials $(TRIALS) $(if $(STORAGE),--storage $(STORAGE)) $(DATA_ARG)

report: venv  ## HTML report of ENS/RUN (default: ensemble 'default', else the newest run) -> runs/report/.../index.html
	$(PY) -m comp report $(RUN) $(DATA_ARG)

results: venv  ## regenerate README's quality table from scratch (phantom + proxy; REUSE=1 reuses finished CV runs)
	$(PY) -m comp results $(if $(REUSE),--reuse)

leaderboard: venv  ## runs/leaderboard.md: every CV run and ensemble, mean ± std OOF ARI and its command
	$(PY) -m comp leaderboard

phantom: venv  ## a full-size phantom (2000 train / 400 annotated / 500 test) in data/phantom_full
	$(PY) -m comp data phantom --out data/phantom_full

proxy: venv  ## real-CT proxy in data/proxy from the pinned TotalSegmentator sdist (EXTRA=dir adds unlabelled CTs)
	$(PY) -m comp data proxy --out data/proxy $(if $(EXTRA),--extra $(EXTRA))

bench: venv  ## benchmarks against their references; writes bench.json
	$(PY) -m comp bench

clean:
	rm -rf runs data/phantom data/.cache bench.json
