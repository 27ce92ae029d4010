"""`gdsllm bench` on the CPU: token counts, batched decode (greedy tokens equal unbatched ones and transformers',
bytes streamed per step independent of the batch), and the Qwen3.5-MoE expert-cache figures against the forward's
own counters."""

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gdsllm_core import plugins
from gdsllm_core.bench import bench_forward, format_report, prompt_tokens
from gdsllm_core.cli.bench_cmd import parse_batches
from gdsllm_core.cli.main import _add_commands, cli
from gdsllm_core.convert import convert
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import BadRequestError
from gdsllm_core.hookspecs import hookimpl
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.runtime.stats import ResidencyStats, TierBytes
from gdsllm_core.storage.reader import CpuBackend, ExtentReader, extent_views

ROOT = Path(__file__).resolve().parents[2]
for helpers in ("plugins/gdsllm_llama/tests", "plugins/gdsllm_qwen_moe/tests"):
    if str(ROOT / helpers) not in sys.path:
        sys.path.append(str(ROOT / helpers))

from llama_testing import hf_logits_with_cache, tiny_llama  # noqa: E402
from qwen_moe_helpers import convert_into, make_hf_model  # noqa: E402

PP, TG = 5, 3


class StreamingResidency:
    """Re-reads an extent from storage at every fetch, counted as `bytes_from_storage` like the GPU residency's
    storage tier: makes the CPU LLaMA forward stream its layers, so bytes per decode step can be observed."""

    def __init__(self, entry, placement, reader=None):
        self.reader = ExtentReader(entry.path, entry.manifest, backend=CpuBackend())
        self.extents = {e.name: e for e in entry.manifest.extents}
        self.counters = {"fetches": 0, "bytes_from_storage": 0}

    def fetch(self, extent_name):
        extent = self.extents[extent_name]
        buffer = torch.empty(extent.nbytes, dtype=torch.uint8)
        self.reader.read([extent], [buffer])
        self.counters["fetches"] += 1
        self.counters["bytes_from_storage"] += extent.nbytes
        return extent_views(extent, buffer)

    def prefetch(self, extent_names):
        pass

    def tier(self, extent_name):
        return "storage"

    def stats(self):
        return ResidencyStats(backend="cpu", tiers=TierBytes(), **self.counters)

    def close(self):
        self.reader.close()


class StreamingResidencyPlugin:
    @hookimpl
    def register_residencies(self, register):
        register("bench-test-streaming", StreamingResidency)


@pytest.fixture(scope="module")
def registered():
    """The LLaMA and Qwen-MoE plugins, and the streaming residency above, registered with the plugin manager."""
    import gdsllm_llama.plugin
    import gdsllm_qwen_moe.plugin

    plugins.load_plugins()
    added = []
    residency_plugin = StreamingResidencyPlugin()
    for module, name in ((gdsllm_llama.plugin, "llama"), (gdsllm_qwen_moe.plugin, "qwen_moe"),
                         (residency_plugin, "bench-test-streaming")):
        if not any(p is module for p in plugins.pm.get_plugins()) and plugins.pm.get_plugin(name) is None:
            plugins.pm.register(module, name=name)
            added.append(module)
    yield
    for module in added:
        plugins.pm.unregister(module)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, registered):
    """(HF model, converted entry) of a tiny random LLaMA."""
    folder = tmp_path_factory.mktemp("bench_llama")
    model = tiny_llama()
    model.save_pretrained(folder / "hf")
    return model, convert(folder / "hf", ModelStore(folder / "models"), "tiny")


