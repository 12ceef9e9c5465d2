"""Video help (WebRTC via aiortc): the server relays between a resident and an agent, records with
consent, and bridges an agent's browser audio to a phone call. See docs/video.md."""
