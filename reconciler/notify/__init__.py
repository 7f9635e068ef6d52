"""Notifications: the outbox written with status changes, and its delivery to webhooks and e-mail."""
