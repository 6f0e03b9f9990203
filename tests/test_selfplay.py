"""selfplay.py end to end on the tiny model: every file of the run folder, bad images skipped and
listed, and a run killed with SIGKILL that resumes to the same metrics and weights."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from machinery import integrity, lora, policies, runfolder
import selfplay
from conftest import completions
from data import DataError, write_shapes_folder
from model import completion_logprobs, encode_prompts, load_processors, load_vlm
from questioner import QUESTIONER_PROMPTS
from reasoner import reasoner_prompt

REPO = Path(__file__).resolve().parents[1]
TIMING = {"step_time", "tokens_per_s", "peak_mem_gb"}


def small_run_flags(images, model, output):
    return ["--images", str(images), "--model", str(model), "--output", str(output), "--iterations", "2",
            "--questioner-steps", "2", "--reasoner-steps", "2", "--group-size", "4", "--images-per-step", "2",
            "--question-max-tokens", "20", "--answer-max-tokens", "16", "--reward-votes", "4",
            "--curation-images", "4", "--candidates-per-image", "4", "--curation-votes", "4",
            "--questions-per-step", "2", "--min-pixels", "3136", "--max-pixels", "12544",
            "--micro-batch-tokens", "400", "--minibatches", "2", "--lr", "1e-4", "--quiet"]


@pytest.fixture(scope="module")
def format_model(tmp_path_factory):
    """The tiny model after a few supervised steps on the two output formats, with random contents
    (so questions parse and the Reasoner's votes disagree: curation keeps some, the Reasoner trains)."""
    model, tok, ip = load_vlm("tiny", seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(8)]
    questions = [f"How many {c} shapes are there?" for c in ("red", "blue", "green", "yellow")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        q = [questions[i] for i in rng.integers(0, 4, 8)]
        prompts = [QUESTIONER_PROMPTS["paper"]] * 4 + [reasoner_prompt(x) for x in q[4:]]
        targets = [f"<question>{x}</question>" for x in q[:4]] + [
            f"<think>count</think> \\boxed{{{n}}}" for n in rng.integers(1, 4, 4)]
        ids, mask = completions(tok, targets)
        batch = encode_prompts(tok, ip, images, prompts)
        loss = -(completion_logprobs(model, batch, ids, mask) * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("format_model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ip.save_pretrained(folder)
    return folder


def image_folder(root):
    """Four shapes scenes, images in odd but valid modes, and bad files that must be skipped."""
    write_shapes_folder(root / "shapes", 4, seed=0, size=112)
    odd = root / "odd"
    odd.mkdir()
    Image.fromarray((np.arange(56 * 56).reshape(56, 56) * 20).astype(np.uint16)).save(odd / "deep.png")
    Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(odd / "cmyk.jpg")
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(odd / "alpha.png")
    bad = root / "bad"
    bad.mkdir()
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    Image.new("RGB", (200, 200), "red").save(bad / "full.jpg")
    (bad / "truncated.jpg").write_bytes((bad / "full.jpg").read_bytes()[:300])
    (bad / "full.jpg").unlink()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    Image.new("RGB", (1, 1)).save(bad / "dot.png")
    return root, {str(bad / n) for n in ("corrupt.png", "truncated.jpg", "empty.jpg", "text.jpg", "dot.png")}


class StrictHTML(HTMLParser):
    VOID = {"br", "img", "meta", "hr", "input", "link", "col", "wbr", "source", "circle", "line", "rect",
            "path", "polyline", "text", "area", "base"}

    def __init__(self):
        super().__init__()
        self.stack = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def run_selfplay(args, **kwargs):
    return subprocess.Popen([sys.executable, str(REPO / "selfplay.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_end_to_end_writes_the_whole_run_folder(format_model, tmp_path):
    images, bad = image_folder(tmp_path / "images")
    out = tmp_path / "run"
    start = time.perf_counter()
    proc = run_selfplay(small_run_flags(images, format_model, out))
    log, _ = proc.communicate(timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, log
    print(f"\nend-to-end tiny run: {elapsed:.1f} s")
    assert elapsed < 120

    skipped = (out / "skipped_images.txt").read_text().splitlines()
    assert {line.split("\t")[0] for line in skipped} == bad
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in skipped)

    config = json.loads((out / "config.json").read_text())
    assert config["iterations"] == 2 and config["model"] == str(format_model)
    assert json.loads((out / "state.json").read_text())["iteration"] == 3, "past the last iteration: finished"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_fields = {"phase", "iteration", "step", "reward_mean", "reward_std", "zero_var_frac", "kl",
                   "clip_frac_low", "clip_frac_high", "completion_len", "step_time", "tokens_per_s", "peak_mem_gb",
                   "loss", "grad_norm"}
    for phase, steps in (("questioner", 2), ("reasoner", 2)):
        for k in (1, 2):
            lines = [m for m in metrics if m["phase"] == phase and m["iteration"] == k]
            assert [m["step"] for m in lines] == list(range(1, steps + 1)), (phase, k)
            assert all(step_fields <= m.keys() for m in lines)
    assert all("valid_rate" in m for m in metrics if m["phase"] == "questioner")
    curation = [m for m in metrics if m["phase"] == "curation"]
    assert [m["iteration"] for m in curation] == [1, 2]
    for m in curation:
        assert m["n_candidates"] == 16 and sum(m["confidence_hist"]) == m["n_valid"]
        assert m["n_kept"] >= 2, "the format model must give curation something to keep"
    assert [m["iteration"] for m in metrics if m["phase"] == "summary"] == [1, 2]

    for k in (1, 2):
        records = [json.loads(line) for line in (out / f"iter_{k}" / "questions.jsonl").read_text().splitlines()]
        assert len(records) == 16
        for r in records:
            assert Path(r["image"]).exists() and r["kept"] == (r["silver"] is not None and 0.25 <= r["confidence"] <= 0.75)
            assert len(r["answers"]) == (4 if r["valid"] else 0)
        for role in ("questioner", "reasoner"):
            folder = out / f"iter_{k}" / role
            assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
        # every rollout of every training step, beside the step's metrics
        asked = [json.loads(line) for line in (out / f"iter_{k}" / "questioner_episodes.jsonl").open()]
        assert [e["step"] for e in asked] == [1] * 8 + [2] * 8  # 2 images x G = 4 questions a step
        steps = [m for m in metrics if m["phase"] == "questioner" and m["iteration"] == k]
        for m in steps:
            mine = [e for e in asked if e["step"] == m["step"]]
            assert np.mean([e["reward"] for e in mine]) == pytest.approx(m["reward_mean"], abs=1e-6)
            assert np.mean([e["valid"] for e in mine]) == m["valid_rate"]
        assert all(Path(e["image"]).exists() and len(e["answers"]) == (4 if e["valid"] else 0) for e in asked)
        answered = [json.loads(line) for line in (out / f"iter_{k}" / "reasoner_episodes.jsonl").open()]
        assert [e["step"] for e in answered] == [1, 1, 2, 2]  # 2 questions a step, G = 4 answers each
        kept = {(r["question"], r["silver"]) for r in records if r["kept"]}
        assert all((e["question"], e["silver"]) in kept and len(e["answers"]) == 4 for e in answered)
        steps = [m for m in metrics if m["phase"] == "reasoner" and m["iteration"] == k]
        for m in steps:
            rewards = [a["reward"] for e in answered if e["step"] == m["step"] for a in e["answers"]]
            assert np.mean(rewards) == pytest.approx(m["reward_mean"], abs=1e-6)
    # checkpoints are plain transformers checkpoints, and the Reasoner did change
    from transformers import Qwen2_5_VLForConditionalGeneration
    Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "iter_2" / "reasoner")
    before = load_file(Path(format_model) / "model.safetensors")
    after = load_file(out / "iter_2" / "reasoner" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (out / "resume").exists() or not any((out / "resume").iterdir())

    report = (out / "report.html").read_text()
    parser = StrictHTML()
    parser.feed(report)
    parser.close()
    assert parser.stack == []
    assert "Iteration 1" in report and "Iteration 2" in report


def comparable(metrics_path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in Path(metrics_path).read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(format_model, tmp_path):
    images, _ = image_folder(tmp_path / "images")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    reference = run_selfplay(small_run_flags(images, format_model, whole))
    # The victim is started for one iteration and resumed for two: that must not change the result.
    victim = run_selfplay(small_run_flags(images, format_model, broken) + ["--iterations", "1"])
    # Kill once the run is inside the Reasoner phase of iteration 1 (its first step is logged).
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        lines = (broken / "metrics.jsonl").read_text().splitlines() if (broken / "metrics.jsonl").exists() else []
        if any('"phase": "reasoner"' in line for line in lines):
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert json.loads((broken / "state.json").read_text())["phase"] == "reasoner"
    # What a kill at another moment leaves: the checkpoint being replaced, half-written temp files.
    stale = [broken / "resume" / "questioner_1_1", broken / ".report.html.123.tmp",
             broken / "iter_1" / ".questions.jsonl.tmp", broken / "iter_1" / "reasoner.tmp"]
    stale[0].mkdir(parents=True)
    stale[3].mkdir()
    for path in stale[1:3]:
        path.write_text("half")
    # Resumes that must be refused, changing nothing: another image, other settings.
    Image.new("RGB", (64, 64), "blue").save(images / "odd" / "new.png")
    for args, needle in ((["--quiet"], "1 new, 0 gone"), (["--lr", "1e-6"], "drop --lr")):  # 1e-6 is the default
        refused = run_selfplay(["--resume", str(broken)] + args)
        log, _ = refused.communicate(timeout=120)
        assert refused.returncode == 2 and needle in log and len(log.strip().splitlines()) == 1, log
    (images / "odd" / "new.png").unlink()
    resumed = run_selfplay(["--resume", str(broken), "--quiet", "--iterations", "2"])
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert not any(path.exists() for path in stale)
    assert json.loads((broken / "config.json").read_text())["iterations"] == 2
    log, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, log

    assert comparable(broken / "metrics.jsonl") == comparable(whole / "metrics.jsonl")
    for k in (1, 2):
        for role in ("questioner", "reasoner"):
            a = load_file(whole / f"iter_{k}" / role / "model.safetensors")
            b = load_file(broken / f"iter_{k}" / role / "model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), (k, role)
    for k in (1, 2):
        for name in ("questions.jsonl", "questioner_episodes.jsonl", "reasoner_episodes.jsonl"):
            assert (whole / f"iter_{k}" / name).read_text() == (broken / f"iter_{k}" / name).read_text(), (k, name)


def fake_run(folder, **state):
    """A run folder as selfplay.py leaves it, without having run: its config, its state, and the
    roles the state's iteration starts from (a file each, its digest recorded)."""
    folder.mkdir()
    config = dataclasses.asdict(selfplay.Config(model="tiny", images=str(folder.parent / "images"),
                                                output=str(folder), iterations=2))
    (folder / "config.json").write_text(json.dumps(config))
    k, digests = state.get("iteration", 1), {}
    for role in ("questioner", "reasoner") if k > 1 else ():
        (folder / f"iter_{k - 1}" / role).mkdir(parents=True)
        (folder / f"iter_{k - 1}" / role / "config.json").write_text("{}")
        digests |= integrity.digests(folder, folder / f"iter_{k - 1}" / role)
    (folder / "state.json").write_text(json.dumps(dataclasses.asdict(runfolder.State(**state, digests=digests))))
    return folder


def test_cli_errors_are_one_line_and_leave_nothing_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(selfplay, "stop_after_step_on_ctrl_c", lambda: None)  # pytest keeps its own Ctrl-C
    write_shapes_folder(tmp_path / "images", 2, seed=0, size=56)
    old_run = tmp_path / "old_run"  # a run folder written by a version with a setting since renamed
    old_run.mkdir()
    (old_run / "state.json").write_text("{}")
    (old_run / "config.json").write_text(json.dumps({"model": "tiny", "micro_batch_size": 8}))
    odd_state = tmp_path / "odd_state"  # a state.json with a field this version does not know
    odd_state.mkdir()
    (odd_state / "state.json").write_text(json.dumps({"phase": "questioner", "micro_step": 3}))
    (odd_state / "config.json").write_text(json.dumps({"model": "tiny", "images": str(tmp_path / "images")}))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "state.json").write_text("{}")
    finished = fake_run(tmp_path / "finished", iteration=3)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    weightless = tmp_path / "weightless"  # a tokenizer and an image processor, but no weights
    load_processors("tiny").save_pretrained(weightless)
    users = tmp_path / "users"  # a folder of the user's own files
    users.mkdir()
    (users / "thesis.tex").write_text("mine")
    out = tmp_path / "out"
    images = ["--images", str(tmp_path / "images"), "--model", "tiny"]
    cases = [(["--images", str(tmp_path / "nope"), "--model", "tiny"], "does not exist"),
             (["--resume", str(tmp_path)], "no state.json"),
             (["--resume", str(old_run)], "does not know: micro_batch_size"),
             (["--resume", str(odd_state)], "does not know: micro_step"),
             (["--resume", str(no_config)], "has no config.json"),
             (["--resume", str(finished), "--lr", "1e-6"], "drop --lr"),  # 1e-6 is the default lr
             (["--resume", str(finished), "--iterations", "1"], "already begun 2 iterations"),
             (images + ["--tau-low", "0.8", "--tau-high", "0.3"], "--tau-low 0.8 is above --tau-high 0.3"),
             (images + ["--output", str(a_file)], "is a file"),
             (images + ["--output", str(users)], "other files in it"),
             (images + ["--output", str(tmp_path / "images" / "run")], "is inside --images"),  # its files: images
             (images + ["--device", "gpu"], "unknown device"),
             (images[:2] + ["--model", str(tmp_path / "no_model")], "does not exist"),
             (images + ["--seed", "-1"], "must be 0 or more"),
             (images + ["--lr", "-1e-5"], "must be more than 0"),
             (images + ["--min-pixels", "262144"], "--min-pixels 262144 is above --max-pixels 12544"),  # tiny's own
             (images[:2] + ["--model", str(weightless)], "could not load")]  # found once the run has begun
    if not torch.cuda.is_available():
        cases.append((images + ["--device", "cuda"], "no CUDA GPU"))
    for args, needle in cases:
        try:
            code = selfplay.main(args if "--resume" in args or "--output" in args else args + ["--output", str(out)])
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2 and needle in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists(), "a failed command leaves no run folder to block the corrected one"
    assert a_file.read_text() == "mine" and os.listdir(users) == ["thesis.tex"]
    assert selfplay.main(["--resume", str(finished)]) == 0
    assert "has finished its 2 iterations" in capsys.readouterr().out
    assert selfplay.main(["--resume", str(finished), "--print-config", "--threads", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["resume"] == str(finished) and printed["threads"] == 1 and printed["iterations"] == 2


@pytest.mark.slow
def test_ctrl_c_with_lora_then_resume_equals_an_uninterrupted_run(format_model, tmp_path):
    images, _ = image_folder(tmp_path / "images")
    flags = ["--lora-rank", "4", "--lr", "1e-3", "--iterations", "1"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    reference = run_selfplay(small_run_flags(images, format_model, whole) + flags)
    victim = run_selfplay(small_run_flags(images, format_model, stopped) + flags)
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if (stopped / "metrics.jsonl").exists() and (stopped / "metrics.jsonl").read_text().strip():
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGINT)
    log, _ = victim.communicate(timeout=120)
    assert victim.returncode == 130 and "--resume" in log, log
    state = json.loads((stopped / "state.json").read_text())
    assert state["iteration"] == 1 and (stopped / state["checkpoint"] / "lora.pt").exists()
    assert not (stopped / state["checkpoint"] / "model.safetensors").exists(), "LoRA checkpoints hold adapters only"
    resumed = run_selfplay(["--resume", str(stopped), "--quiet"])
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert reference.wait(timeout=300) == 0

    assert comparable(stopped / "metrics.jsonl") == comparable(whole / "metrics.jsonl")
    for role in ("questioner", "reasoner"):
        a = load_file(whole / "iter_1" / role / "model.safetensors")
        b = load_file(stopped / "iter_1" / role / "model.safetensors")
        assert all(torch.equal(a[n], b[n]) for n in a), role
        assert not any("lora" in n for n in a), "saved roles are merged, plain checkpoints"
    base = load_file(Path(format_model) / "model.safetensors")
    merged = load_file(whole / "iter_1" / "reasoner" / "model.safetensors")
    assert a.keys() == base.keys()
    changed = [n for n in base if not torch.equal(base[n], merged[n])]
    assert changed and all(n.startswith("model.layers.") for n in changed), "LoRA changes the text layers only"
    check_lora_roles_of_iteration_2(whole)


def check_lora_roles_of_iteration_2(folder):
    """The models iteration 2's Questioner phase would hold, built from a finished LoRA iteration 1:
    Q_2 = the base + Q_1's saved updates + a fresh adapter, its KL reference Q_1 = itself with the
    adapter off, and the frozen R_1 over the very same weights. Each equals the plain checkpoint
    iteration 1 saved for that role."""
    cfg = selfplay.Config(**json.loads((folder / "config.json").read_text()))
    start, judge = str(folder / "iter_1" / "questioner"), str(folder / "iter_1" / "reasoner")
    trainee = policies.Trainee(cfg, start, torch.device("cpu"))
    policy, (tok, ip) = trainee.model, trainee.processors
    reference, frozen_reasoner = policies.frozen_models(cfg, policy, start, judge)
    assert reference is policy
    assert {id(p) for p in frozen_reasoner.parameters()} == {id(p) for p in policy.parameters()}, "no second copy"
    for role in ("questioner", "reasoner"):  # one phase trained each: rank r
        updates = load_file(folder / "iter_1" / role / policies.LORA_UPDATES)
        assert {A.shape[0] for name, A in updates.items() if name.endswith("past_A")} == {cfg.lora_rank}
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (56, 56, 3), dtype=np.uint8))
              for i in range(2)]
    prompts = encode_prompts(tok, ip, images, [QUESTIONER_PROMPTS["paper"]] * 2)
    ids, mask = completions(tok, ["<question>How many?</question>", "<think>one</think> \\boxed{1}"])
    with torch.no_grad(), lora.adapters(policy, False):
        at_start = completion_logprobs(policy, prompts, ids, mask)
    with torch.no_grad():
        answering = completion_logprobs(frozen_reasoner, prompts, ids, mask)
        for got, role in ((at_start, "questioner"), (answering, "reasoner")):
            plain = load_vlm(str(folder / "iter_1" / role))[0]
            assert (got - completion_logprobs(plain, prompts, ids, mask)).abs().max() < 1e-4, role
    assert (at_start - answering).abs().max() > 1e-3, "the two roles are different models"
    # --kl-reference base: from iteration 2 on, the base model, over the policy's weights as well
    base_reference, _ = policies.frozen_models(dataclasses.replace(cfg, kl_reference="base"), policy, start)
    assert base_reference is not policy
    assert {id(p) for p in base_reference.parameters()} == {id(p) for p in policy.parameters()}
    with torch.no_grad():
        base_logp = completion_logprobs(load_vlm(cfg.model)[0], prompts, ids, mask)
        assert (completion_logprobs(base_reference, prompts, ids, mask) - base_logp).abs().max() < 1e-4
    assert (base_logp - at_start).abs().max() > 1e-3, "Q_1 moved away from the base"
    updates = folder / "iter_1" / "reasoner" / policies.LORA_UPDATES
    updates.rename(updates.with_suffix(".moved"))  # a role folder without its updates: a one-line error
    with pytest.raises(DataError, match="has no lora_updates.safetensors"):
        policies.frozen_models(cfg, policy, start, judge)


@pytest.mark.slow
def test_the_first_run_trains_a_reasoner_on_a_folder_of_photos(tmp_path, monkeypatch):
    """README's first run (presets/first_run.toml, the shipped shapes base) on photos it was never
    made for, one iteration: its questions parse, curation keeps at least one Reasoner batch, and
    the Reasoner trains every step."""
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (h, w) in enumerate([(240, 320), (480, 360), (300, 300), (200, 640), (512, 384), (360, 480)]):
        ramp = np.linspace(0, 255, w)[None, :, None] * rng.random(3)
        pixels = np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"photo_{i}.{'png' if i % 2 else 'jpg'}")
    monkeypatch.chdir(REPO)  # the preset names its model relative to the repo, as README runs it
    assert selfplay.main(["presets/first_run.toml", "--images", str(photos), "--output", str(tmp_path / "run"),
                          "--iterations", "1", "--quiet"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    curation = next(r for r in rows if r["phase"] == "curation")
    assert all(r["valid_rate"] > 0 for r in rows if r["phase"] == "questioner")
    assert curation["n_valid"] > 0 and curation["n_kept"] >= cfg["questions_per_step"], curation
    assert [r["step"] for r in rows if r["phase"] == "reasoner"] == list(range(1, cfg["reasoner_steps"] + 1))
