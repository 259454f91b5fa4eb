"""Slack chatops: a small ASGI service (``fabflows chatops serve``) and the Slack notifications.

- ``app.py``: the ASGI app (slash command ``/fabflows``, interactive approve/reject buttons);
- ``commands.py``: parsing and permission checks (pure);
- ``notify.py``: messages to Slack through an incoming-webhook block (results, approval requests).
"""
