"""Personal numbers never reach logs or analytics in the clear; policy figures stay readable."""

import logging

from xiaozhi.masking import MaskingFilter, id_number_is_valid, luhn_is_valid, mask_pii

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
