"""Operations: tracking log, protocol log, metrics, admin/injection HTTP API.

Observes; never changes delivery decisions.
"""