def test_cli_bench_on_cpu_counts_tokens_and_measures_the_ceilings(tiny, monkeypatch):
    _model, entry = tiny
    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(entry.path.parent))
    _add_commands()
    out = CliRunner().invoke(cli, ["bench", "tiny", "--device", "cpu", "--pp", str(PP), "--tg", str(TG),
                                   "--batch", "1,3", "--warm", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert (result["pp"], result["tg"], result["batch"]) == (PP, TG, 1)
    assert [run["batch"] for run in result["batches"]] == [1, 3]
    for run in result["batches"]:
        n = run["batch"]
        assert (run["prefilled_tokens"], run["decoded_tokens"]) == (n * PP, n * TG)
        assert run["tg_tok_s"] == pytest.approx(n * TG / run["tg_s"])
        assert run["tg_tok_s_per_sequence"] == pytest.approx(TG / run["tg_s"])
        assert run["tg_moved_bytes_per_step"] == 0  # resident on the CPU: nothing streams
    assert result["batches"][1]["tg_speedup_vs_batch1"] == pytest.approx(
        result["batches"][1]["tg_tok_s"] / result["batches"][0]["tg_tok_s"])
    assert result["host_bandwidth_gbps"] > 0 and "gpu_bandwidth_gbps" not in result
    storage = result["storage"]
    largest = max(entry.manifest.files, key=lambda name: (entry.path / name).stat().st_size)
    assert storage["backend"] == "cpu" and storage["bytes"] == (entry.path / largest).stat().st_size
    assert not storage["o_direct"] and storage["caches"].startswith("warm")
    table = CliRunner().invoke(cli, ["bench", "tiny", "--device", "cpu", "--pp", str(PP), "--tg", str(TG),
                                     "--batch", "2", "--no-ceilings"])
    assert table.exit_code == 0, table.output
    assert f"pp{PP} x 2 sequences" in table.output and "decode batch 2" in table.output


def test_cli_bench_rejects_a_bad_batch_list(tiny, monkeypatch):
    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(tiny[1].path.parent))
    _add_commands()
    assert CliRunner().invoke(cli, ["bench", "tiny", "--device", "cpu", "--batch", "1,0"]).exit_code == 1
    for bad in ("1,0", "x", "", "2,,4"):
        with pytest.raises(BadRequestError, match="--batch"):
            parse_batches(bad)
    assert parse_batches("1,8,16") == (1, 8, 16)


def test_batched_tokens_equal_transformers_and_bytes_per_step_do_not_grow(tiny):
    """Streaming every layer from storage at each step: the bytes of one step are the layers + embeddings, for
    1 sequence or 3; each batched sequence decodes transformers' greedy tokens for the one-token prompt its decode
    starts from (the first of its pp prompt, as llama-bench's tg starts from an empty context)."""
    from gdsllm_llama.forward import LlamaForward

    model, entry = tiny
    forward = LlamaForward(entry, LoadOptions(extra={"residency": "bench-test-streaming", "dequant_cache_bytes": 0}))
    try:
        result = bench_forward(forward, entry, PP, TG, batches=(1, 3))
    finally:
        forward.close()
    per_step = sum(e.nbytes for e in entry.manifest.extents if e.name.startswith("blk.") or e.name == "token_embd")
    single, batched = result["batches"]
    for run in (single, batched):
        assert run["tg_storage_bytes_per_step"] == per_step
        assert run["tg_moved_bytes_per_token"] == per_step / run["batch"]
    for prompt, tokens in zip(prompt_tokens(entry.manifest.config["vocab_size"], PP, 3), batched["tokens"],
                              strict=True):
        logits, fed = hf_logits_with_cache(model, prompt.tolist()[:1], TG + 1)
        assert tokens == fed + [int(logits[-1].argmax())]
    assert single["tokens"] == batched["tokens"][:1]


def test_smollm2_batched_decode_equals_single_sequences(smollm2, registered):
    from gdsllm_llama.forward import LlamaForward

    pp, tg = 3, 1
    forward = LlamaForward(smollm2, LoadOptions())
    try:
        result = bench_forward(forward, smollm2, pp, tg, batches=(1, 2))
        single, batched = result["batches"]
        assert [(r["prefilled_tokens"], r["decoded_tokens"]) for r in (single, batched)] == [(3, 1), (6, 2)]
        assert single["tg_moved_bytes_per_step"] == batched["tg_moved_bytes_per_step"] == 0
        assert single["tokens"] == batched["tokens"][:1]
        prompt = prompt_tokens(forward.vocab_size, pp, 2)[1][:1]  # sequence 1's decode, alone: its first token
        cache = forward.new_cache(tg + 3)
        alone = [int(forward.prefill(prompt, cache).argmax())]
        for _ in range(tg + 1):
            alone.append(int(forward.decode(torch.tensor(alone[-1:]), [cache])[0].argmax()))
    finally:
        forward.close()
    assert batched["tokens"][1] == alone
    assert len(alone) == tg + 2


def test_moe_expert_cache_figures_equal_the_forward_counters(tmp_path, registered):
    from gdsllm_qwen_moe.forward import QwenMoeForward

    pp, tg = 4, 2
    model = make_hf_model()
    model.save_pretrained(tmp_path / "hf")
    entry = convert_into(tmp_path / "store", tmp_path / "hf")
    sizes = {e.nbytes for e in entry.manifest.extents if ".expert." in e.name}
    assert len(sizes) == 1
    expert_bytes = sizes.pop()
    forward = QwenMoeForward(entry, LoadOptions(host_cache=6 * expert_bytes))  # a small cache: hits and misses
    try:
        result = bench_forward(forward, entry, pp, tg, batches=(1, 2))
        counters = forward.experts.counters
    finally:
        forward.close()
    total = result["expert_cache"]
    assert (total["host"]["hits"], total["host"]["misses"]) == (counters.hits, counters.misses)
    assert counters.hits > 0 and counters.misses > 0
    assert total["storage"]["bytes_read"] == counters.bytes_read == counters.misses * expert_bytes
    layers, top_k, n_experts = (entry.manifest.config[k] for k in ("num_hidden_layers", "num_experts_per_tok",
                                                                    "num_experts"))
    for run in result["batches"]:
        decode = run["tg_expert_cache"]
        requests = decode["hits"] + decode["misses"]  # experts used: the union over the batch, per layer and step
        if run["batch"] == 1:
            assert requests == tg * layers * top_k
        assert tg * layers * top_k <= requests <= tg * layers * min(n_experts, run["batch"] * top_k)
        assert decode["bytes_read"] == decode["misses"] * expert_bytes
        assert run["tg_storage_bytes_per_step"] == decode["bytes_read"] / tg
        assert decode["hit_rate"] == pytest.approx(decode["hits"] / (decode["hits"] + decode["misses"]))
    rows = dict(format_report({"model": "tiny", "device": "cpu", "pp": pp, "tg": tg, **result}))
    assert rows["expert cache, whole run"].startswith(f"hits {counters.hits}, misses {counters.misses}, ")
    assert f"{counters.bytes_read:,} bytes read" in rows["expert cache, whole run"]
    for run in result["batches"]:
        decode = run["tg_expert_cache"]
        assert rows[f"experts, decode batch {run['batch']}"].startswith(
            f"hits {decode['hits']}, misses {decode['misses']}, ")
    for prompt, tokens in zip(prompt_tokens(entry.manifest.config["vocab_size"], pp, 2),
                              result["batches"][1]["tokens"], strict=True):
        with torch.no_grad():
            reference = model.generate(prompt[None, :1], max_new_tokens=tg + 2, do_sample=False, pad_token_id=0)
        assert tokens == reference[0, 1:].tolist()  # decode starts from the prompt's first token


def test_cli_bench_prefetch_flag_turns_moe_read_ahead_on_and_off(tmp_path, registered, monkeypatch):
    """`gdsllm bench --prefetch` reads experts ahead on the CPU (where it is off by default); `--no-prefetch` and no
    flag read none: the read-ahead counts in the JSON report."""
    model = make_hf_model()
    model.save_pretrained(tmp_path / "hf")
    entry = convert_into(tmp_path / "store", tmp_path / "hf", name="tiny-moe")
    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(entry.path.parent))
    _add_commands()
    prefetched = {}
    for flag in ("--prefetch", "--no-prefetch", None):
        args = ["bench", "tiny-moe", "--device", "cpu", "--pp", "4", "--tg", "3", "--host-cache", "0", "--warm",
                "--no-ceilings", "--json"] + ([flag] if flag else [])
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 0, out.output
        prefetched[flag] = json.loads(out.output)["expert_cache"]["prefetch"]["prefetched"]
    assert prefetched["--prefetch"] > 0 and prefetched["--no-prefetch"] == prefetched[None] == 0
