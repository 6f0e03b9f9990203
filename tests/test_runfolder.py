"""A run folder that defends itself: one writer at a time, every damaged file caught before it is
used (one line naming it, nothing trained on it), and a failed write (a full disk) said in one line
with the folder left resumable. Runs of the tiny model, in this process, seconds each."""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import selfplay
from data import write_shapes_folder
from machinery import integrity, runfolder

REPO = Path(__file__).resolve().parents[1]


def flags(images, output):
    return ["--images", str(images), "--model", "tiny", "--output", str(output), "--iterations", "2",
            "--questioner-steps", "2", "--reasoner-steps", "2", "--group-size", "2", "--images-per-step", "2",
            "--question-max-tokens", "8", "--answer-max-tokens", "8", "--reward-votes", "2", "--curation-images", "2",
            "--candidates-per-image", "2", "--curation-votes", "2", "--questions-per-step", "2",
            "--min-pixels", "3136", "--max-pixels", "12544", "--quiet", "--threads", "1"]


@pytest.fixture(autouse=True)
def quiet_signals_and_threads(monkeypatch):
    monkeypatch.setattr(selfplay, "stop_after_step_on_ctrl_c", lambda: None)  # pytest keeps its own Ctrl-C
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # (--threads 1 sets it for the process)


def held(folder):
    """Whether some process holds folder/lock now (an flock on it, which this test process asks for)."""
    path = Path(folder) / integrity.LOCK
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def stop_at(monkeypatch, n):
    """The run stops (as after Ctrl-C) at the n-th point where it asks: after each training step
    and each phase."""
    calls = []

    def check_stop():
        calls.append(1)
        if len(calls) == n:
            raise runfolder.Stop
    monkeypatch.setattr(runfolder, "check_stop", check_stop)


def comparable(run):
    """A run's logs without the times, and its last roles' weights."""
    rows = [{k: v for k, v in json.loads(line).items() if k not in ("step_time", "tokens_per_s", "peak_mem_gb")}
            for line in open(run / "metrics.jsonl")]
    return rows, {role: load_file(run / "iter_2" / role / "model.safetensors") for role in ("questioner", "reasoner")}


