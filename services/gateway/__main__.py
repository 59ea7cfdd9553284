"""`python -m services.gateway`: the OpenAI-compatible HTTP gateway (aiohttp on uvloop)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Sequence

from common.service_config import (
    add_service_arguments,
    addresses_from_args,
    exit_process,
    parse_args_with_config,
    setup_logging,
)

logger = logging.getLogger("services.gateway")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    g = parser.add_argument_group("gateway")
    g.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    g.add_argument("--model", default=None, help="GGUF file or HF directory whose tokenizer to use "
                                                 "(default: the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (env XLLM_API_KEY)")
    g.add_argument("--max-queue", type=int, default=256, help="requests in flight before 429 (default 256)")
    g.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest request body (413 past it)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context window to enforce (default: the model's, or the workers' if smaller)")
    g.add_argument("--gateway-id", default=None, help="this gateway's id on the bus (default: generated)")
    g.add_argument("--tokens-addr", default=None, help="where to bind the token PULL socket "
                                                       "(default: ipc under --run-dir, or tcp with --tcp-host)")
    g.add_argument("--advertise-host", default=None,
                   help="host workers should push tokens to when --tokens-addr binds a tcp wildcard "
                        "(default: this machine's hostname)")
    add_service_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    setup_logging(args.log_level, "gateway")
    if not 0 < args.port < 65536:
        parser.error("--port must be in 1..65535")
    if args.max_queue < 1:
        parser.error("--max-queue must be >= 1")

    import uvloop

    from common.default_model import default_model_path
    from services.gateway.app import GatewaySettings, serve

    addresses = addresses_from_args(args, "gateway")
    gateway_id = args.gateway_id or f"gw-{uuid.uuid4().hex[:8]}"
    try:
        model = args.model or default_model_path()
    except FileNotFoundError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    settings = GatewaySettings(
        host=args.host, port=args.port, model_path=model, frontend_addr=addresses.frontend,
        tokens_addr=args.tokens_addr or addresses.tokens_addr(gateway_id), gateway_id=gateway_id,
        api_key=args.api_key or os.environ.get("XLLM_API_KEY") or None, max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes, max_model_len=args.max_model_len,
        advertise_host=args.advertise_host, curve=addresses.curve,
    )
    try:
        uvloop.run(serve(settings))
    except (ValueError, FileNotFoundError) as exc:  # an unusable model path: restarting cannot help
        logger.error("gateway cannot start: %s", exc)
        return 2
    except OSError as exc:  # port in use, unreadable files, ipc path problems
        logger.error("gateway cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main())  # skips interpreter finalization once the gateway shut down cleanly
