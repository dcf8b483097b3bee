"""How an export splits weights into safetensors shards (Hugging Face's names and sizes)."""

import pytest

from telepathy.export.shards import parse_size, plan_shards, shard_names


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                        ("300KB", 300_000), ("1.5GB", 1_500_000_000), ("7", 7)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["five", "5XB", "-1GB", "0"])
def test_a_bad_size_names_the_value_and_the_form(text):
    with pytest.raises(ValueError, match="--shard-size"):
        parse_size(text)


def test_shards_keep_order_and_size_and_a_large_tensor_gets_its_own():
    sizes = [("a", 4), ("b", 4), ("c", 3), ("big", 20), ("d", 1), ("e", 9)]
    assert plan_shards(sizes, 10) == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert plan_shards(sizes, 100) == [["a", "b", "c", "big", "d", "e"]]


def test_shard_names_follow_hugging_face():
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
