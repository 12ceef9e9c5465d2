"""Follow-up surveys seen from the resident's side (conversation token), and ending a chat.

GET  /api/sessions/{id}/survey  -> {"survey": {...} | null}
POST /api/sessions/{id}/survey  {"rating": 1..5, "comment": "..."} (once)
POST /api/sessions/{id}/close   the resident ends the conversation (runs the closed hooks: the survey)
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from fastapi import APIRouter

from xiaozhi.hub.deps import Conversations, ResidentConversation, Surveys
from xiaozhi.hub.domain.surveys import SurveyError, survey_out
from xiaozhi.hub.infra.errors import ApiError

router = APIRouter(prefix="/api/sessions", tags=["surveys"])


class SurveyAnswer(BaseModel):
    rating: int = Field(ge=1, le=5, description="1 很不满意 … 5 非常满意")
    comment: str | None = Field(None, max_length=500, description="Optional; personal numbers are masked.")


@router.get("/{session_id}/survey")
async def get_survey(conv: ResidentConversation, surveys: Surveys) -> dict:
    return {"survey": survey_out(await surveys.for_conversation(conv.id))}


@router.post("/{session_id}/survey")
async def answer_survey(body: SurveyAnswer, conv: ResidentConversation, surveys: Surveys) -> dict:
    try:
        survey = await surveys.answer(conv.id, body.rating, body.comment or "", via="chat")
    except SurveyError as exc:
        status = {"no_survey": 404, "invalid_rating": 422}.get(exc.code, 409)
        raise ApiError(status, exc.code, exc.message) from None
    return {"survey": survey_out(survey)}


@router.post("/{session_id}/close")
async def close_conversation(conv: ResidentConversation, conversations: Conversations, surveys: Surveys) -> dict:
    await conversations.close(conv, "resident_ended")
    return {"status": "closed", "survey": survey_out(await surveys.for_conversation(conv.id))}
