"""Watch streams: the change stream fanned out to HTTP Server-Sent Events (feed.py)."""
