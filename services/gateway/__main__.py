"""`python -m services.gateway`: the OpenAI-compatible HTTP gateway (aiohttp on uvloop)."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Sequence

from common.service_config import (
    ServiceConfig,
    addresses_from_args,
    exit_process,
    parse_args_with_config,
    setup_logging,
)
from common.settings import from_namespace
from services.gateway.config import GatewayConfig, build_parser

logger = logging.getLogger("services.gateway")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    service, config = from_namespace(ServiceConfig, args), from_namespace(GatewayConfig, args)
    setup_logging(service.log_level, "gateway")
    for problem in config.problems():
        parser.error(problem)

    import uvloop

    from common.default_model import default_model_path
    from services.gateway.app import GatewaySettings, serve
    from services.gateway.batch import default_batch_dir

    addresses = addresses_from_args(service, "gateway")
    gateway_id = config.gateway_id or f"gw-{uuid.uuid4().hex[:8]}"
    try:
        model = config.model or default_model_path()
    except FileNotFoundError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    settings = GatewaySettings(
        host=config.host, port=config.port, model_path=model, frontend_addr=addresses.frontend,
        tokens_addr=config.tokens_addr or addresses.tokens_addr(gateway_id), gateway_id=gateway_id,
        api_key=config.api_key or os.environ.get("XLLM_API_KEY") or None, max_queue=config.max_queue,
        max_body_bytes=config.max_body_bytes, max_model_len=config.max_model_len,
        http_header_timeout=config.http_header_timeout, http_body_timeout=config.http_body_timeout,
        http_keepalive_timeout=config.http_keepalive_timeout, max_connections=config.max_connections,
        advertise_host=config.advertise_host, curve=addresses.curve, tool_call_parser=config.tool_call_parser,
        batch_dir=config.batch_dir or default_batch_dir(addresses.run_dir),
        max_batch_file_bytes=config.max_batch_file_bytes, batch_max_in_flight=config.batch_max_in_flight,
        batch_tpot_target_ms=config.batch_tpot_target_ms,
        request_timeout=config.request_timeout, max_migrations=config.max_migrations,
        scheduler_wait=config.scheduler_wait,
        embedding_pooling=config.embedding_pooling, embedding_normalize=config.embedding_normalize,
        image_max_bytes=config.image_max_bytes, image_fetch_timeout=config.image_fetch_timeout,
        image_max_pixels=config.image_max_pixels, max_images_per_request=config.max_images_per_request,
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
