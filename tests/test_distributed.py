"""Several processes (distributed.py, CPU and gloo): shares that line up with GRPO's mini-batches,
and two processes that give what one gives, for the GRPO update and for a whole selfplay.py run,
killed and resumed included; the same with the trained role sharded over them (--fsdp, fsdp.py)."""

import dataclasses
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import PROMPTS, random_images
from safetensors.torch import load_file
from test_selfplay import REPO, comparable, format_model, image_folder, small_run_flags  # noqa: F401 (a fixture)

from machinery import distributed as dist
from machinery import fsdp
import grpo
from machinery import policies
import selfplay
from machinery.keys import prompt_keys
from sampler import sample


def test_shares_cover_the_batch_and_line_up_with_the_minibatches():
    """Each process's shares are whole prompts, the shares of W processes are the batch, and its
    rows of each mini-batch are those of the whole batch's mini-batch that it holds."""
    for W in (1, 2, 3, 4):
        for n in range(1, 8):
            for G in (1, 3):
                shares = [dist.Share(list(range(100, 100 + n)), process=r, processes=W) for r in range(W)]
                assert sorted(x for s in shares for x in s.mine) == list(range(100, 100 + n))
                for M in range(1, n * G + 1):
                    whole = torch.arange(n * G).tensor_split(M)
                    pieces = [[] for _ in range(M)]
                    for s in shares:
                        rows = s.rows(G)
                        assert rows.tolist() == [p * G + j for p in s.prompts for j in range(G)]
                        for j, local in enumerate(grpo.split_minibatches(rows, n * G, M)):
                            pieces[j] += rows[local].tolist()
                    assert [sorted(p) for p in pieces] == [w.tolist() for w in whole], (W, n, G, M)
    share = dist.Share(["a", "b", "c", "d", "e"], process=1, processes=2)
    assert share.mine == ["b", "d"] and share.take(list(range(10)), per=2) == [2, 3, 6, 7]
    assert torch.equal(share.keys(7, "site", per=2).values, prompt_keys(7, "site", n=10).values[[2, 3, 6, 7]])


# -----------------------------------------------------------------------------
# The GRPO update: 2 processes against 1

G = 4
CASES = {  # Trainee settings: two mini-batches and more; unequal micro-batch counts (a row each); LoRA
    "token-mean": dict(aggregation="token-mean", minibatches=2, micro_batch_tokens=1, max_grad_norm=1e9),
    "seq-mean, groups across mini-batches, clipped": dict(minibatches=5, micro_batch_tokens=200, max_grad_norm=0.05),
    "lora, batch-scaled advantages": dict(lora_rank=4, minibatches=2, micro_batch_tokens=1, max_grad_norm=1e9,
                                          advantage_scale="batch"),
}
# --fsdp (a no-op in one process). A row per micro-batch: of a mini-batch's 6 rows one process holds
# 4, the other 2, so the second adds passes, as it does for the old log-probs (two mini-batches). A
# frozen vision tower is sharded too, with no gradients to reduce.
FSDP_CASES = {
    "fsdp, token-mean, clipped": dict(fsdp=True, aggregation="token-mean", minibatches=2, micro_batch_tokens=1,
                                      max_grad_norm=0.05),
    "fsdp, seq-mean, frozen vision tower": dict(fsdp=True, minibatches=2, micro_batch_tokens=1, max_grad_norm=1e9,
                                                freeze_vision=True),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grpo_steps(rank, world, port, out, cases):
    """Each case's GRPO step (SGD, lr 1) on this process's share of one rollout batch, sampled here
    with the batch's keys; saves the parameter change, the metrics and the samples to out/rank.pt."""
    torch.set_num_threads(1)
    if world > 1:
        # a process left waiting in a collective (a pass another did not make) fails, rather than hangs
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=60))
    results = {}
    for name, settings in cases.items():
        cfg = policies.resolve_pixel_bounds(selfplay.Config(model="tiny", kl_coef=0.1, gradient_checkpointing=False,
                                                            **settings))
        trainee = policies.Trainee(cfg, "tiny", torch.device("cpu"))
        trainee.optimizer = torch.optim.SGD([p for p in trainee.model.parameters() if p.requires_grad], lr=1.0)
        reference, _ = policies.frozen_models(cfg, trainee.model, "tiny")
        if reference is not trainee.model:  # a reference away from the policy: the KL term has a gradient
            with torch.no_grad():
                for i, p in enumerate(reference.parameters()):
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        share = dist.Share(list(range(len(PROMPTS))))
        prompts = trainee.processors.encode([random_images(0)[i] for i in share.mine], [PROMPTS[i] for i in share.mine])
        out_samples = sample(trainee.sampler.model, prompts, n=G, max_new_tokens=12, keys=share.keys(0, "test"))
        rewards = share.take(torch.tensor([float(i % 3 == 0) + 0.1 * i for i in range(len(PROMPTS) * G)]), per=G)
        # Completions cut to lengths 8 to 12, as if they had stopped there, so that the aggregations differ.
        cut = torch.arange(out_samples.ids.shape[1]) < 12 - share.rows(G)[:, None] % 5
        rollouts = grpo.Rollouts(prompts.repeat(G), out_samples.ids, out_samples.mask * cut, rewards, group_size=G,
                                 max_new_tokens=12)
        # sharded, the whole weights are those of the sampler's copy, which the step refreshes
        before = [p.detach().clone() for p in trainee.sampler.model.parameters()]
        metrics = trainee.grpo_step(rollouts, reference, SimpleNamespace(share=share))  # a Batch's share
        delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainee.sampler.model.parameters(), before)])
        results[name] = dict(delta=delta, metrics=metrics, rows=share.rows(G), ids=out_samples.ids,
                             mask=out_samples.mask, sharded=fsdp.sharded(trainee.model))
    torch.save(results, Path(out) / f"{rank}.pt")
    if world > 1:
        tdist.destroy_process_group()


