"""Process entry of an encoder instance: `python -m services.encoder --model DIR [--colocated-with ID]`."""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid

import uvloop

from common.engine.config import EngineConfig
from common.service_config import (
    ServiceConfig,
    addresses_from_args,
    exit_process,
    parse_args_with_config,
    setup_logging,
)
from common.settings import from_namespace
from services.encoder.config import EncoderConfig, build_parser
from services.encoder.embedding_cache import EmbeddingCache
from services.encoder.encoder import BatchEncoder, load_vision_tower
from services.encoder.service import EncoderService

logger = logging.getLogger("services.encoder")


async def _serve(service: EncoderService) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service.connect()
    await service.run(stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_config(build_parser(), argv)
    service_config, config = from_namespace(ServiceConfig, args), from_namespace(EncoderConfig, args)
    engine = from_namespace(EngineConfig, args)
    instance_id = config.instance_id or f"encoder-{uuid.uuid4().hex[:8]}"
    setup_logging(service_config.log_level, f"encoder {instance_id}")
    for problem in config.problems():
        logger.error("%s", problem)
        return 2
    if not engine.model:
        logger.error("--model is required: the multimodal model whose vision tower this encoder runs")
        return 2
    import torch

    if engine.num_threads:
        torch.set_num_threads(engine.num_threads)
    try:
        tower, _ = load_vision_tower(engine.model, engine.resolved_dtype(), engine.device)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("encoder %s cannot load the vision tower: %s", instance_id, exc)
        return 2
    except OSError as exc:
        logger.error("encoder %s cannot load the vision tower: %s", instance_id, exc)
        return 1
    encoder = BatchEncoder(tower, EmbeddingCache(config.embedding_cache_bytes), engine.device)
    service = EncoderService(
        encoder, addresses_from_args(service_config, "worker"), instance_id, model=str(engine.model),
        colocated_with=config.colocated_with, max_batch_images=config.max_batch_images,
        batch_wait_s=config.batch_wait_ms / 1000.0, heartbeat_interval_s=config.heartbeat_interval,
    )
    try:
        uvloop.run(_serve(service))
    except OSError as exc:
        logger.error("encoder %s cannot start: %s", instance_id, exc)
        return 1
    return 0


if __name__ == "__main__":
    # Skips interpreter finalization once the encoder has shut down cleanly.
    exit_process(main())
