"""Train the Rasa model only when its data or configuration changed, keeping models in a shared cache.

The model's name is a hash of everything training reads, so a fresh checkout with the same data
reuses the model a previous checkout (or CI run) trained.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from xiaozhi.settings import REPO_ROOT, Settings

TRAINING_INPUTS = ("bot/config.yml", "bot/domain.yml", "nlu_data")


class TrainingFailed(RuntimeError):
    pass


def rasa_environment(settings: Settings) -> dict[str, str]:
    """Environment for every Rasa process: no telemetry, quiet TensorFlow, paths of this checkout."""
    env = dict(os.environ)
    env.update(
        RASA_TELEMETRY_ENABLED="false",
        TF_CPP_MIN_LOG_LEVEL="2",
        SQLALCHEMY_SILENCE_UBER_WARNING="1",
        # The repo for `bot.actions`; bot/rasa_runtime for the channel, tracker store, patches, sitecustomize.
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "bot" / "rasa_runtime"), str(REPO_ROOT)]),
        SANIC_HOST=settings.host,  # rasa_sdk's action server listens on 0.0.0.0 unless told
        # DIET is small: TensorFlow's default thread pools only contend with the hub for the cores.
        TF_INTRA_OP_PARALLELISM_THREADS="1",
        TF_INTER_OP_PARALLELISM_THREADS="1",
        XIAOZHI_HUB_URL=settings.effective_hub_url,
        XIAOZHI_ACTIONS_URL=f"http://{settings.host}:{settings.actions_port}/webhook",
        XIAOZHI_RASA_TRACKER_DB=str(settings.var_dir / "rasa-tracker.db"),
        # Rasa's training cache: shared by checkouts, so retraining after a small change is quick.
        RASA_CACHE_DIRECTORY=str(settings.cache_dir / "rasa-training-cache"),
    )
    return env


def training_fingerprint(root: Path = REPO_ROOT) -> str:
    digest = hashlib.sha256()
    for name in TRAINING_INPUTS:
        path = root / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def model_path(settings: Settings, root: Path = REPO_ROOT) -> Path:
    return settings.rasa_models_dir / f"xiaozhi-{training_fingerprint(root)}.tar.gz"


def ensure_trained(settings: Settings, *, log=print, root: Path = REPO_ROOT) -> Path:
    """The trained model for the current data: from the cache, or trained now (about 3 minutes)."""
    target = model_path(settings, root)
    if target.exists():
        log(f"Rasa model up to date: {target}")
        return target
    rasa = settings.rasa_venv / "bin" / "rasa"
    if not rasa.exists():
        raise TrainingFailed(f"Rasa is not installed at {rasa}: run scripts/setup.sh first.")
    target.parent.mkdir(parents=True, exist_ok=True)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.var_dir / "rasa-train.log"
    log(f"Training the Rasa model (data changed); log: {log_path}")
    started = time.monotonic()
    with open(log_path, "w") as out:
        proc = subprocess.run(
            [
                str(rasa), "train",
                "--data", "nlu_data",
                "--domain", "bot/domain.yml",
                "--config", "bot/config.yml",
                "--out", str(target.parent),
                "--fixed-model-name", target.name.removesuffix(".tar.gz"),
            ],
            cwd=root,
            env=rasa_environment(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0 or not target.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise TrainingFailed(
            "Rasa training failed (exit {}). Last lines of {}:\n{}\nFix the training data "
            "(`rasa data validate`) and run setup again.".format(proc.returncode, log_path, "\n".join(tail))
        )
    log(f"Rasa model trained in {time.monotonic() - started:.0f} s: {target}")
    return target
