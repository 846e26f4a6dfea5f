"""Optuna studies: storage, resumable trials across workers, search spaces."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from comp.core.claims import dead_here, me
from comp.core.errors import UserError
from comp.core.log import LOG
from comp.pipeline.workspace import Workspace


WORKER = "worker"  # user attribute of a running trial: the pid@host of the process scoring it


def storage_url(storage: str | None, name: str, runs: Path) -> str:
    """The study storage: given URL, else SQLite at runs/tune/NAME.db."""
    if storage:
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the pinned driver is psycopg2.
        return "postgresql+psycopg2://" + storage[len("postgresql://") :] if storage.startswith("postgresql://") else storage
    studies = Workspace(runs).tune
    studies.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(studies / f'{name}.db').resolve()}"


def open_study(url: str, name: str, seed: int):
    """Create or load a maximising study whose dead workers' trials are failed after a grace period."""
    import optuna

    import warnings

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=30)
            break
        except Exception as exc:  # bad URL, server down, missing driver; or a race on a new database's schema
            if ("UniqueViolation" in str(exc) or "UNIQUE constraint failed" in str(exc)) and attempt < 4:  # PostgreSQL, SQLite
                time.sleep(0.5 + attempt)  # another worker is creating the tables: try again once it is done
                continue
            raise UserError(url.split("@")[-1], f"cannot open the study storage ({exc.__class__.__name__}: {str(exc)[:160]})") from None
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, multivariate=True)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler, load_if_exists=True)
    fail_dead_trials(study)
    LOG.info(f"watch it live (any machine that reaches the storage): {dashboard_command(url)}")
    return study


def hold_trial(trial) -> None:
    """Record this process (pid@host) on a running trial, so a later call can tell it was killed."""
    trial.set_user_attr(WORKER, me())


def fail_dead_trials(study) -> int:
    """Fail the RUNNING trials of a killed tune: of a process of this host that is gone, or past the heartbeat's grace
    period on any host (a kill -9 leaves its trial RUNNING for ever in the study, and on the dashboard)."""
    import warnings

    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if dead_here(str(t.user_attrs.get(WORKER, "")))]
    for t in dead:
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    if dead:
        LOG.info(f"study {study.study_name}: {len(dead)} trial(s) of a killed tune marked failed")
    return len(dead)


def dashboard_command(url: str) -> str:
    """The Optuna dashboard command that reads the same storage (pinned in requirements.txt)."""
    return f".venv/bin/optuna-dashboard '{url}'"


def suggest_space(trial, space: dict[str, tuple[float, float, bool]], params_type: type) -> dict:
    """One trial's values of a (low, high, log) search space; integer fields of `params_type` get integers."""
    types = {f.name: f.type for f in dataclasses.fields(params_type)}
    return {
        name: trial.suggest_int(name, int(lo), int(hi), log=log) if types[name] in (int, "int") else trial.suggest_float(name, lo, hi, log=log)
        for name, (lo, hi, log) in space.items()
    }


def inner_study(objective: Callable, starts: list[dict], trials: int, seed: int) -> dict:
    """An in-memory study of `trials` trials started from `starts`: the best parameters (for nested estimates)."""
    import optuna

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, multivariate=True))
    for start in starts:
        study.enqueue_trial(start)
    study.optimize(objective, n_trials=trials)
    return study.best_params


def run_study(study, objective: Callable, trials: int, what: str) -> tuple[int, float]:
    """Run the study until it has `trials` complete trials (all workers sharing it): (complete trials, trials a minute here)."""
    import optuna

    t0, before = time.time(), _complete(study)
    if trials > before:
        LOG.info(f"study {study.study_name}: {before} complete trials, running {trials - before} more on {what}")
        stop = optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,))
        study.optimize(objective, n_trials=trials - before, callbacks=[_report_trial, stop])
    done = _complete(study)
    return done, (done - before) / max((time.time() - t0) / 60, 1e-9)


def _complete(study) -> int:
    """Complete trials of a study, every worker's."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _report_trial(study, trial) -> None:
    """Optuna callback: one line per complete trial."""
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        LOG.info(f"trial {trial.number}: OOF ARI {trial.value:.4f} (best {study.best_value:.4f})")
