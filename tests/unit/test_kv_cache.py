import pytest
import torch

from common.engine.kv_cache import (
    allocate_kv_caches,
    default_kv_budget,
    kv_page_bytes,
    num_pages_for_budget,
    parse_memory_size,
)


def test_page_bytes_counts_k_and_v_in_every_layer():
    # 2 (K,V) * 30 layers * 16 tokens * 3 heads * 64 dims * 2 bytes
    assert kv_page_bytes(30, 3, 64, 16, torch.bfloat16) == 2 * 30 * 16 * 3 * 64 * 2
    assert kv_page_bytes(1, 1, 8, 4, torch.float32) == 2 * 4 * 8 * 4
    assert kv_page_bytes(1, 1, 8, 4, "float16") == kv_page_bytes(1, 1, 8, 4, torch.float16)


def test_page_bytes_rejects_bad_arguments():
    with pytest.raises(ValueError):
        kv_page_bytes(0, 1, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        kv_page_bytes(1, 1, 8, 4, "int3")


def test_pages_for_budget_rounds_down():
    page = kv_page_bytes(2, 2, 16, 8, torch.float32)
    assert num_pages_for_budget(page * 10, 2, 2, 16, 8, torch.float32) == 10
    assert num_pages_for_budget(page * 10 + page - 1, 2, 2, 16, 8, torch.float32) == 10
    assert num_pages_for_budget(page - 1, 2, 2, 16, 8, torch.float32) == 0
    with pytest.raises(ValueError):
        num_pages_for_budget(-1, 2, 2, 16, 8, torch.float32)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        ("1000000", 1_000_000),
        ("64 kib", 64 * 1024),
        ("3MB", 3_000_000),
        ("10B", 10),
        (" 1Ti ", 2**40),
        (".5GiB", 2**29),
        (4096, 4096),
    ],
)
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "2 XB", "-1GiB", "1.2.3G", "twelve", -5])
def test_parse_memory_size_rejects_garbage(bad):
    with pytest.raises(ValueError):
        parse_memory_size(bad)


def test_default_budget_is_fraction_of_available_memory(monkeypatch):
    import common.engine.kv_cache as kv

    monkeypatch.setattr(kv, "_available_host_memory", lambda: 10_000)
    assert default_kv_budget(0.3) == 3000
    assert default_kv_budget() == 3000
    with pytest.raises(ValueError):
        default_kv_budget(0.0)
    with pytest.raises(ValueError):
        default_kv_budget(1.5)


def test_available_host_memory_reads_meminfo():
    import common.engine.kv_cache as kv

    available = kv._available_host_memory()
    assert available > 0
    assert 0 < default_kv_budget(0.1) <= available


def test_allocate_layout_and_zeroed():
    caches = allocate_kv_caches(5, 3, 2, 8, 4, torch.float16, "cpu")
    assert len(caches) == 3
    for cache in caches:
        assert cache.shape == (2, 2, 5, 4, 8)  # [K/V, kv heads, pages, page slots, head dim]
        assert cache.dtype == torch.float16
        assert not cache.any()
    # Layers are distinct storage: writing one must not touch another.
    caches[0][0, 0] = 1
    assert not caches[1].any()
    assert caches[0].untyped_storage().data_ptr() != caches[1].untyped_storage().data_ptr()


def test_allocate_matches_page_bytes():
    caches = allocate_kv_caches(7, 2, 2, 8, 4, torch.bfloat16)
    total = sum(c.numel() * c.element_size() for c in caches)
    assert total == 7 * kv_page_bytes(2, 2, 8, 4, torch.bfloat16)


def test_allocate_works_with_attention_kernel():
    from kernels.attention import build_attention_metadata, paged_attention, write_kv

    caches = allocate_kv_caches(4, 1, 1, 8, 2, torch.float32)
    k = torch.randn(3, 1, 8)
    v = torch.randn(3, 1, 8)
    q = torch.randn(3, 1, 8)
    # Page 0 is an ordinary page: a sequence may own it.
    meta = build_attention_metadata([3], [3], [[2, 0]], page_size=2)
    write_kv(caches[0], k, v, meta.slot_mapping)
    assert torch.equal(caches[0][0, :, 2, 0], k[0])
    assert torch.equal(caches[0][1, :, 0, 0], v[2])
    out = paged_attention(q, caches[0], meta, scale=8**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=8**-0.5
    ).transpose(0, 1)
    torch.testing.assert_close(out, ref)



def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0]


def _thp_eligible(cache: torch.Tensor) -> str | None:
    address = cache.data_ptr()
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "THPeligible:":
                return line.split()[1]
    return None


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages on this kernel")
def test_cpu_pool_asks_for_huge_pages_only_when_told(monkeypatch):
    """XLLM_KV_HUGEPAGES=1 advises the pool for 2 MiB pages; by default (on a kernel that gives them
    only on request) it keeps 4 KiB ones, whose first touch costs less."""
    from common.engine.kv_cache import allocate_kv_caches

    monkeypatch.setenv("XLLM_KV_HUGEPAGES", "1")
    assert _thp_eligible(allocate_kv_caches(512, 1, 2, 64, 16, torch.bfloat16)[0]) == "1"
    monkeypatch.delenv("XLLM_KV_HUGEPAGES")
    if _thp_mode() == "madvise":
        assert _thp_eligible(allocate_kv_caches(512, 1, 2, 64, 16, torch.bfloat16)[0]) == "0"
