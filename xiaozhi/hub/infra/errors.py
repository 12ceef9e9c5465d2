"""One error shape for every endpoint: ``{"error": code, "message": 中文说明}``, logged without personal data."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("xiaozhi.hub.infra.errors")

_MESSAGES = {
    400: "请求格式不正确。",
    401: "缺少或无效的会话凭证，请重新打开对话。",
    403: "无权访问该会话。",
    404: "请求的内容不存在。",
    405: "不支持该请求方法。",
    413: "消息太长了，请分几次发送。",
    422: "请求内容不符合要求。",
    429: "请求太频繁，请稍后再试。",
}


# A request that failed unexpectedly may or may not have stored the resident's message: never claim it did.
TURN_FAILED = "系统出了点问题，请稍后再试。如果您的消息没有出现在对话里，请重新发送。"

# Chinese for the validation problems a client can cause (pydantic error types); others keep a generic text.
_PROBLEMS = {
    "missing": "缺少此项。",
    "string_type": "应为文字。",
    "int_type": "应为整数。",
    "int_parsing": "应为整数。",
    "float_type": "应为数字。",
    "float_parsing": "应为数字。",
    "bool_type": "应为 true 或 false。",
    "bool_parsing": "应为 true 或 false。",
    "dict_type": "应为 JSON 对象。",
    "model_type": "应为 JSON 对象。",
    "model_attributes_type": "应为 JSON 对象。",
    "list_type": "应为列表。",
    "string_too_short": "太短了（至少 {min_length} 个字）。",
    "string_too_long": "太长了（最多 {max_length} 个字）。",
    "too_short": "太少了（至少 {min_length} 项）。",
    "too_long": "太多了（最多 {max_length} 项）。",
    "string_pattern_mismatch": "格式不正确。",
    "literal_error": "取值不在允许范围内：{expected}。",
    "enum": "取值不在允许范围内：{expected}。",
    "greater_than": "应大于 {gt}。",
    "greater_than_equal": "应不小于 {ge}。",
    "less_than": "应小于 {lt}。",
    "less_than_equal": "应不大于 {le}。",
    "extra_forbidden": "不允许此项。",
    "json_type": "应为 JSON。",
    "datetime_parsing": "应为日期时间（ISO 8601）。",
    "datetime_from_date_parsing": "应为日期时间（ISO 8601）。",
    "date_parsing": "应为日期（YYYY-MM-DD）。",
    "date_from_datetime_parsing": "应为日期（YYYY-MM-DD）。",
    "uuid_parsing": "格式不正确。",
    "url_parsing": "应为网址。",
}


def problem_text(error: dict) -> str:
    """One validation problem in Chinese: our own validators' messages as written, pydantic's translated."""
    kind = error.get("type", "")
    if kind in ("value_error", "assertion_error"):
        message = str((error.get("ctx") or {}).get("error") or error.get("msg", ""))
        if any("\u4e00" <= ch <= "\u9fff" for ch in message):
            return message
        return "取值不符合要求。"
    template = _PROBLEMS.get(kind)
    if template is None:
        return "不符合要求。"
    try:
        return template.format(**{k: v for k, v in (error.get("ctx") or {}).items()})
    except (KeyError, IndexError, ValueError):
        return template.split("{", 1)[0].rstrip("（：") + "。"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message or _MESSAGES.get(status, "请求失败。")


def error_body(status: int, code: str, message: str | None = None, **extra) -> dict:
    return {"error": code, "message": message or _MESSAGES.get(status, "请求失败。"), **extra}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.code)
        return JSONResponse(error_body(exc.status, exc.code, exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            log.info("%s %s -> 400 invalid JSON", request.method, request.url.path)
            return JSONResponse(error_body(400, "invalid_json", "请求不是合法的 JSON。"), status_code=400)
        fields = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "problem": problem_text(e)}
            for e in errors
        ]
        log.info("%s %s -> 422 %s", request.method, request.url.path, [f["field"] for f in fields])
        return JSONResponse(error_body(422, "invalid_request", fields=fields), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(exc.status_code, code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal_error", TURN_FAILED), status_code=500)
