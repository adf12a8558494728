"""Delivery agents: outbound SMTP and LMTP connections (pooled), and Maildir delivery.

Each agent takes one message and some of its recipients for one route and returns a
result per recipient.  Agents must never write the queue: the scheduler records outcomes.
"""