def one_and_two_processes(tmp_path, cases):
    """grpo_steps' results of the cases in one process and in each of two."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    threads = torch.get_num_threads()
    grpo_steps(0, 1, None, tmp_path / "one", cases)
    torch.set_num_threads(threads)
    mp.spawn(grpo_steps, args=(2, free_port(), str(tmp_path / "two"), cases), nprocs=2)
    one = torch.load(tmp_path / "one" / "0.pt", weights_only=True)
    return one, [torch.load(tmp_path / "two" / f"{r}.pt", weights_only=True) for r in (0, 1)]


def relative_distance(x, reference):
    """|x - reference| / |reference|, in float64 (x, reference: [N])."""
    return ((x.double() - reference.double()).norm() / reference.double().norm()).item()


def assert_same_steps(one, two, cases):
    for name in cases:
        expected, (a, b) = one[name], (two[0][name], two[1][name])
        assert a["sharded"] == b["sharded"] == cases[name].get("fsdp", False) and not expected["sharded"], name
        assert torch.equal(a["delta"], b["delta"]), "the copies stay equal"
        assert expected["delta"].abs().max() > 1e-3, name
        # Two processes sum the same terms in another order, so the step differs from one process's by
        # float32 rounding, which depends on the CPU's kernels and thread count: measured up to ~2e-5
        # of the step's norm (the LoRA case's second SGD step at lr 1 starts from weights the first moved
        # by up to 0.7). A reduction bug (a sum for a mean, a share dropped or counted twice) moves the
        # step by 50% or more. 1e-3 of its norm lies far from both.
        assert relative_distance(a["delta"], expected["delta"]) < 1e-3, name
        assert a["metrics"].keys() == expected["metrics"].keys() and a["metrics"] == b["metrics"]
        for key, value in expected["metrics"].items():
            # The same bound; abs: ppo_kl and pg_loss, near 0, are differences of log-probs near 5
            assert a["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-5), (name, key)
        assert a["metrics"]["n_steps"] == expected["metrics"]["n_steps"] == cases[name]["minibatches"]
        for part in (a, b):  # each process sampled its prompts as one process did
            T = part["ids"].shape[1]
            assert torch.equal(part["mask"], expected["mask"][part["rows"], :T])
            assert not expected["mask"][part["rows"], T:].any()
            assert torch.equal(part["ids"] * part["mask"], expected["ids"][part["rows"], :T] * part["mask"])
        if "clipped" in name:
            assert expected["metrics"]["grad_norm"] > cases[name]["max_grad_norm"], name


def test_two_processes_give_the_one_process_grpo_step(tmp_path):
    assert_same_steps(*one_and_two_processes(tmp_path, CASES), CASES)


def test_fsdp_gives_the_one_process_grpo_step(tmp_path):
    """Sharded over two processes, the step (weights, gradient norm, metrics) is one process's."""
    assert_same_steps(*one_and_two_processes(tmp_path, FSDP_CASES), FSDP_CASES)


# -----------------------------------------------------------------------------
# Whole runs: torchrun with 2 processes against python with 1

def run_flags(images, model, output):
    """The tiny run of test_selfplay, with the batch-wide settings that need gathers."""
    return small_run_flags(images, model, output) + ["--diversity-scope", "batch", "--advantage-scale", "batch"]


