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
EXTRA_ARG := $(if $(EXTRA_TRAIN),--extra $(EXTRA_TRAIN))
ENS    ?= default
TRIALS ?= 40
STORAGE ?=
# `make tune` / `make submit`: EXP=name on the command line means that experiment (tuned into
# runs/ensembles/EXP.yaml); otherwise the ensemble ENS. `make tune` with neither selects over every
# finished map run, or tunes EXP's default (its parameters and contrast window) when there is none.
# `make submit` uses the tuned/selected file when it exists, else fits EXP on every annotated slice.
TARGET_ENS := $(if $(filter command line,$(origin EXP)),$(EXP),$(ENS))
SUBMIT_ENS := $(wildcard runs/ensembles/$(TARGET_ENS).yaml)

.PHONY: venv cv test test-fast submit ensemble tune dashboard report results leaderboard phantom proxy bench bench-gpu clean

# TORCH_INDEX=<a PyTorch wheel index URL>: the pinned torch/torchvision built for another CUDA (the default wheels are
# built for CUDA 13.0 and need NVIDIA driver 580+; on an older driver pick the index of a CUDA it supports).
TORCH_INDEX ?=
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(VENV)/bin/pip install --quiet --index-url $(TORCH_INDEX) $$(grep -E '^(torch|torchvision)==' requirements.txt))
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

FOLD_ARG := $(if $(FOLD),--fold $(FOLD))
# GPUS="0 1 2 3": one process per GPU on the same run, each taking the next unclaimed fold; the last
# to land a fold summarises the run. The same command on other machines sharing runs/ joins in.
cv: venv  ## cross-validate experiments/$(EXP).yaml (default data: data/raw, else the embedded phantom); FOLD=k, GPUS="0 1", EXTRA_TRAIN="dir..."
ifneq ($(strip $(GPUS)),)
	@mkdir -p runs; pids=""; for g in $(GPUS); do \
	  CUDA_VISIBLE_DEVICES=$$g COMP_GPU_PROCS=$(words $(GPUS)) $(PY) -m comp cv experiments/$(EXP).yaml $(DATA_ARG) $(FOLDS_ARG) $(FOLD_ARG) $(SET_ARG) $(EXTRA_ARG) \
	    > runs/cv-$(EXP)-gpu$$g.log 2>&1 & pids="$$pids $$!"; echo "GPU $$g: pid $$! (log runs/cv-$(EXP)-gpu$$g.log)"; \
	done; status=0; for p in $$pids; do wait $$p || status=1; done; \
	tail -n 12 runs/cv-$(EXP)-gpu*.log; exit $$status
else
	$(PY) -m comp cv experiments/$(EXP).yaml $(DATA_ARG) $(FOLDS_ARG) $(FOLD_ARG) $(SET_ARG) $(EXTRA_ARG)
endif

test: venv  ## the whole test suite
	$(PY) -m pytest -q --durations=25 tests

test-fast: venv  ## the fast set (tests not marked slow): under a minute
	$(PY) -m pytest -q -m "not slow" tests

submit: venv  ## the tuned/selected file (EXP= on the command line, else ENS) if it exists, else fit EXP on every annotated slice; validated CSV
ifneq ($(SUBMIT_ENS),)
	$(PY) -m comp submit --ensemble $(TARGET_ENS) $(DATA_ARG) --out submissions/$(TARGET_ENS).csv
else
	$(PY) -m comp submit experiments/$(EXP).yaml $(DATA_ARG) --out submissions/$(EXP).csv
endif

ensemble: venv  ## greedy OOF selection over every finished map run (or MEMBERS="exp1 exp2") -> runs/ensembles/$(ENS).yaml
	$(PY) -m comp ensemble $(MEMBERS) --name $(ENS) $(DATA_ARG)

tune: venv  ## Optuna on cached OOF maps (+ LightGBM merging) for ENS, or a non-learned EXP's parameters + window; STORAGE=postgresql://...; REGIONS="hybrid"; LINKAGE=average RELATIVE=1 CALIBRATE=1 DROP="border_grad ..."
	$(PY) -m comp tune $(TARGET_ENS) --exp $(EXP) --trials $(TRIALS) $(if $(STORAGE),--storage $(STORAGE)) $(if $(REGIONS),--regions-from $(REGIONS)) $(if $(LINKAGE),--linkage $(LINKAGE)) $(if $(RELATIVE),--relative-features) $(if $(CALIBRATE),--calibrate) $(if $(DROP),--drop-features $(DROP)) $(DATA_ARG)

dashboard: venv  ## Optuna dashboard of the studies of ENS (or EXP) in STORAGE, else runs/tune/$(TARGET_ENS).db (http://127.0.0.1:8080)
	$(VENV)/bin/optuna-dashboard $(if $(STORAGE),$(STORAGE),sqlite:///runs/tune/$(TARGET_ENS).db)

report: venv  ## HTML report of ENS/RUN (default: ensemble 'default', else the newest run) -> runs/report/.../index.html
	$(PY) -m comp report $(RUN) $(DATA_ARG)

results: venv  ## regenerate README's quality table from scratch (phantom + proxy; REUSE=1 reuses finished CV runs)
	$(PY) -m comp results $(if $(REUSE),--reuse)

leaderboard: venv  ## runs/leaderboard.md: every CV run and ensemble, mean ± std OOF ARI and its command
	$(PY) -m comp leaderboard

phantom: venv  ## a full-size phantom (2000 train / 400 annotated / 500 test) in data/phantom_full
	$(PY) -m comp data phantom --out data/phantom_full

proxy: venv  ## real-CT proxy in data/proxy from the pinned TotalSegmentator sdist (EXTRA=dir adds unlabelled CTs; NOISE_HU=0: the smooth proxy of figures before 2026-12-07)
	$(PY) -m comp data proxy --out data/proxy $(if $(EXTRA),--extra $(EXTRA)) $(if $(NOISE_HU),--noise-hu $(NOISE_HU))

bench: venv  ## benchmarks against their references; writes bench.json
	$(PY) -m comp bench

bench-gpu: venv  ## each GPU config: train/infer images per s, peak GPU memory, projected make cv hours; writes bench_gpu.json
	$(PY) -m comp bench --gpu

clean:
	rm -rf runs data/phantom data/.cache bench.json bench_gpu.json