def same_run(a, b):
    (rows_a, weights_a), (rows_b, weights_b) = comparable(a), comparable(b)
    assert rows_a == rows_b
    for role in weights_a:
        assert all(torch.equal(weights_a[role][n], weights_b[role][n]) for n in weights_a[role]), role


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An uninterrupted run, and two stopped ones: in the Questioner's first step (a checkpoint
    in training), and after curation (questions.jsonl written)."""
    root = tmp_path_factory.mktemp("runs")
    write_shapes_folder(root / "images", 4, seed=0, size=56)
    patch = pytest.MonkeyPatch()
    patch.setattr(selfplay, "stop_after_step_on_ctrl_c", lambda: None)
    threads = torch.get_num_threads()
    try:
        assert selfplay.main(flags(root / "images", root / "whole")) == 0
        for name, n in (("in_training", 1), ("after_curation", 4)):
            stop_at(patch, n)
            assert selfplay.main(flags(root / "images", root / name)) == 130
            patch.undo()
            patch.setattr(selfplay, "stop_after_step_on_ctrl_c", lambda: None)
    finally:
        patch.undo()
        torch.set_num_threads(threads)
    state = json.loads((root / "in_training" / "state.json").read_text())
    assert state["checkpoint"] == "resume/questioner_1_1" and not held(root / "in_training")
    assert json.loads((root / "after_curation" / "state.json").read_text())["phase"] == "reasoner"
    return root


def copy(folders, name, tmp_path):
    shutil.copytree(folders / name, tmp_path / name)
    return tmp_path / name


def test_a_stopped_run_resumes_to_the_uninterrupted_end(folders, tmp_path):
    for name in ("in_training", "after_curation"):
        run = copy(folders, name, tmp_path)
        assert selfplay.main(["--resume", str(run)]) == 0
        same_run(folders / "whole", run)


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def edit_json(path, **changes):
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


CKPT = "resume/questioner_1_1"
DAMAGE = {  # name: (the stopped run, what is done to it, the file the error names, what it says)
    "empty state": ("in_training", lambda r: (r / "state.json").write_text(""), "state.json", "not JSON"),
    "garbage state": ("in_training", lambda r: (r / "state.json").write_text("{{"), "state.json", "not JSON"),
    "a list for a state": ("in_training", lambda r: (r / "state.json").write_text("[]"), "state.json", "not an object"),
    "a wrong type in state": ("in_training", lambda r: edit_json(r / "state.json", lines="x"), "state.json",
                              "lines is 'x'"),
    "a step past the phase's end": ("in_training", lambda r: edit_json(r / "state.json", step=9), "state.json",
                                    "no such point"),
    "a digest that is not one": ("in_training", lambda r: edit_json(r / "state.json", digests={"a": 1}), "state.json",
                                 "not [size, SHA-256] pairs"),
    "a log that is not one": ("in_training", lambda r: edit_json(r / "state.json", lines={"../notes.txt": 1}),
                              "state.json", "not its logs"),
    "a checkpoint never written": ("in_training", lambda r: edit_json(r / "state.json",
                                                                      checkpoint="resume/questioner_1_2"),
                                   "resume/questioner_1_2", "records no digest"),
    "a checkpoint outside the run's": ("in_training", lambda r: edit_json(r / "state.json", checkpoint="../x"),
                                       "state.json", "none of the run's"),
    "empty config": ("in_training", lambda r: (r / "config.json").write_text(""), "config.json", "not JSON"),
    "an edited top-p": ("in_training", lambda r: edit_json(r / "config.json", top_p=0), "config.json",
                        "argument --top-p: must be in (0, 1]"),
    "a word for a number": ("in_training", lambda r: edit_json(r / "config.json", group_size="eight"), "config.json",
                            "invalid int value: 'eight'"),
    "an infinite lr": ("in_training", lambda r: edit_json(r / "config.json", lr=float("inf")), "config.json",
                       "must be more than 0, and finite"),
    "a byte not UTF-8 in a log": ("in_training", lambda r: (r / "metrics.jsonl").write_bytes(b"{\"a\": \"\xff\"}\n"),
                                  "metrics.jsonl", "line 1 is not JSON"),
    "a log cut short": ("in_training", lambda r: (r / "metrics.jsonl").write_text(""), "metrics.jsonl",
                        "0 lines where state.json counts 1"),
    "a log deleted": ("in_training", lambda r: (r / "metrics.jsonl").unlink(), "metrics.jsonl", "missing"),
    "the optimizer deleted": ("in_training", lambda r: (r / CKPT / "optimizer.pt").unlink(), "optimizer.pt",
                              "missing"),
    "a checkpoint without its config": ("in_training", lambda r: (r / CKPT / "config.json").unlink(),
                                        f"{CKPT}/config.json", "missing"),
    "truncated weights": ("in_training", lambda r: (r / CKPT / "model.safetensors").write_bytes(
        (r / CKPT / "model.safetensors").read_bytes()[:1000]), "model.safetensors", "differs"),
    "one flipped byte in the weights": ("in_training", lambda r: flip_last_byte(r / CKPT / "model.safetensors"),
                                        "model.safetensors", "differs"),
    "curation's questions cut short": ("after_curation", lambda r: (r / "iter_1/questions.jsonl").write_text(
        "".join((r / "iter_1/questions.jsonl").read_text().splitlines(keepends=True)[:-1])), "questions.jsonl",
        "differs"),
    "curation's questions deleted": ("after_curation", lambda r: (r / "iter_1/questions.jsonl").unlink(),
                                     "questions.jsonl", "missing"),
    "one flipped byte in a role": ("after_curation",
                                   lambda r: flip_last_byte(r / "iter_1/questioner/model.safetensors"),
                                   "iter_1/questioner/model.safetensors", "differs"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_file_is_caught_before_anything_trains_on_it(folders, tmp_path, capsys, case):
    name, damage, file, says = DAMAGE[case]
    run = copy(folders, name, tmp_path)
    damage(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "lock"}
    capsys.readouterr()
    try:
        code = selfplay.main(["--resume", str(run)])
    except SystemExit as stop:  # a config value out of range: the command line's own check
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert file in err and says in err, err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "lock"}
    assert after == before, "nothing ran, nothing was tidied"
    assert not held(run), "the lock was given back"


def test_a_second_process_is_refused_while_the_first_runs_and_the_first_finishes_as_alone(folders, tmp_path, capsys):
    run = copy(folders, "in_training", tmp_path)
    first = subprocess.Popen([sys.executable, str(REPO / "selfplay.py"), "--resume", str(run)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and \
            (integrity._holder(run / "lock") or {}).get("pid") != first.pid:
        time.sleep(0.05)
    assert held(run) and integrity._holder(run / "lock")["host"] == socket.gethostname()
    capsys.readouterr()
    assert selfplay.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"in use by process {first.pid} on {socket.gethostname()}" in err and len(err.splitlines()) == 1, err
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert not held(run), "the lock goes with the process"
    same_run(folders / "whole", run)


@pytest.mark.parametrize("named", ["a process that is gone", "this very process (a restarted container's PID)"])
def test_a_lock_file_no_process_holds_is_taken_whatever_it_names(folders, tmp_path, named):
    run = copy(folders, "in_training", tmp_path)
    if named == "a process that is gone":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()  # its PID names no process now
        pid = gone.pid
    else:
        pid = os.getpid()
    (run / "lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "earlier"}))
    assert selfplay.main(["--resume", str(run)]) == 0
    same_run(folders / "whole", run)


def test_a_lock_another_process_holds_is_refused_naming_it(folders, tmp_path, capsys):
    """Held by a process whatever its file says (here another host): refused, never taken."""
    run = copy(folders, "in_training", tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, sys, time\n"
        f"f = open({str(run / 'lock')!r}, 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.truncate(0); f.write(json.dumps({'pid': 4242, 'host': 'elsewhere', 'since': 'earlier'})); f.flush()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert selfplay.main(["--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert "in use by process 4242 on elsewhere (since earlier)" in err and len(err.splitlines()) == 1, err
        assert integrity._holder(run / "lock")["host"] == "elsewhere", "never taken from its holder"
    finally:
        holder.kill()
        holder.wait()


def test_of_two_new_runs_on_one_output_one_is_refused_and_leaves_nothing(tmp_path):
    """The other run's folder appears while this one writes its own (they started at once)."""
    folder = tmp_path / "runs" / "same"

    def write(tmp):
        integrity.take_lock(tmp)
        (tmp / "state.json").write_text("{}")
        folder.mkdir(parents=True)
        (folder / "state.json").write_text('{"theirs": true}')  # the other process renames first
    with pytest.raises(runfolder.DataError, match="already holds a run"):
        runfolder.create_folder(folder, write)
    assert sorted(os.listdir(tmp_path / "runs")) == ["same"]
    assert (folder / "state.json").read_text() == '{"theirs": true}'