def launch(args, processes):
    """selfplay.py, by torchrun with `processes` processes or by python alone, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())] if processes > 1
               else [sys.executable]) + [str(REPO / "selfplay.py"), *args]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def kill_all(torchrun):
    """SIGKILL to torchrun's workers (it starts each in a session of its own: a kill of torchrun
    alone leaves them running) and to torchrun."""
    workers = [int(pid) for task in Path(f"/proc/{torchrun.pid}/task").iterdir()
               for pid in (task / "children").read_text().split()]
    assert len(workers) == 2
    for pid in [*workers, torchrun.pid]:
        os.kill(pid, signal.SIGKILL)


def finish(proc):
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    return log


def kill_after_the_first_reasoner_step(torchrun, folder):
    """SIGKILL to every process once the run has saved its first Reasoner step and before the
    second: resumed, the run starts from that checkpoint (weights and AdamW's state)."""
    def state():
        return json.loads((folder / "state.json").read_text()) if (folder / "state.json").exists() else {}
    deadline = time.time() + 300
    while time.time() < deadline and torchrun.poll() is None:
        if state().get("phase") == "reasoner" and state()["step"] >= 1:
            break
        time.sleep(0.05)
    assert torchrun.poll() is None, "the run ended before it could be killed"
    kill_all(torchrun)
    torchrun.communicate()
    assert (state()["phase"], state()["step"]) == ("reasoner", 1), state()


def roles(folder):
    return {(k, role): load_file(folder / f"iter_{k}" / role / "model.safetensors")
            for k in (1, 2) for role in ("questioner", "reasoner")}


def assert_same_run(a, b, start=None):
    """Two run folders with the same questions, answers and logs; weights and metrics equal bit for
    bit, or, given the weights both runs `start`ed from (a model folder), equal up to float rounding.

    Rounding, there, is a bound on what each role's weights moved: runs that reduce in another order
    differ in the last bits of every sum, and AdamW turns a near-zero gradient's rounding into a step
    of up to lr either way, so weights are compared by the whole change, not element by element. The
    change of one run differs from the other's by at most 1% of its norm (measured: ~0.005%); a wrong
    reduction, a sum for a mean, is off by ~100%. Metrics derive from those weights: 1e-3 relative."""
    exact = start is None
    for k in (1, 2):
        for name in ("questions.jsonl", "questioner_episodes.jsonl", "reasoner_episodes.jsonl"):
            assert (a / f"iter_{k}" / name).read_text() == (b / f"iter_{k}" / name).read_text(), (k, name)
    metrics_a, metrics_b = comparable(a / "metrics.jsonl"), comparable(b / "metrics.jsonl")
    assert [m.keys() for m in metrics_a] == [m.keys() for m in metrics_b]
    for x, y in zip(metrics_a, metrics_b):
        for key, value in x.items():
            close = isinstance(value, float) and not exact
            assert value == (pytest.approx(y[key], rel=1e-3, abs=1e-5) if close else y[key]), (x, key)
    roles_b = roles(b)
    initial = None if exact else load_file(Path(start) / "model.safetensors")
    for key, weights in roles(a).items():
        other = roles_b[key]
        assert weights.keys() == other.keys(), key
        if exact:
            assert all(torch.equal(weights[n], other[n]) for n in weights), key
            continue
        moved_a = torch.cat([(weights[n] - initial[n]).flatten() for n in weights])
        moved_b = torch.cat([(other[n] - initial[n]).flatten() for n in weights])
        assert moved_b.abs().max() > 0, (key, "the role must have trained for the comparison to mean much")
        assert relative_distance(moved_a, moved_b) < 0.01, key


@pytest.fixture(scope="module")
def two_process_run(format_model, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    root = tmp_path_factory.mktemp("two_process_run")
    images, _ = image_folder(root / "images")
    start = time.perf_counter()
    finish(launch(run_flags(images, format_model, root / "run"), 2))
    return images, root / "run", time.perf_counter() - start


@pytest.mark.slow
def test_two_processes_run_what_one_runs(two_process_run, format_model, tmp_path):  # noqa: F811
    images, two, seconds_two = two_process_run
    start = time.perf_counter()
    finish(launch(run_flags(images, format_model, tmp_path / "one"), 1))
    print(f"\ntiny run: 1 process {time.perf_counter() - start:.1f} s, 2 processes {seconds_two:.1f} s")
    metrics = comparable(two / "metrics.jsonl")
    assert any(m["phase"] == "reasoner" for m in metrics), "the Reasoner must train for the test to mean much"
    assert not list((two / "resume").glob("*")) and json.loads((two / "state.json").read_text())["iteration"] == 3
    assert_same_run(tmp_path / "one", two, start=format_model)


@pytest.mark.slow
def test_two_processes_killed_resume_to_the_same_end(two_process_run, format_model, tmp_path):  # noqa: F811
    """SIGKILL to every process in the Reasoner phase; resumed with 2 processes the run ends as the
    uninterrupted one, bit for bit; resumed with 1, the same up to float rounding."""
    images, whole, _ = two_process_run
    broken = tmp_path / "broken"
    kill_after_the_first_reasoner_step(launch(run_flags(images, format_model, broken), 2), broken)
    shutil.copytree(broken, tmp_path / "broken_one")
    finish(launch(["--resume", str(broken), "--quiet"], 2))
    assert_same_run(whole, broken)
    finish(launch(["--resume", str(tmp_path / "broken_one"), "--quiet"], 1))
    assert_same_run(whole, tmp_path / "broken_one", start=format_model)


# -----------------------------------------------------------------------------
# --fsdp runs: torchrun with 2 processes, the trained role sharded, against python with 1

def unclipped_flags(images, model, output):
    """run_flags without the norm clip: these runs check the sharded step, and the clip, whose norm is a
    sum over the shards, is checked at the GRPO step (test_fsdp_gives_the_one_process_grpo_step)."""
    return run_flags(images, model, output) + ["--max-grad-norm", "1e9"]


@pytest.fixture(scope="module")
def unclipped_runs(format_model, tmp_path_factory):  # noqa: F811
    """The unclipped tiny run by one process, and by two with --fsdp."""
    root = tmp_path_factory.mktemp("unclipped_runs")
    images, _ = image_folder(root / "images")
    finish(launch(unclipped_flags(images, format_model, root / "one"), 1))
    start = time.perf_counter()
    finish(launch(unclipped_flags(images, format_model, root / "fsdp") + ["--fsdp"], 2))
    return images, root / "one", root / "fsdp", time.perf_counter() - start


@pytest.mark.slow
def test_fsdp_runs_what_one_process_runs(unclipped_runs, format_model):  # noqa: F811
    """The same questions, answers and logs; weights and metrics equal up to float rounding."""
    _, one, sharded, seconds = unclipped_runs
    print(f"\ntiny run: 2 processes with --fsdp {seconds:.1f} s")
    assert json.loads((sharded / "config.json").read_text())["fsdp"] and not list((sharded / "resume").glob("*"))
    assert json.loads((sharded / "state.json").read_text())["iteration"] == 3
    assert_same_run(one, sharded, start=format_model)


@pytest.mark.slow
def test_fsdp_killed_resumes_to_the_same_end(unclipped_runs, format_model, tmp_path):  # noqa: F811
    """An --fsdp run killed in the Reasoner phase resumes from its checkpoint (whole tensors, as
    without --fsdp): with 2 processes, sharded again, to the uninterrupted run's end bit for bit; with
    1 and --no-fsdp, to the one-process run's end."""
    images, one, whole, _ = unclipped_runs
    broken = tmp_path / "broken"
    kill_after_the_first_reasoner_step(launch(unclipped_flags(images, format_model, broken) + ["--fsdp"], 2), broken)
    shutil.copytree(broken, tmp_path / "broken_one")
    finish(launch(["--resume", str(broken), "--quiet"], 2))
    assert_same_run(whole, broken)
    finish(launch(["--resume", str(tmp_path / "broken_one"), "--quiet", "--no-fsdp"], 1))
    assert_same_run(one, tmp_path / "broken_one", start=format_model)


def test_fsdp_with_lora_is_refused(tmp_path, capsys):
    """--fsdp shards a fully fine-tuned role: with --lora-rank, given or in a resumed run's config,
    the command stops with one line and writes nothing."""
    lora_run = tmp_path / "lora_run"  # as far as --resume reads before it starts
    lora_run.mkdir()
    config = dataclasses.asdict(selfplay.Config(images=str(tmp_path), model="tiny", lora_rank=4))
    (lora_run / "config.json").write_text(json.dumps(config))
    (lora_run / "state.json").write_text("{}")
    new = ["--images", str(tmp_path), "--model", "tiny", "--output", str(tmp_path / "out"), "--fsdp"]
    for args in (new + ["--lora-rank", "4"], ["--resume", str(lora_run), "--fsdp"]):
        assert selfplay.main(args) == 2
        err = capsys.readouterr().err
        assert "--fsdp" in err and "--lora-rank" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and sorted(os.listdir(lora_run)) == ["config.json", "state.json"]
    assert json.loads((lora_run / "config.json").read_text()) == config


def test_more_processes_than_prompts_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(selfplay.DataError, match="3 processes need --images-per-step"):
        dist.init(torch.device("cpu"), smallest_batch=2)
    assert not dist.active()
