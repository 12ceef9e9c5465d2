"""Personal numbers never reach logs or analytics in the clear; policy figures stay readable."""

import contextlib
import io
import logging
import threading
import time
import urllib.parse

import pytest

from xiaozhi.logs import configure_logging
from yibao_common.masking import MaskingFilter, id_number_is_valid, luhn_is_valid, mask_pii

VALID_ID = "11010519491231002X"  # the GB 11643 standard's own example
BANK_CARD = "6222021234567890128"  # passes the Luhn check


def test_identity_number_checksum():
    assert id_number_is_valid(VALID_ID)
    assert not id_number_is_valid("110105194912310021")


def test_valid_identity_number_is_masked_but_keeps_region_and_last_four():
    masked = mask_pii(f"我的身份证号是{VALID_ID}，帮我查一下")
    assert VALID_ID not in masked
    assert "110105********002X" in masked


def test_eighteen_digits_failing_the_checksum_are_not_an_identity_number():
    assert mask_pii("订单号110105194912310021") == "订单号110105194912310021"


def test_mobile_numbers_are_masked_in_any_common_spelling():
    for spelled in ("13812345678", "138-1234-5678", "+86 138 1234 5678"):
        masked = mask_pii(f"电话{spelled}")
        assert "1234" not in masked.replace("****", ""), masked
        assert "138****5678" in masked


def test_bank_card_is_masked_only_when_luhn_valid():
    assert luhn_is_valid(BANK_CARD)
    assert mask_pii(f"卡号{BANK_CARD}") == "卡号6222***********0128"
    assert mask_pii("卡号6222021234567890127") == "卡号6222021234567890127"


def test_insurance_card_number_is_masked():
    assert mask_pii("社保卡号A12345678") == "社保卡号A1*****78"


def test_policy_figures_are_left_alone():
    text = "起付线1200元，封顶线300000元，报销比例80%，热线12393"
    assert mask_pii(text) == text


def test_log_records_are_masked(caplog):
    logger = logging.getLogger("test.masking")
    logger.addFilter(MaskingFilter())
    with caplog.at_level(logging.INFO, logger="test.masking"):
        logger.info("caller %s said %s", "13812345678", f"身份证{VALID_ID}")
    assert "13812345678" not in caplog.text
    assert VALID_ID not in caplog.text
    assert "138****5678" in caplog.text


# -- spoken numbers, other spellings, false positives -------------------------------------------------
def test_phone_asr_output_in_chinese_numerals_is_masked():
    for spoken in ("一三八一二三四五六七八", "幺三八幺二三四五六七八", "幺三八 幺二三四 五六七八", "１３８１２３４５６７８"):
        masked = mask_pii(f"我的电话是{spoken}，麻烦回电")
        assert masked == "我的电话是138****5678，麻烦回电", (spoken, masked)


def test_identity_number_spoken_with_zero_as_ling_or_circle_is_masked():
    assert mask_pii("身份证号一一〇一〇五一九四九一二三一零零二X") == "身份证号110105********002X"
    # one digit wrong: fails the checksum, stays as it was
    assert mask_pii("编号一一〇一〇五一九四九一二三一零零三X") == "编号一一〇一〇五一九四九一二三一零零三X"


def test_grouped_bank_cards_and_old_identity_numbers_are_masked():
    assert mask_pii("卡号6222-0212-3456-7890-128") == "卡号6222***********0128"
    assert mask_pii("卡号6222 0212 3456 7890 128") == "卡号6222***********0128"
    assert mask_pii("老身份证110105491231002") == "老身份证110105******002"
    assert mask_pii("卡号六二二二 零二一二 三四五六 七八九零 一二八") == "卡号6222***********0128"


def test_ordinary_chinese_numbers_are_not_masked():
    for text in ("一二三", "一千五百元", "二〇二四年三月一日", "起付线一千二百元，报销比例百分之八十",
                 "第一二三四五六七八九条", "订单号一二三四五六七八九", "2026-11-23 08:49:02,123", "编号990105491331002"):
        assert mask_pii(text) == text, text


# -- the real log setup: credentials, percent-encoding, tracebacks ----------------------------------
@pytest.fixture
def real_log():
    """configure_logging as `xiaozhi hub` calls it, its handler writing into a buffer.

    uvicorn's default logging config is applied first, as ``uvicorn --factory`` (or any earlier
    server in the same process) does: configure_logging must take its loggers back.
    """
    import logging.config

    from uvicorn.config import LOGGING_CONFIG

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logging.config.dictConfig(LOGGING_CONFIG)
    configure_logging("INFO")
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_uvicorn_access_and_websocket_lines_lose_tokens_and_encoded_numbers(real_log):
    """A real uvicorn server with log_config=None (as cli.hub runs it) logs into the root handler."""
    import httpx
    import uvicorn
    from tests.support import free_port
    from fastapi import FastAPI, WebSocket
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    app = FastAPI()

    @app.get("/api/kb/search")
    async def search(q: str) -> dict:
        return {"q": len(q)}

    @app.websocket("/api/agent/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        question = f"我的身份证{VALID_ID}电话13812345678怎么报销"
        r = httpx.get(f"http://127.0.0.1:{port}/api/kb/search", params={"q": question})
        assert r.status_code == 200
        with connect(f"ws://127.0.0.1:{port}/api/agent/ws?token=staff-secret-XYZ&x=1") as sock:
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                sock.recv(timeout=2)
        time.sleep(0.2)
    finally:
        server.should_exit = True
        thread.join(10)
    text = real_log.getvalue()
    assert "GET /api/kb/search?q=%E6" in text, text  # the access line is there, still percent-encoded
    assert "WebSocket /api/agent/ws?token=***&x=1" in text, text
    assert "staff-secret-XYZ" not in text
    decoded = urllib.parse.unquote_plus(text)
    assert VALID_ID not in decoded and "13812345678" not in decoded, decoded
    assert "110105********002X" in decoded and "138****5678" in decoded


def test_tracebacks_and_stack_info_are_masked(real_log):
    log = logging.getLogger("xiaozhi.hub.test")
    try:
        raise ValueError(f"cannot parse 居民说：电话13812345678 身份证{VALID_ID}")
    except ValueError:
        log.exception("handling a message failed")
    log.info("where %s", "here", stack_info=True, extra={"unused": f"{VALID_ID}"})
    text = real_log.getvalue()
    assert "Traceback" in text and "ValueError: cannot parse" in text
    assert "13812345678" not in text and VALID_ID not in text
    assert "138****5678" in text


def test_bearer_tokens_in_messages_are_hidden(real_log):
    logging.getLogger("xiaozhi.test").warning("upstream said: Authorization: Bearer abc.def.ghi")
    assert "abc.def.ghi" not in real_log.getvalue()


def test_a_password_inside_a_url_never_reaches_the_log():
    from yibao_common.masking import mask_log_text

    line = ("engine postgresql+asyncpg://xiaozhi:Pa55-w0rd@postgres:5432/xiaozhi, limits "
            "redis://:s3cret%2F@redis:6379/2, es https://elastic:es.pw@es01:9200")
    masked = mask_log_text(line)
    assert "Pa55-w0rd" not in masked and "s3cret" not in masked and "es.pw" not in masked
    assert "postgresql+asyncpg://xiaozhi:***@postgres:5432/xiaozhi" in masked
    assert "redis://:***@redis:6379/2" in masked and "https://elastic:***@es01:9200" in masked
    # Not a URL with a password: left alone.
    for plain in ("http://127.0.0.1:8000/docs", "sip:12345@10.0.0.1:5060", "邮箱 li@example.com"):
        assert mask_log_text(plain) == plain
