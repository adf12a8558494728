"""The scheduler: per-site queues and limits, retries, expiry, suspension, the active window.

``policy`` holds the pure rules (retry schedule, limits, throttle); ``scheduler`` runs
them on the event loop.  It must never write sockets: delivery agents do.
"""
