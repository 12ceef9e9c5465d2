"""Phone channel of 医保小智: an asyncio SIP user agent (UDP) with G.711 RTP media and RFC 4733 DTMF.

Plug the voice pipeline in by subclassing :class:`CallHandler`; run :class:`UserAgent` with it.
"""

from .call import Call, CallState, EndReason
from .handler import CallHandler, DemoHandler
from .user_agent import UserAgent, UserAgentConfig

__all__ = ["Call", "CallHandler", "CallState", "DemoHandler", "EndReason", "UserAgent", "UserAgentConfig"]
