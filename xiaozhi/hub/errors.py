"""One error shape for every endpoint: ``{"error": code, "message": 中文说明}``, logged without personal data."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("xiaozhi.hub.errors")

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
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "problem": e.get("msg", "")}
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
        return JSONResponse(
            error_body(500, "internal_error", "系统出了点问题，您的消息已保存，请稍后再试。"), status_code=500
        )
