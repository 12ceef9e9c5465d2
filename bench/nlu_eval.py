"""Intent quality on the held-out set: accuracy, macro-F1 and the most frequent confusions.

    .venv/bin/python bench/nlu_eval.py [--model PATH] [--out DIR]

Runs `rasa test nlu` (in .venv-rasa) on tests/data/nlu_holdout.yml, which is never part of the
training data, and prints a short report. Without --model it trains nothing: it uses the newest
model in ~/.cache/xiaozhi/rasa-models (what `xiaozhi run` trained) or /tmp/dlg-models.
Exit code 1 when macro-F1 is below --min-f1 (default 0.90).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOLDOUT = REPO / "tests" / "data" / "nlu_holdout.yml"


def newest_model() -> Path:
    candidates = []
    for folder in (Path(os.environ.get("XIAOZHI_CACHE_DIR", Path.home() / ".cache" / "xiaozhi")) / "rasa-models",
                   Path("/tmp/dlg-models")):
        candidates += list(folder.glob("*.tar.gz"))
    if not candidates:
        sys.exit("no trained model found: pass --model or run `xiaozhi run` once")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def rasa_env() -> dict:
    return dict(os.environ, RASA_TELEMETRY_ENABLED="false", TF_CPP_MIN_LOG_LEVEL="2",
                SQLALCHEMY_SILENCE_UBER_WARNING="1")


def evaluate(model: Path, out: Path) -> dict:
    rasa = Path(os.environ.get("XIAOZHI_RASA_VENV", REPO / ".venv-rasa")) / "bin" / "rasa"
    proc = subprocess.run(
        [str(rasa), "test", "nlu", "--nlu", str(HOLDOUT), "--model", str(model), "--out", str(out)],
        cwd=REPO, env=rasa_env(), capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        sys.exit(proc.stdout[-2000:] + proc.stderr[-3000:])
    report = json.loads((out / "intent_report.json").read_text())
    errors = json.loads((out / "intent_errors.json").read_text()) if (out / "intent_errors.json").exists() else []
    pairs = collections.Counter((e["intent"], e["intent_prediction"]["name"]) for e in errors)
    return {
        "accuracy": report["accuracy"],
        "macro_f1": report["macro avg"]["f1-score"],
        "examples": report["macro avg"]["support"],
        "intents": len([k for k in report if k not in ("accuracy", "macro avg", "weighted avg", "micro avg")]),
        "confusions": [{"intent": a, "predicted": b, "count": n} for (a, b), n in pairs.most_common(8)],
        "errors": [{"text": e["text"], "intent": e["intent"], "predicted": e["intent_prediction"]["name"],
                    "confidence": round(e["intent_prediction"]["confidence"], 2)} for e in errors],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--min-f1", type=float, default=0.90)
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args()
    model = args.model or newest_model()
    out = args.out or Path(tempfile.mkdtemp(prefix="nlu-eval-"))
    result = evaluate(model, out)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print(f"model           {model.name}")
        print(f"held-out        {result['examples']} examples, {result['intents']} intents")
        print(f"intent accuracy {result['accuracy']:.3f}")
        print(f"macro-F1        {result['macro_f1']:.3f}")
        print("top confusions (intent -> predicted: count)")
        for c in result["confusions"]:
            print(f"  {c['intent']} -> {c['predicted']}: {c['count']}")
    return 0 if result["macro_f1"] >= args.min_f1 else 1


if __name__ == "__main__":
    sys.exit(main())
