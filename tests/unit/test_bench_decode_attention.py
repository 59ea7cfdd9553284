"""`xllm bench decode-attention` on a tiny case: the JSON it writes and its argument checks."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import decode_attention
from kernels.cpu_ext import cpu_ops_module


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    decode_attention.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.skipif(cpu_ops_module() is None, reason="the C++ CPU kernels could not be built on this machine")
def test_writes_split_and_unsplit_times_per_dtype(tmp_path):
    out = tmp_path / "da.json"
    args = _args("--cases", "1x300,4x40", "--kv-dtypes", "bf16,int8", "--repeats", "2", "--layers", "3", "--json", str(out))
    assert decode_attention.run(args) == 0
    doc = json.loads(out.read_text())
    assert doc["layers"] == 3
    rows = {(r["batch"], r["context"], r["kv_dtype"]): r for r in doc["results"]}
    assert set(rows) == {(1, 300, "bfloat16"), (1, 300, "int8"), (4, 40, "bfloat16"), (4, 40, "int8")}
    for r in rows.values():
        assert r["split_ms"] > 0 and r["unsplit_ms"] > 0 and r["split_speedup"] > 0
    # int8 rows: 64 values + a 4-byte scale, against 2 x 64 bytes in bf16.
    assert rows[(1, 300, "int8")]["kv_bytes_per_call"] * 128 == rows[(1, 300, "bfloat16")]["kv_bytes_per_call"] * 68


def test_bad_cases_and_dtypes_are_refused():
    with pytest.raises(SystemExit, match="BATCHxCONTEXT"):
        decode_attention._parse_cases("1x")
    with pytest.raises(SystemExit, match="positive"):
        decode_attention._parse_cases("0x512")
    if cpu_ops_module() is not None:
        with pytest.raises(SystemExit, match="unknown"):
            decode_attention.run(_args("--kv-dtypes", "int4"))
