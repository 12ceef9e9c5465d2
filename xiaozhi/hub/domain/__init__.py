"""The hub's domains: what the service does, whatever the channel a resident comes through.

- ``conversation``: the one conversation core (store the turn, ask the dialogue, store and publish replies)
- ``desk``: the agent desk's escalation queue, claims, transfers and callbacks
- ``surveys``: follow-up satisfaction surveys after a conversation closes
- ``analytics``: the figures of 精准分析 and the masked export
- ``accounts``: staff users, logins and the audit log
- ``contacts``: the salted hash that recognises a returning caller or visitor
"""
