"""The dialogue's data and behaviour: NLU coverage, voice-fit responses, held-out separation,
conversation tests (rasa test core) and held-out NLU quality against the trained model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.support import REPO

DOMAIN = yaml.safe_load((REPO / "bot" / "domain.yml").read_text())
NLU_FILE = REPO / "nlu_data" / "nlu.yml"
HOLDOUT_FILE = REPO / "tests" / "data" / "nlu_holdout.yml"
TEST_STORIES = REPO / "tests" / "data" / "dialogue" / "test_stories.yml"


def examples(path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for block in yaml.safe_load(path.read_text())["nlu"]:
        if "intent" in block:
            lines = [line[2:].strip() for line in block["examples"].splitlines() if line.strip().startswith("- ")]
            out[block["intent"]] = [re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", line) for line in lines]
    return out


def test_at_least_30_intents_with_20_examples_each():
    train = examples(NLU_FILE)
    assert len(train) >= 30
    thin = {intent: len(ex) for intent, ex in train.items() if len(ex) < 20}
    assert not thin, thin
    assert set(train) == set(DOMAIN["intents"])


def test_holdout_covers_every_intent_and_never_overlaps_training():
    train, holdout = examples(NLU_FILE), examples(HOLDOUT_FILE)
    assert set(holdout) == set(train)
    assert all(len(ex) >= 8 for ex in holdout.values()), {i: len(e) for i, e in holdout.items() if len(e) < 8}
    seen = {text for ex in train.values() for text in ex}
    leaked = [text for ex in holdout.values() for text in ex if text in seen]
    assert not leaked, leaked


@pytest.mark.parametrize("name", sorted(DOMAIN["responses"]))
def test_every_response_has_a_voice_fit_spoken_form(name):
    for variant in DOMAIN["responses"][name]:
        spoken = (variant.get("custom") or {}).get("spoken")
        assert spoken, f"{name} has no spoken form"
        assert variant["custom"].get("outcome") in ("answered", "clarifying", "abstained", "escalated")
        assert not re.search(r"\d", spoken), f"{name}: numbers must be written as they are read aloud"
        sentences = [s for s in re.split(r"[。！？；]", spoken) if s]
        assert all(len(s) <= 40 for s in sentences), f"{name}: spoken sentence too long: {spoken}"


def run_in_the_rasa_venv(code: str) -> None:
    """The actions live in the Rasa venv (Python 3.10, rasa_sdk): check them there."""
    proc = subprocess.run([str(REPO / ".venv-rasa" / "bin" / "python"), "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_action_spoken_forms_are_voice_fit():
    """The actions' spoken forms go through voice_fit; check it in the Rasa venv where it lives."""
    code = (
        "from bot.actions.voice import voice_fit, read_aloud\n"
        "assert read_aloud('1200元') == '一千二百元', read_aloud('1200元')\n"
        "assert read_aloud('热线12393') == '热线幺二三九三'\n"
        "assert read_aloud('报销70%') == '报销百分之七十'\n"
        "assert read_aloud('2024年3月1日') == '二〇二四年三月一日'\n"
        "s = voice_fit('医保电子凭证可以在国家医保服务平台APP、微信或支付宝里免费激活，实名认证后设置密码就能用，最多可以绑定5名家庭成员。')\n"
        "import re\n"
        "assert all(len(x) <= 40 for x in re.split('[。！？；]', s)), s\n"
        "assert not re.search(r'\\d', s), s\n"
    )
    run_in_the_rasa_venv(code)


def test_the_actions_tell_a_question_from_the_intent_diet_guessed():
    """What the actions read before trusting DIET's urgent / complain / no / yes guesses (bot/actions/actions.py),
    and that the action server registers those actions but not their abstract bases."""
    code = (
        "from bot.actions.actions import asks_a_question, COMPLAINT_CHANNEL_QUESTION as C, URGENT_WORDS as U, HURRY_WORDS as H\n"
        "assert asks_a_question('我已经交了居民医保，是不是宝宝当年不用另外交钱，跟着我就能参保？')\n"
        "assert not asks_a_question('不是') and not asks_a_question('不用了，谢谢') and not asks_a_question('好的')\n"
        "assert C.search('医院乱收费我要投诉，医保的投诉电话是多少？') and C.search('应该去哪里投诉？卫健委还是医保局？')\n"
        "assert not C.search('你们这什么服务态度，我要投诉') and not C.search('投诉投诉投诉')\n"
        "assert C.search('老板不给交职工医保去哪投诉')\n"
        "from bot.actions.actions import ABOUT_THIS_SERVICE as S\n"
        "assert S.search('你们客服怎么回事，打了三次都没人接？') and not S.search('医保卡这个月没打钱 是不是停了')\n"
        "assert not U.search('现在卡被锁了刷不了，要去哪里解锁？')\n"
        "assert U.search('我爸正在抢救，医保刷不了怎么办') and U.search('急诊室里刷不了医保，马上要交钱')\n"
        "assert not U.search('急急急，出院结账刷不了医保') and H.search('急急急，出院结账刷不了医保')\n"
        "assert not U.search('十万火急，马上要出院结算刷不了') and H.search('十万火急，马上要出院结算刷不了')\n"
        "from bot.actions.actions import ABOUT_A_PERSON as P\n"
        "assert not P.search('限定支付范围是什么') and not P.search('我下了浙里办，找半天找不到医保在哪')\n"
        "assert P.search('医保小智是机器人吗') and P.search('能换真人接吗') and P.search('医保热线人工坐席时间')\n"
        "from rasa_sdk.executor import ActionExecutor\n"
        "e = ActionExecutor(); e.register_package('bot.actions')\n"
        "assert {'action_out_of_scope', 'action_no_or_stop', 'action_goodbye', 'action_greet', 'action_bot_challenge', 'action_escalate'} <= set(e.actions)\n"
    )
    run_in_the_rasa_venv(code)


@pytest.fixture(scope="module")
def trained_model():
    from xiaozhi.rasa_model import ensure_trained
    from xiaozhi.settings import Settings

    return ensure_trained(Settings())


@pytest.mark.slow
def test_conversation_stories_pass(trained_model, tmp_path):
    from xiaozhi.rasa_model import rasa_environment
    from xiaozhi.settings import Settings

    settings = Settings()
    proc = subprocess.run(
        [str(settings.rasa_venv / "bin" / "rasa"), "test", "core", "--stories", str(TEST_STORIES),
         "--model", str(trained_model), "--out", str(tmp_path), "--fail-on-prediction-errors"],
        cwd=REPO, env=rasa_environment(settings), capture_output=True, text=True, timeout=900,
    )
    failed = (tmp_path / "failed_test_stories.yml")
    detail = failed.read_text()[-4000:] if failed.exists() else proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, detail
    report = json.loads((tmp_path / "story_report.json").read_text())
    assert report["conversation_accuracy"]["accuracy"] == 1.0, detail


# A regression floor, not the target: bench/nlu_eval.py reports macro-F1 against the 0.90 target
# (0.913 when this floor was set); a change that loses more than a few points fails here.
MACRO_F1_FLOOR = 0.88


@pytest.mark.slow
def test_held_out_nlu_macro_f1_does_not_regress(trained_model, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "nlu_eval.py"), "--model", str(trained_model), "--out", str(tmp_path),
         "--min-f1", str(MACRO_F1_FLOOR)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
