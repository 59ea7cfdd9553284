"""The `xllm` command: generate, bench, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from common.engine.config import add_engine_arguments, engine_config_from_args
from common.progress import add_progress_argument, progress_bar
from common.service_config import ServiceConfig
from common.settings import SettingsParser

__all__ = ["build_parser", "main"]


def _cmd_generate(args: argparse.Namespace) -> int:
    from common.engine.engine import SequenceOutput
    from common.engine.llm import LLM
    from common.engine.sampling_params import SamplingParams

    llm = LLM(**vars(engine_config_from_args(args)))
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.seed, stop=args.stop or [],
    )
    prompts = args.prompt or ["What is the capital of France?"]
    inputs = ([llm.tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in prompts] if args.chat else prompts)
    # Counted in tokens against every prompt's max_tokens; a prompt that stops early (EOS, a stop
    # string) takes its unused tokens off the total, so the bar still ends full.
    produced: dict[str, int] = {}
    with progress_bar(len(prompts) * args.max_tokens, "generate", "tok", args=args) as bar:
        def on_output(out: SequenceOutput) -> None:
            produced[out.request_id] = produced.get(out.request_id, 0) + len(out.new_token_ids)
            bar.update(len(out.new_token_ids))
            if out.finish_reason is not None:
                bar.total -= max(0, args.max_tokens - produced[out.request_id])
                bar.refresh()

        outs = llm.generate(inputs, params, on_output=on_output)
    for prompt, out in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason}))
        else:
            print(f"### {prompt}\n{out.text}\n[finish_reason={out.finish_reason}, tokens={len(out.token_ids)}]")
    return 0


def _cmd_bench_offline(args: argparse.Namespace) -> int:
    from bench import offline

    offline.run(args, engine_config_from_args(args))
    return 0


def _cmd_bench_ceiling(args: argparse.Namespace) -> int:
    from bench import ceiling

    ceiling.run(args, engine_config_from_args(args))
    return 0


def _cmd_bench_rec(args: argparse.Namespace) -> int:
    from bench import rec

    rec.run(args, engine_config_from_args(args))
def _cmd_bench_spec(args: argparse.Namespace) -> int:
    from bench import spec

    spec.run(args, engine_config_from_args(args))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from xllm.serve import run_serve

    return run_serve(args)


def _cmd_keys(args: argparse.Namespace) -> int:
    """Create CurveZMQ certificates for the scheduler and each named peer, peers authorized."""
    import shutil
    from pathlib import Path

    from common.bus import generate_keys

    directory = Path(args.directory)
    generate_keys(directory, "scheduler")
    (directory / "authorized").mkdir(mode=0o700, exist_ok=True)
    for name in args.peers:
        public, _ = generate_keys(directory, name)
        shutil.copy(public, directory / "authorized" / public.name)
    print(f"keys in {directory}: scheduler + {', '.join(args.peers)} (authorized); "
          f"start every service with --curve-dir {directory}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Subcommand parsers are SettingsParsers too (argparse makes them of the parent's class).
    parser = SettingsParser(prog="xllm", description="xllm: LLM inference and serving")
    parser.add_settings(ServiceConfig, only=("log_level",))
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline with the engine")
    add_engine_arguments(gen)
    gen.add_argument("prompt", nargs="*", help="prompt(s); default: a demo question")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_progress_argument(gen)
    gen.set_defaults(func=_cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    off = bench_sub.add_parser("offline", help="engine throughput without the services")
    add_engine_arguments(off)
    from bench import offline

    offline.add_arguments(off)
    off.set_defaults(func=_cmd_bench_offline)
    ceiling_cmd = bench_sub.add_parser("ceiling", help="the offline benchmark's hardware ceiling here: int8/bf16 "
                                                       "GEMM peaks and DRAM read bandwidth, the ceiling tok/s, and "
                                                       "(--run-offline) the engine's fraction of it")
    add_engine_arguments(ceiling_cmd)
    from bench import ceiling as bench_ceiling

    bench_ceiling.add_arguments(ceiling_cmd)
    ceiling_cmd.set_defaults(func=_cmd_bench_ceiling)
    rec = bench_sub.add_parser("rec", help="generative recommendation: fixed-step beam search over an item "
                                           "vocabulary, with and without overlapping host work and compute")
    add_engine_arguments(rec)
    from bench import rec as bench_rec

    bench_rec.add_arguments(rec)
    rec.set_defaults(func=_cmd_bench_rec)
    spec_cmd = bench_sub.add_parser("spec", help="single-stream decode with speculation none / ngram / suffix on a "
                                                 "repetitive workload (tok/s, acceptance, speedup)")
    add_engine_arguments(spec_cmd)
    from bench import spec as bench_spec

    bench_spec.add_arguments(spec_cmd)
    spec_cmd.set_defaults(func=_cmd_bench_spec)
    from bench import kv as bench_kv, pd as bench_pd, quality as bench_quality, serve as bench_serve
    from bench import chaos as bench_chaos, soak as bench_soak
    from bench import colocate as bench_colocate
    from bench import vs_llamacpp as bench_vs_llamacpp
    from bench import fidelity as bench_fidelity
    from bench import eplb as bench_eplb
    from bench import dp_balance as bench_dp_balance
    from bench import decode_attention as bench_decode_attention
    from bench import mm as bench_mm
    from bench import gpu_decode as bench_gpu_decode

    for name, module, summary in (
        ("serve", bench_serve, "load generator against an OpenAI-compatible server (TTFT, TPOT, end-to-end, "
                               "tokens/s over a concurrency sweep)"),
        ("pd", bench_pd, "mixed workers vs static vs dynamic prefill/decode under a load calibrated to this "
                         "machine, over several seeds (SLO attainment mean and spread, flips, predictor error)"),
        ("kv", bench_kv, "tiered KV storage on vs off under multi-turn chats and shared system prompts (TTFT, "
                         "prefix hit rate per tier, throughput)"),
        ("quality", bench_quality, "accuracy of the bf16 / int8 / W8A8 paths and the int8 KV cache against fp32 "
                                   "(perplexity, top-1 agreement, KL) on a text file"),
        ("decode-attention", bench_decode_attention, "the paged decode attention kernel alone per KV dtype, with "
                                                     "and without the flash-decoding split (ms per call, KV GB/s)"),
        ("gpu-decode", bench_gpu_decode, "decode on a CUDA GPU at batch 1/16/64 with and without CUDA graphs, "
                                         "against the weight-read bandwidth floor (ms per step, tok/s)"),
        ("colocate", bench_colocate, "online traffic alone, then with a large Batch API job beside it: online SLO "
                                     "attainment and TTFT/TPOT p50/p99 in both runs, offline tokens/s absorbed"),
        ("soak", bench_soak, "many short requests of every kind, malformed and abandoned ones included: errors "
                             "by kind, worker RSS and used KV pages over time, leak verdicts"),
        ("eplb", bench_eplb, "MoE expert placement: simulated EP rank load (peak/mean) before and after EPLB on a "
                             "skewed tiny MoE, and the re-placement cost"),
        ("dp-balance", bench_dp_balance, "a skewed burst on 2 workers with DP balance off then on: requests per "
                                         "worker over time, p50/p99 TPOT, migrations"),
        ("mm", bench_mm, "multimodal requests (some images repeated) through each EPD placement: TTFT, throughput, "
                         "encoder embedding-cache hit rate"),
        ("chaos", bench_chaos, "SIGKILL workers (and the scheduler) on a seeded schedule under greedy streams: "
                               "recovery time, migrations, extra latency, texts against a no-fault run"),
        ("fidelity", bench_fidelity, "greedy continuations of chat prompts on each numeric path (and llama.cpp): "
                                     "how many tokens stay identical to fp32's"),
        ("vs-llamacpp", bench_vs_llamacpp, "llama.cpp (llama-bench, llama-server) and xllm one after the other on the "
                                           "same GGUF: single-stream decode, prefill, served throughput, as ratios"),
    ):
        command = bench_sub.add_parser(name, help=summary)
        module.add_arguments(command)
        command.set_defaults(func=module.run)

    profile = sub.add_parser("profile", help="measure this machine and choose settings from the numbers")
    profile_sub = profile.add_subparsers(dest="profile_command", required=True)
    from bench import epd_profile

    epd = profile_sub.add_parser("epd", help="encode/prefill/decode cost of a multimodal model here; writes the "
                                              "EPD placement `xllm serve --epd-placement auto` uses, and why")
    add_engine_arguments(epd)
    epd_profile.add_arguments(epd)
    epd.set_defaults(func=epd_profile.run)

    from xllm.batch_cli import add_batch_commands

    add_batch_commands(sub)

    keys = sub.add_parser("keys", help="create CurveZMQ keys for tcp deployments")
    keys.add_argument("directory", help="where to write the certificates")
    keys.add_argument("peers", nargs="*", default=["worker", "gateway"], help="peer names (default: worker gateway)")
    keys.set_defaults(func=_cmd_keys)

    serve = sub.add_parser("serve", help="serve the model over HTTP (gateway + scheduler + workers)")
    add_engine_arguments(serve)
    from xllm.serve import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