def test_a_folder_from_before_the_digests_is_refused_in_one_line(folders, tmp_path, capsys):
    run = copy(folders, "in_training", tmp_path)
    state = json.loads((run / "state.json").read_text())
    del state["digests"]
    (run / "state.json").write_text(json.dumps(state))
    assert selfplay.main(["--resume", str(run)]) == 2
    assert "from before 2026-12-07" in capsys.readouterr().err


def full_disk_at(monkeypatch, target, n, partial=None, error=None):
    """The n-th call of `target` (a module, a name) fails as a full disk does (`error`: an OSError,
    or what the library raises), after writing `partial` (a half line) to its file, as a write cut
    short leaves it."""
    module, name = target
    real, calls = getattr(module, name), []

    def failing(path, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            if partial is not None:
                with open(path, "a") as f:
                    f.write(partial)
            raise error or OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)
    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize("where", ["a checkpoint's optimizer state", "torch.save's own full-disk error",
                                   "a log line, half written"])
def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(folders, tmp_path, monkeypatch, capsys,
                                                                        where):
    run = tmp_path / "run"
    if where == "a checkpoint's optimizer state":
        full_disk_at(monkeypatch, (torch, "save"), 2)
        named, says = "resume/questioner_1_2", "No space left on device"
    elif where == "torch.save's own full-disk error":  # what torch.save raised on a full tmpfs
        full_disk_at(monkeypatch, (torch, "save"), 2, error=RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 1600 vs 1536"))
        named, says = "resume/questioner_1_2", "unexpected pos"
    else:
        full_disk_at(monkeypatch, (runfolder, "append_jsonl"), 3, partial='{"phase": "quest')
        named, says = "metrics.jsonl", "No space left on device"
    capsys.readouterr()
    assert selfplay.main(flags(folders / "images", run)) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert named in err and says in err and "MiB free" in err and f"--resume {run}" in err
    monkeypatch.undo()
    monkeypatch.setattr(selfplay, "stop_after_step_on_ctrl_c", lambda: None)
    assert selfplay.main(["--resume", str(run)]) == 0
    same_run(folders / "whole", run)


def test_digests_name_what_changed(tmp_path):
    (tmp_path / "role").mkdir()
    (tmp_path / "role" / "a.bin").write_bytes(b"weights")
    recorded = integrity.digests(tmp_path, tmp_path / "role")
    assert recorded == {"role/a.bin": [7, hashlib.sha256(b"weights").hexdigest()]}
    integrity.check_digests(tmp_path, recorded, "role")  # as written: passes
    (tmp_path / "role" / "a.bin").write_bytes(b"weightz")
    with pytest.raises(integrity.DataError, match="role/a.bin' is damaged"):
        integrity.check_digests(tmp_path, recorded, "role")


def test_an_image_name_with_a_newline_is_one_entry_of_the_runs_list(tmp_path, monkeypatch):
    write_shapes_folder(tmp_path / "images", 4, seed=0, size=56)
    (tmp_path / "images" / "shapes_00001.png").rename(tmp_path / "images" / "odd\nname.png")
    stop_at(monkeypatch, 1)
    assert selfplay.main(flags(tmp_path / "images", tmp_path / "run")) == 130
    listed = [json.loads(line) for line in (tmp_path / "run" / "images.jsonl").read_text().splitlines()]
    assert len(listed) == 4 and "odd\nname.png" in listed
    monkeypatch.setattr(runfolder, "check_stop", lambda: None)
    assert selfplay.main(["--resume", str(tmp_path / "run")]) == 0  # the same list: it resumes
