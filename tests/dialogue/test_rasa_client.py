"""Rasa's REST output (text and custom payload as separate items) becomes one reply per message."""

from xiaozhi.hub.infra.rasa_client import replies_from_rasa


def test_a_domain_response_merges_its_custom_payload_into_the_text_before_it():
    (reply,) = replies_from_rasa(
        [
            {"recipient_id": "c", "text": "您好，我是医保小智。"},
            {"recipient_id": "c", "custom": {"spoken": "您好。", "outcome": "answered"}},
        ]
    )
    assert reply.text == "您好，我是医保小智。" and reply.spoken == "您好。" and reply.outcome == "answered"


def test_an_action_payload_with_text_is_a_reply_of_its_own():
    replies = replies_from_rasa(
        [
            {"custom": {"text": "答案", "spoken": "短答", "citations": [{"id": "ev-activate"}], "outcome": "answered"}},
            {"custom": {"text": "您想问哪一个？", "buttons": [{"title": "A", "payload": "A"}], "outcome": "clarifying"}},
        ]
    )
    assert [r.text for r in replies] == ["答案", "您想问哪一个？"]
    assert replies[0].citations == [{"id": "ev-activate"}]
    assert replies[1].outcome == "clarifying" and replies[1].buttons[0]["title"] == "A"


def test_a_procedure_summary_keeps_its_checklist():
    checklist = {"title": "异地就医备案", "items": ["准备身份证", "在APP上提交"]}
    (reply,) = replies_from_rasa([{"custom": {"text": "总结", "steps": checklist["items"], "checklist": checklist}}])
    assert reply.meta()["checklist"] == checklist and reply.meta()["steps"] == checklist["items"]


def test_spoken_form_defaults_to_the_text():
    (reply,) = replies_from_rasa([{"text": "好的"}])
    assert reply.meta()["spoken"] == "好的" and reply.meta()["outcome"] == "answered"


def test_stray_custom_payload_without_any_text_is_ignored():
    assert replies_from_rasa([{"custom": {"outcome": "answered"}}]) == []
