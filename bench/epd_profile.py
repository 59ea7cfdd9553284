"""`xllm profile epd`: measure encode, prefill, decode and embedding-transfer cost on the model and
this machine, choose the EPD placement (`services.scheduler.epd_placement.choose_placement`), print
why in numbers, and write the choice where `xllm serve --epd-placement auto` reads it.

Everything runs in this process on one engine (prefix cache off, so no measurement is a cache
hit): the vision tower on fresh synthetic images; the prefill of a prompt whose images already
carry their embeddings (what ED-P / E-P-D hand the worker); decode at a batch of
`--decode-batch`; and one image's embeddings encoded and decoded through the bus codec over an
ipc:// socket pair, twice (encoder -> scheduler -> worker).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import zmq
from PIL import Image

from bench.output import write_json
from common.engine.config import engine_config_from_args
from services.scheduler.epd_placement import EpdProfile, choose_placement, default_profile_path, write_choice

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", default="448x448", help="WxH of the synthetic images (default 448x448)")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--prompt-words", type=int, default=32, help="text words beside the images")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens a typical request generates")
    p.add_argument("--decode-batch", type=int, default=8, help="sequences decoding together")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps measured")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each measurement (median kept)")
    p.add_argument("--prefill-workers", type=int, default=1, help="the layout the choice is for")
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--encoder-workers", type=int, default=1)
    p.add_argument("--separate-devices", action="store_true",
                   help="each instance has its own device (default: they share this machine's CPUs / one GPU)")
    p.add_argument("--output", default=None, help="where the choice goes (default: the model's file under the "
                                                  "xllm cache directory, which serve --epd-placement auto reads)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the measurements here")


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _median_s(fn, reps: int) -> float:  # noqa: ANN001
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _run_to_end(engine) -> None:  # noqa: ANN001
    while engine.has_unfinished():
        engine.step()


def _transfer_s(embedding: torch.Tensor, reps: int) -> float:
    """One embedding through the bus codec over ipc://, two hops (as E-P-D / ED-P move it)."""
    from common.codec import decode, encode
    from common.protocol import EncodeResult

    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="xepd-", dir="/tmp") as tmp:
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        pull.bind(f"ipc://{tmp}/t.sock")
        push.connect(f"ipc://{tmp}/t.sock")
        msg = EncodeResult(job_id="j", instance_id="e")

        def hop_twice() -> None:
            for _ in range(2):
                push.send_multipart(encode(msg, embedding), copy=False)
                _, tensors = decode(pull.recv_multipart(copy=False))
                tensors[0].clone()  # the worker copies it into its own buffers

        try:
            return _median_s(hop_twice, reps)
        finally:
            push.close(0)
            pull.close(0)
            ctx.term()


def measure(args: argparse.Namespace) -> tuple[EpdProfile, dict]:
    from common.engine.engine import LLMEngine
    from common.engine.sampling_params import SamplingParams
    from common.image_inputs import ImageProcessor, expand_image_placeholders
    from common.tokenizer import load_tokenizer

    config = engine_config_from_args(args)
    config.enable_prefix_cache = False  # every prefill measured is computed
    engine = LLMEngine(config)
    mc = engine.model_config
    if not getattr(mc, "is_multimodal", False):
        raise SystemExit(f"xllm profile epd: {config.model} is not a multimodal model (no vision tower)")
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    processor = ImageProcessor.from_model_dir(engine.model_path)
    tokenizer = load_tokenizer(engine.model_path)
    k = args.images_per_request
    seeds = iter(range(10**6))

    def fresh_items() -> list:
        return processor.items([_image(width, height, next(seeds)) for _ in range(k)])

    def encode(items: list) -> list[torch.Tensor]:
        with torch.inference_mode():
            return engine.model.encode_images(torch.cat([i.pixel_values for i in items]).to(config.device),
                                              [i.grid_thw for i in items])

    encode_s = _median_s(lambda: encode(processor.items([_image(width, height, next(seeds))])), args.reps)
    content = [{"type": "image"}] * k + [{"type": "text", "text": " ".join(["word"] * args.prompt_words)}]
    template_ids = tokenizer.encode_chat([{"role": "user", "content": content}], add_generation_prompt=True)

    def prepared() -> tuple[list[int], list]:
        """A prompt whose images carry their embeddings already (the ED-P / E-P-D hand-off)."""
        items = fresh_items()
        for item, embedding in zip(items, encode(items), strict=True):
            item.embeddings, item.pixel_values = embedding, None
        return expand_image_placeholders(template_ids, items, mc.image_token_id), items

    def timed_run(batch: int, max_tokens: int) -> float:
        """Seconds to serve `batch` prepared requests of `max_tokens` each (preparation untimed)."""
        requests = [prepared() for _ in range(batch)]
        start = time.perf_counter()
        for ids, items in requests:
            engine.add_request(uuid.uuid4().hex, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                     ignore_eos=True), images=items)
        _run_to_end(engine)
        return time.perf_counter() - start

    prompt_tokens = len(prepared()[0])
    timed_run(1, 1)  # warm-up
    prefill_s = statistics.median(timed_run(1, 1) for _ in range(args.reps))
    reps = max(1, args.reps // 2)
    with_decode = statistics.median(timed_run(args.decode_batch, 1 + args.decode_steps) for _ in range(reps))
    without = statistics.median(timed_run(args.decode_batch, 1) for _ in range(reps))
    step_s = max(0.0, with_decode - without) / args.decode_steps  # one step of the whole batch
    decode_s = step_s * args.output_tokens / args.decode_batch  # one request's share of the steps
    sample = encode(fresh_items())[0].contiguous()
    transfer_s = _transfer_s(sample, args.reps)
    profile = EpdProfile(
        encode_s_per_image=encode_s, images_per_request=k, prefill_s=prefill_s, decode_s=decode_s,
        transfer_s_per_image=transfer_s, prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
        encoder_workers=args.encoder_workers, shared_compute=not args.separate_devices)
    details = {"prompt_tokens": prompt_tokens, "image_tokens_per_image": int(sample.shape[0]),
               "embedding_bytes": sample.numel() * sample.element_size(), "decode_step_s": step_s,
               "image_size": [width, height], "device": config.device, "dtype": config.dtype,
               "threads": torch.get_num_threads()}
    return profile, details


def run(args: argparse.Namespace) -> int:
    profile, details = measure(args)
    choice = choose_placement(profile)
    output = Path(args.output) if args.output else default_profile_path(args.model)
    write_choice(output, choice, args.model)
    print(f"encode {profile.encode_s_per_image * 1000:.2f} ms/image ({details['image_tokens_per_image']} tokens), "
          f"prefill {profile.prefill_s * 1000:.2f} ms ({details['prompt_tokens']} tokens), decode "
          f"{profile.decode_s * 1000:.2f} ms/request ({args.output_tokens} tokens at batch {args.decode_batch}), "
          f"transfer {profile.transfer_s_per_image * 1000:.3f} ms/image")
    print(choice.reason)
    print(f"placement {choice.placement} written to {output} (xllm serve --epd-placement auto reads it)")
    write_json(args.json_path, {"placement": choice.placement, "reason": choice.reason,
                                "predicted": choice.predicted, "profile": asdict(profile), "details": details})
    return 0
