"""The station's own page (issue 24): live view, filmstrip, statistics and operations, served by
`station run` when station.yaml has a `web:` section (docs/observability.md).

Imports only station/core and the standard library (aiohttp, the `web` extra, only in server.py):
the daemon hands it what it has already computed (feed.py) and its command inbox, so the page
can neither reach into the loop's state nor slow it.
"""
