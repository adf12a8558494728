"""Policy agents: relay control, rate limits, DNSBL, SPF/DKIM/DMARC, signing.

Called only through the hook API of the receive service; never do I/O on the event loop.
"""
