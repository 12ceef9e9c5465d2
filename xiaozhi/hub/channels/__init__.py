"""Channels: each turns its medium into the conversation core's calls (xiaozhi/hub/domain/conversation.py).

- ``chat``: web chat over a WebSocket (HTTP turns are the chat router's; both call ``handle``)
- ``phone``: the SIP hotline (telephony/ implements the medium; ``PhoneService`` is its DialogueBackend)
  and the outbound follow-up survey calls
- ``video``: WebRTC video help and the agent's bridge into a phone call
- ``desk``: the agent desk's socket (the live queue and the conversations an agent holds)
- ``live``: the one loop that forwards a conversation's live events to a WebSocket
"""
