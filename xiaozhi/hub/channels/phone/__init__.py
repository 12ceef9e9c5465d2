"""The phone channel: the SIP hotline and the outbound follow-up survey calls, as conversation-core calls.

``telephony/`` is the medium (SIP, RTP, speech, the ``VoiceBot`` per call) and never imports the hub; these
modules are the only place the two meet:

- ``hotline``: ``PhoneService``, telephony's ``DialogueBackend``: a call is a conversation, a turn heard is
  ``ConversationService.handle``, key 0 or 转人工 is ``escalate``, a hang-up is ``close``; and
  ``attach_agent`` bridges an agent (the video channel's WebRTC peer) into a live call
- ``confirm``: "您是想问…，对吗？" before answering a turn heard or retrieved unsurely
- ``survey_calls``: a follow-up survey as an outbound call through the user agent's public interface
"""
