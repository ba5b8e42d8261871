"""The 3-line ASGI app hypercorn serves in the h3 scenario (`200 Vrypt`, text/plain)."""

BODY = b"Vrypt"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"5")]


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return  # lifespan: nothing to set up
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
