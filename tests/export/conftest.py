"""The export tests share ``tests/conftest.py``'s ``trained`` cascade and its ``bundle``."""


def serve_in_thread(service):
    """``service`` behind the real uvicorn server on a free localhost port, in a thread:
    (server, thread, base url); stop with ``server.should_exit = True``."""
    import socket
    import threading
    import time

    import uvicorn

    from export.serve import make_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"
