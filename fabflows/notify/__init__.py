"""Notifications for every fabflows run, however it was started (see ``automations``)."""
