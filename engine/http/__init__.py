"""The HTTP front door of ``ferry serve``: one aiohttp listener on the server's loop for
metrics, health, the injection API and the admin API (``[http]``).

``server`` owns the listener, authentication and the problem-details errors; each other
module owns the routes of one area.  Nothing here decides delivery or writes the queue
except through the parts the composition root hands it (ingest, the scheduler's verbs).
"""
