"""The streaming benchmark's accounting on tiny synthetic shapes (the real run is on the GPU machine)."""

import itertools

import pytest

from gdsllm_qwen_moe import bench


def test_bench_accounting_on_tiny_shapes(tmp_path):
    result = bench.main(["--root", str(tmp_path), "--tiny", "--layers", "4", "--device", "cpu", "--steps", "2",
                         "--ceiling-gb", "0.0005", "--paired-gb", "0.0003", "--zipf-tokens", "12", "--budget-gb", "0.0004",
                         "--vram-budget-gb", "0.0002", "--read-configs", "2x0.25"])
    top_k, expert_bytes = 4, result["expert_bytes"]
    assert [row["bytes_per_layer"] for row in result["cold"]["steps"]] == [top_k * expert_bytes] * 2  # host cache off
    zipf = result["zipf"]
    assert 0 < zipf["hit_rate"] < 1
    assert zipf["bytes_read_per_token"] == pytest.approx(zipf["cold_bytes_per_token_x_miss_rate"], rel=1e-12)
    assert zipf["cold_bytes_per_token"] == 4 * top_k * expert_bytes
    two = result["zipf_two_tiers"]  # the VRAM tier (device-agnostic: host memory here) in front of the host tier
    assert 0 < two["vram_hit_rate"] < two["hit_rate"] < 1 and zipf["vram_hit_rate"] == 0
    assert two["bytes_read_per_token"] == pytest.approx(two["cold_bytes_per_token_x_miss_rate"], rel=1e-12)
    assert [row["bytes_per_layer"] for row in result["cold_2x0.25"]["steps"]] == [top_k * expert_bytes] * 2
    assert [row["bytes_per_layer"] for row in result["reads_only"]["steps"]] == [top_k * expert_bytes] * 2
    ceiling = result["ceiling"]
    assert ceiling["ceiling_gb_s"] == max(ceiling["default_reader"], ceiling["expert_reader"])
    assert result["random_ceiling_gb_s"] == ceiling["random_experts"] > 0
    row = result["cold"]["steps"][0]  # each ratio: seconds over bytes / that ceiling
    assert row["ratio_to_random_io_bound"] == pytest.approx(
        row["cold_s_per_layer"] / (row["bytes_per_layer"] / (result["random_ceiling_gb_s"] * 1e9)))
    assert row["ratio_to_io_bound"] == pytest.approx(row["cold_s_per_layer"] / row["io_bound_s_per_layer"])
    around = row["ceiling_gb_s_around"]  # the probes either side of the step: both positive, their mean used
    assert len(around) == 2 and min(around) > 0
    assert row["paired_ratio_to_io_bound"] == pytest.approx(
        row["cold_s_per_layer"] / (row["bytes_per_layer"] / (sum(around) / 2 * 1e9)))
    assert result["cold"]["mean_paired_ratio_to_io_bound"] == pytest.approx(
        sum(r["paired_ratio_to_io_bound"] for r in result["cold"]["steps"]) / 2)
    assert row["requested_bytes_per_layer"] == row["bytes_per_layer"]  # no read-ahead: every byte was routed to
    assert row["paired_ratio_to_requested"] == pytest.approx(row["paired_ratio_to_io_bound"])


def test_bench_interleaves_settings_between_shared_probes(tmp_path):
    """Round 0 runs cold, its reads alone, then the other setting; round 1 starts with the other setting. Each
    probe closes one item and opens the next."""
    result = bench.main(["--root", str(tmp_path), "--tiny", "--layers", "2", "--device", "cpu", "--steps", "2",
                         "--ceiling-gb", "0.0005", "--paired-gb", "0.0003", "--zipf-tokens", "1", "--budget-gb", "0.0004",
                         "--read-configs", "3x0.5"])
    cold, alone, other = (result[label]["steps"] for label in ("cold", "reads_only", "cold_3x0.5"))
    order = [cold[0], alone[0], other[0], other[1], cold[1], alone[1]]
    probes = [row["ceiling_gb_s_around"] for row in order]
    assert all(before[1] == after[0] for before, after in itertools.pairwise(probes))
    assert len({probe[0] for probe in probes}) == len(probes)  # every item between probes of its own
