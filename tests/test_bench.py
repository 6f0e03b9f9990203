"""bench.py on the tiny model at toy sizes: the measurements are real and the ratios come from them.
Nothing here asserts a speed."""

import json

import pytest

import bench


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.99), (0.0, 1.0)])
def test_sampler_record_counts_equal_tokens_and_derives_the_ratio(tiny, temperature, top_p):
    model, tok, ip = tiny
    stop_ids = list(model.generation_config.eos_token_id)
    P, n, T = 2, 2, 4
    prompts = bench.make_prompts(tok, ip, P, 56, seed=0)
    record = bench.measure_sampler(model, prompts, n, T, temperature, top_p, repeats=1)
    assert set(record) == {"generate", "ours_shared", "ours_unshared"}
    for path in record.values():
        assert path["seconds"] > 0 and path["ms_per_step"] > 0
        assert path["new_tokens"] == P * n * T
        assert path["tokens_per_s"] == pytest.approx(path["new_tokens"] / path["seconds"], rel=1e-12)
    for name in ("ours_shared", "ours_unshared"):
        quotient = record[name]["tokens_per_s"] / record["generate"]["tokens_per_s"]
        assert record[name]["ratio"] == pytest.approx(quotient, rel=1e-12)
    assert list(model.generation_config.eos_token_id) == stop_ids, "the stop ids must be restored"


def test_main_writes_table_and_json_of_all_three_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--model", "tiny", "--device", "cpu", "--prompts", "2", "--samples", "2", "--new-tokens", "4",
                "--image-size", "56", "--repeats", "1", "--no-greedy", "--grpo-rows", "4",
                "--matmul-size", "64", "--selfplay-images", "1", "--selfplay-tokens", "4", "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert {"device", "torch", "transformers", "date", "command"} <= set(result["header"])
    figures = [r["figure"] for r in result["rows"]]
    assert any("ours (one prefill" in f for f in figures) and any("MFU" in f for f in figures)
    assert any(f.startswith("self-play questioner") for f in figures)
    for r in result["rows"]:
        assert r["ours"] > 0
        assert r["ratio"] == (r["ours"] / r["baseline"] if r["baseline"] else None)
        assert r["figure"] in printed
    grpo = result["records"]["grpo"]
    assert grpo["flops"] == (6 + 2) * grpo["trainable_params"] * grpo["tokens"]
