"""Routing: accepted domains, send connectors with address spaces and costs, MX resolution.

Turns a recipient domain into a destination (stored with the recipient at ingest, no DNS)
and a destination into a route (hosts to try, TLS and AUTH policy, and the site whose
limits apply).  It must never hold delivery state: retries and limits are the scheduler's.
"""
