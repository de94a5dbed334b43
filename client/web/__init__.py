"""gridq-web: the HTTP API and live web page, a gridq client in its own process (``python -m client.web``)."""
