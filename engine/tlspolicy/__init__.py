"""Outbound TLS policy: how much TLS a delivery must have, decided per destination.

Owns the security levels (``levels``: Postfix's none/may/encrypt/verify/dane/dane-only and
the older [[send]] ``tls`` names), MTA-STS (``sts``: RFC 8461 TXT record, the HTTPS
policy fetch, its strict parser, a cache kept for ``max_age`` in the spool), DANE
(``dane``: RFC 7672 TLSA matching, DANE-EE and DANE-TA) and the decision that combines
them (``policy``: a :class:`~engine.tlspolicy.policy.Decision` per destination, cached, and
a :class:`~engine.tlspolicy.policy.HostTls` per host tried) and TLS-RPT (``tlsrpt``: RFC
8460 aggregate reports of the sessions made under a policy).  The SMTP client
(engine.client.smtp) applies what this package decides; the DNS lookups are
engine.routing.mx's.

It must never open SMTP connections, write the queue or block the event loop (the policy
file is written in a thread).
"""
