"""Decode CUDA graphs: bucket choice, padding of the static inputs and the replay-or-eager choice
on the CPU (the padded forward runs the Triton kernels in the interpreter); capture and replay
themselves on a GPU only."""

from __future__ import annotations

from _triton_env import HAS_TRITON, ON_GPU  # sets TRITON_INTERPRET first

import pytest
import torch

from common.engine.config import EngineConfig
from common.engine.cuda_graphs import CudaGraphRunner, DecodeInputs, graph_buckets, maybe_cuda_graphs, pick_bucket
from kernels.attention import build_attention_metadata
from kernels.backend import force_backend

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_gpu = pytest.mark.skipif(not ON_GPU or not HAS_TRITON, reason="needs a CUDA GPU and triton")


def test_buckets_are_powers_of_two_up_to_the_batch_limit():
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert graph_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert graph_buckets(1) == [1]
    with pytest.raises(ValueError):
        graph_buckets(0)


def test_a_batch_takes_the_smallest_bucket_that_holds_it():
    buckets = graph_buckets(48)
    assert [pick_bucket(n, buckets) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    assert pick_bucket(49, buckets) is None


def test_inputs_are_padded_to_the_bucket():
    inputs = DecodeInputs.allocate(8, 6, 4, "cpu")
    big = build_attention_metadata([1] * 6, [5, 9, 2, 3, 4, 21], [[1, 2]] * 5 + [[7, 8, 9, 10, 11, 12]], 4)
    inputs.load(torch.arange(6) + 10, torch.tensor([4, 8, 1, 2, 3, 20]), big, 8)
    meta = build_attention_metadata([1, 1, 1], [5, 9, 2], [[3, 4], [5, 6, 7], [2]], 4)
    inputs.load(torch.tensor([11, 12, 13]), torch.tensor([4, 8, 1]), meta, 4)
    assert inputs.input_ids[:4].tolist() == [11, 12, 13, 0]
    assert inputs.positions[:4].tolist() == [4, 8, 1, 0]
    assert inputs.slot_mapping[:4].tolist() == [4 * 4 + 0, 7 * 4 + 0, 2 * 4 + 1, -1]  # padding writes nowhere
    assert inputs.k_len[:4].tolist() == [5, 9, 2, 1]
    assert inputs.pages[:3, :3].tolist() == [[3, 4, 0], [5, 6, 7], [2, 0, 0]]
    # Every page id a padding row can read is a real page (stale ids of an earlier, larger batch).
    assert inputs.pages.max() < 13
    graph_meta = inputs.metadata(4)
    assert graph_meta.prefill is None and graph_meta.num_tokens == 4
    # The graph's metadata is views of the buffers: a later load is seen by the replay.
    assert graph_meta.token_pages.data_ptr() == inputs.pages.data_ptr()
    assert graph_meta.slot_mapping.data_ptr() == inputs.slot_mapping.data_ptr()
    assert graph_meta.decode.q_pos[:, 0].tolist() == [4, 8, 1, 0]
    with pytest.raises(ValueError, match="exceeds"):
        inputs.load(torch.tensor([1]), torch.tensor([30]), build_attention_metadata([1], [30], [list(range(8))], 4), 1)


def test_config_flag_and_cpu_engines_stay_eager():
    assert EngineConfig().cuda_graphs is True
    from common.engine.config import add_engine_arguments, engine_config_from_args
    from common.settings import SettingsParser

    parser = SettingsParser()
    add_engine_arguments(parser)
    assert engine_config_from_args(parser.parse_args(["--no-cuda-graphs"])).cuda_graphs is False
    caches = [torch.zeros(2, 1, 4, 4, 8)]
    assert maybe_cuda_graphs(torch.nn.Identity(), caches, 4, 16, 8, enabled=True) is None  # CPU: eager


# -- the padded forward, on the CPU --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from _model_helpers import make_hf_model, save_hf_model
    from common.models.registry import load_model

    hf = make_hf_model("llama", seed=2, head_dim=16)
    model, config = load_model(save_hf_model(hf, tmp_path_factory.mktemp("llama")))
    return model, config


def _caches(config, device="cpu", dtype=torch.float32, pages=24, page=4):
    # A sentinel in every slot: a write to a slot no sequence owns would show.
    return [torch.full((2, config.num_key_value_heads, pages, page, config.head_dim), 7.0, dtype=dtype, device=device)
            for _ in range(config.num_hidden_layers)]


def _prefill(model, caches, prompts, tables, page, device="cpu"):
    lens = [len(p) for p in prompts]
    meta = build_attention_metadata(lens, lens, tables, page, device=device)
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    pos = torch.tensor([i for n in lens for i in range(n)], device=device)
    model(ids, pos, meta, caches)


@needs_triton
@pytest.mark.skipif(ON_GPU, reason="the CPU interpreter variant; the GPU test replays real graphs")
def test_padded_static_forward_equals_eager_and_writes_no_other_page(tiny_model, monkeypatch):
    """What a graph replays (the bucket-4 forward over the static buffers, one padding row) gives
    the eager rows, and the padding row leaves every page outside the batch untouched."""
    import common.models.layers as layers

    monkeypatch.setattr(layers, "_cpu_ext", lambda x: None)  # C++ ops would write slot -1
    model, config = tiny_model
    prompts, tables = [[5, 9, 14, 3, 3], [8, 1], [30, 31, 32, 33, 34, 35, 36]], [[4, 9], [17], [2, 11]]
    with force_backend("triton"), torch.inference_mode():
        caches = _caches(config)
        _prefill(model, caches, prompts, tables, 4)
        eager_caches = [c.clone() for c in caches]
        ctx = [len(p) + 1 for p in prompts]
        meta = build_attention_metadata([1, 1, 1], ctx, tables, 4)
        ids, pos = torch.tensor([40, 41, 42]), torch.tensor([c - 1 for c in ctx])
        eager = model(ids, pos, meta, eager_caches)

        runner = CudaGraphRunner(model, caches, page_size=4, max_model_len=32, max_batch=8)
        runner.inputs.load(ids, pos, meta, 4)
        static = model(runner.inputs.input_ids[:4], runner.inputs.positions[:4], runner.inputs.metadata(4), caches)
    torch.testing.assert_close(static[:3], eager, rtol=1e-5, atol=1e-5)
    for got, ref in zip(caches, eager_caches):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        used = {p for t in tables for p in t}
        unused = [p for p in range(got.shape[2]) if p not in used]
        assert (got[:, :, unused] == 7.0).all()  # page 0 (the padding row's page) included


@needs_triton
@pytest.mark.skipif(ON_GPU, reason="the CPU interpreter variant")
def test_runner_replays_decode_batches_that_fit_and_runs_the_rest_eagerly(tiny_model, monkeypatch):
    """The replay-or-eager choice, with a CPU stand-in for the captured graph of bucket 4 (it runs
    the same static-buffer forward a capture would record)."""
    import common.models.layers as layers

    monkeypatch.setattr(layers, "_cpu_ext", lambda x: None)
    model, config = tiny_model
    caches = _caches(config)
    runner = CudaGraphRunner(model, caches, page_size=4, max_model_len=32, max_batch=4)
    out = torch.empty(4, config.hidden_size)
    inp = runner.inputs

    def replay():
        out.copy_(model(inp.input_ids[:4], inp.positions[:4], inp.metadata(4), caches))

    runner.graphs[4] = (replay, out)
    tables = [[4, 9], [17], [2, 11]]
    with force_backend("triton"), torch.inference_mode():
        # A prefill batch: eager.
        _prefill(runner, caches, [[5, 9, 14, 3, 3], [8, 1], [30, 31, 32]], tables, 4)
        assert (runner.replays, runner.eager_steps) == (0, 1)
        meta = build_attention_metadata([1, 1, 1], [6, 3, 4], tables, 4)
        ids, pos = torch.tensor([40, 41, 42]), torch.tensor([5, 2, 3])
        reference = [c.clone() for c in caches]
        expected = model(ids, pos, meta, reference)
        got = runner(ids, pos, meta, caches)
        assert (runner.replays, runner.eager_steps) == (1, 1)
        assert got.shape == (3, config.hidden_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # No graph for bucket 2 (only 4 was "captured"), other KV lists, a page table wider than
        # max_model_len's: eager.
        runner(ids[:2], pos[:2] + 1, build_attention_metadata([1, 1], [7, 4], tables[:2], 4), caches)
        runner(ids, pos, meta, reference)
        wide = build_attention_metadata([1, 1, 1], [7, 4, 5], [tables[0] + [0] * 7, tables[1], tables[2]], 4)
        assert runner.is_graphable(ids, wide) is None
        assert (runner.replays, runner.eager_steps) == (1, 3)


# -- on a GPU --------------------------------------------------------------------------------------


@needs_gpu
def test_graph_replay_equals_eager_on_gpu(tiny_model):
    import copy

    model, config = tiny_model
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    caches = _caches(config, "cuda", torch.bfloat16)
    prompts, tables = [[5, 9, 14, 3, 3], [8, 1], [30, 31, 32, 33, 34, 35, 36]], [[4, 9], [17], [2, 11]]
    with torch.inference_mode():
        _prefill(model, caches, prompts, tables, 4, "cuda")
        runner = maybe_cuda_graphs(model, caches, 4, 32, 8, enabled=True)
        assert runner is not None and sorted(runner.graphs) == [1, 2, 4, 8]
        assert all((c[:, :, [p for p in range(24) if p not in (2, 4, 9, 11, 17)]] == 7.0).all() for c in caches)
        ctx = [len(p) + 1 for p in prompts]
        meta = build_attention_metadata([1, 1, 1], ctx, tables, 4, device="cuda")
        ids, pos = torch.tensor([40, 41, 42], device="cuda"), torch.tensor([c - 1 for c in ctx], device="cuda")
        eager_caches = [c.clone() for c in caches]
        expected = model(ids, pos, meta, eager_caches)
        got = runner(ids, pos, meta, caches)
        assert runner.replays == 1
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    for c, e in zip(caches, eager_caches):
        torch.testing.assert_close(c.float(), e.float(), rtol=2e-2, atol=2e-2)


@needs_gpu
def test_engine_greedy_output_is_the_same_with_and_without_graphs(smollm_path):
    from common.engine import LLM, SamplingParams

    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def fib(n):"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for graphs in (True, False):
        llm = LLM(smollm_path, device="cuda", dtype="float32", cuda_graphs=graphs, kv_cache_memory="256MiB")
        assert (llm.engine.runner.decode_graphs is not None) == graphs
        outs[graphs] = [o.token_ids for o in llm.generate(prompts, params)]
        if graphs:
            assert llm.engine.runner.decode_graphs.replays > 0
        del llm
    assert outs[True] == outs[False]
