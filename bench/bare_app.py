"""The practical ceiling for Python here: a bare Starlette endpoint that returns fixed bytes.

Same server as `secrets-service serve` (uvicorn with uvloop and httptools, its protocol's
writes coalesced by service/http/protocol.py, no access log, no server header), same response
bytes and headers as a cached read, and no work at all: no auth, no policy, no cache lookup, no
audit, metrics or log line. `--stock`: on uvicorn's own protocol instead (two sends per response).

    .venv/bin/python bench/bare_app.py --port 9000 --body-file body.json [--stock]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def build(body: bytes) -> Starlette:
    headers = {"ETag": '"1"', "Cache-Control": "no-store"}

    async def endpoint(request: Request) -> Response:
        return Response(body, media_type="application/json", headers=headers)

    return Starlette(routes=[Route("/secrets/{rest:path}", endpoint, methods=["GET"])])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--stock", action="store_true", help="uvicorn's own HTTP protocol")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from service.http.protocol import HttpProtocol

    app = build(Path(args.body_file).read_bytes())
    # Server.run() picks uvloop and httptools ("auto"), like the service's own entry point.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="off",
        http="auto" if args.stock else HttpProtocol,
    )


if __name__ == "__main__":
    main()
