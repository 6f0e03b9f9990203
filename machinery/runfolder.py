"""The run folder of selfplay.py: where a run keeps everything, and how it survives being killed.

    runs/<name>/config.json      every setting, as run
    runs/<name>/state.json       where the run is: iteration, phase, finished steps, RNG states
    runs/<name>/metrics.jsonl    one line per training step, curation and iteration summary
    runs/<name>/iter_<k>/        questions.jsonl, {questioner,reasoner}_episodes.jsonl, the two roles
    runs/<name>/resume/          the role in training after its last finished step

Every file is written atomically (a temp file or folder, then a rename) and state.json last, so a
run killed at any moment resumes from its last finished step: appended logs are cut back to the
lines state.json counted, half-written temp files and the checkpoint state.json no longer points to
are removed, and the image sampler's generator continues from its saved state (every sampler call
draws from streams keyed by the seed, the phase and the step: machinery/keys.py), so the resumed
run ends bitwise equal to an uninterrupted one (on CPU), on another device too. Ctrl-C stops after
the step in progress (a second one stops at once, losing that step).

With several processes (distributed.py) every process keeps the run's state in memory, the same
everywhere, and rank 0 alone writes the folder; the others wait for it at the end of each phase,
before they read what it wrote (curation's questions, the roles), and when a run starts or resumes.

Nothing here knows the method: selfplay.py goes through `Run.iterations`, runs each phase with
`Run.phase` (which skips a phase a resumed run has finished and hands back what it left: a role's
folder, or curation's kept questions), takes each step's prompts from `Run.batches` and calls
`Run.end_step` after it; the rest is bookkeeping.
"""

import contextlib
import dataclasses
import errno
import fnmatch
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from data import SCENES_FILE, DataError, load_image, load_scenes, write_atomic
from machinery import distributed as dist
from machinery import integrity
from machinery.batch import Batch
from machinery.cli import checked, progress
from tools.report import write_report

PHASES = ("questioner", "curation", "reasoner", "summary")  # one iteration, in order
LOGS = ("metrics.jsonl", "iter_*/questioner_episodes.jsonl", "iter_*/reasoner_episodes.jsonl")
IMAGE_LIST = "images.jsonl"  # the run's readable images, one JSON string a line, relative to --images


class WriteFailed(Exception):
    """A write into the run folder failed (the disk full, say): what was being written, and why. The
    folder is left as its last finished step left it, so the run resumes once the cause is gone."""

    def __init__(self, path, err):
        super().__init__(path, err)
        self.path, self.err = Path(path), err


def write_failure(err, run):
    """What a WriteFailed means for the run, in one line."""
    where = next(p for p in (err.path, *err.path.parents) if p.exists())
    free = shutil.disk_usage(where).free / 2**20
    then = (f"the run folder is as its last finished step left it: once it can be written again (room on the "
            f"disk, permission), continue with python selfplay.py --resume {run.dir}" if run
            else "nothing was started: run the command again once it can be written")
    return f"could not write '{err.path}': {err.err.strerror or err.err} ({free:,.0f} MiB free there); {then}"


@contextlib.contextmanager
def writing(path):
    """Any OSError inside becomes a WriteFailed naming `path`."""
    try:
        yield
    except OSError as err:
        raise WriteFailed(path, err) from None


# -----------------------------------------------------------------------------
# Atomic files

def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path, records):
    """Appends one line per record and forces them to disk (state.json, written next, counts them)."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def save_folder_atomic(folder, write):
    """Calls write(tmp_folder), then renames it to `folder` (replacing an older one)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# -----------------------------------------------------------------------------
# Ctrl-C: finish the step in progress, then stop

class Stop(Exception):
    """Ctrl-C was pressed: the state on disk is complete; stop here."""


STOP_REQUESTED = []


def check_stop():
    # Asked of every process at the same points: all stop after the same step, whichever saw Ctrl-C.
    if dist.any_process(bool(STOP_REQUESTED)):
        raise Stop


def _on_interrupt(signum, frame):
    if STOP_REQUESTED:  # second Ctrl-C: stop now, the last finished step is on disk
        raise KeyboardInterrupt
    STOP_REQUESTED.append(True)
    print("\nstopping after this step (Ctrl-C again to stop now)", file=sys.stderr)


def stop_after_step_on_ctrl_c():
    signal.signal(signal.SIGINT, _on_interrupt)


# -----------------------------------------------------------------------------
# The run: its state, its image sampler, its files

@dataclass
class State:
    iteration: int = 1         # the iteration in progress (cfg.iterations + 1: finished)
    phase: str = "questioner"  # the phase in progress, one of PHASES
    step: int = 0              # finished steps of the phase
    lines: dict = field(default_factory=dict)  # lines of each file of LOGS that belong to finished steps
    image_rng: dict = field(default_factory=dict)  # which images the next steps take
    checkpoint: str = ""       # the role in training (weights + optimizer), relative to the run folder
                               # so the folder can move; "" between phases
    digests: dict = field(default_factory=dict)  # [size, SHA-256] of each file of the checkpoints, the roles
                                                 # and questions.jsonl, as written (integrity.py)


class Run:
    """The run folder, its state, and the image sampler's generator that state.json captures."""

    def __init__(self, cfg, folder, state, device):
        self.cfg, self.dir, self.state, self.device = cfg, Path(folder), state, device
        self.writer = dist.rank() == 0  # with several processes, rank 0 alone writes the folder
        self.image_rng = np.random.default_rng(cfg.seed)
        if state.image_rng:
            self.image_rng.bit_generator.state = state.image_rng
        self.bar = None

    # --- the loop's view: iterations, phases and steps

    def iterations(self):
        """The iterations still to run, 1..cfg.iterations (a resumed run: from its own on)."""
        while self.state.iteration <= self.cfg.iterations:
            yield self.state.iteration  # (the summary phase moves the state on to the next)

    def roles(self):
        """(Q, R) as the current iteration starts: where each role's weights are (the base model in
        iteration 1, then the role's folder of the iteration before)."""
        return self.role_source(self.state.iteration, "questioner"), self.role_source(self.state.iteration, "reasoner")

    def phase(self, name, run_phase, *args):
        """Runs one phase of the current iteration, unless a resumed run has finished it; then the
        state moves on to the next phase (after a summary: the next iteration's Questioner).
        Returns what the phase left: the role's folder, curation's kept questions (or None)."""
        if PHASES.index(name) < PHASES.index(self.state.phase):
            return self.left_by(name)
        k, first_step = self.state.iteration, self.state.step
        reset_peak_memory(self.device)
        start = time.perf_counter()
        run_phase(*args)
        if name == "summary":
            self.save_state(iteration=k + 1, phase=PHASES[0], step=0)
        else:
            self.save_state(phase=PHASES[PHASES.index(name) + 1], step=0, checkpoint="")
        self.remove_old_checkpoints()
        if self.writer:
            # Wall time and peak memory of each phase as run (a resumed phase: from first_step on). Kept
            # apart from metrics.jsonl, which must be identical for a resumed and an uninterrupted run.
            with writing(self.dir / "phase_times.jsonl"):
                append_jsonl(self.dir / "phase_times.jsonl", [{
                    "iteration": k, "phase": name, "from_step": first_step, "seconds": time.perf_counter() - start,
                    "peak_mem_gb": peak_memory_gb(self.device)}])
            try:
                write_report(self.dir)
            except Exception as err:  # the report is a view of the run's files: never a reason to stop training
                print(f"warning: report.html not updated ({type(err).__name__}: {err}); "
                      f"`python tools/report.py {self.dir}` rebuilds it", file=sys.stderr)
        # A Ctrl-C during curation or a summary lands here, after its state is saved. (Asked of every
        # process, it is also where the others wait for rank 0's files of the phase.)
        check_stop()
        return self.left_by(name, k)

    def left_by(self, name, k=None):
        """What phase `name` of iteration k (default: the current one) left in the folder."""
        k = k or self.state.iteration
        if name == "curation":
            return [r for r in self.questions(k) if r["kept"]]
        return str(self.role_dir(k, name)) if name in ("questioner", "reasoner") else None

    def close(self):
        """Gives the folder's lock back (integrity.take_lock)."""
        if self.writer:
            integrity.release_lock(self.dir)

    def progress(self, items, what, done=0):
        """items with a progress bar (self.bar, for the phase's postfix)."""
        self.bar = progress(items, desc=f"iter {self.state.iteration} {what}",
                            disable=self.cfg.quiet or not self.writer, initial=done, total=done + len(items))
        return self.bar

    def batches(self, role, n_steps, pool, size, images, index=None):
        """The prompts of each step of a training phase still to run (all but those a resumed run has
        finished): `size` items of `pool` drawn by the run's image RNG, as a machinery.batch.Batch
        (this process's share; images: the run's Images; index: see Batch)."""
        for step in self.progress(range(self.state.step + 1, n_steps + 1), role, done=self.state.step):
            self.step_start, self.current = time.perf_counter(), (role, step)
            chosen = [pool[i] for i in self.choose(len(pool), size)]
            yield Batch(chosen, images, self.cfg.seed, (self.state.iteration, step), index)

    def pool(self, images, size):
        """Curation's pool: `size` images drawn by the run's image RNG, as a Batch to go through in chunks."""
        return Batch(self.choose(len(images), size), images, self.cfg.seed, (self.state.iteration,))

    def checkpoint(self):
        """The role in training after its last finished step (a folder), or None at a phase's start."""
        return self.dir / self.state.checkpoint if self.state.checkpoint else None

    def end_step(self, metrics, episodes, write_checkpoint):
        """After the step `batches` gave last: its metrics and episodes appended, the role in training
        saved (write_checkpoint(folder)), then state.json, which makes the step count as done."""
        (role, step), seconds = self.current, time.perf_counter() - self.step_start
        record = {"phase": role, "iteration": self.state.iteration, "step": step, **metrics, "step_time": seconds,
                  "tokens_per_s": metrics["completion_tokens"] / seconds, "peak_mem_gb": peak_memory_gb(self.device)}
        self.log(record)
        self.log_episodes(role, [dict(e, step=step) for e in episodes])
        folder = self.dir / "resume" / f"{role}_{self.state.iteration}_{step}"
        self.save_folder(folder, write_checkpoint)
        self.save_state(step=step, checkpoint=str(folder.relative_to(self.dir)))
        self.remove_old_checkpoints()
        self.bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
        check_stop()

    def choose(self, n_items, n):
        """n distinct indices (all of them when n >= n_items), from the run's image RNG."""
        return self.image_rng.permutation(n_items)[:n].tolist()

    def role_dir(self, k, role):
        return self.dir / f"iter_{k}" / role

    def role_source(self, k, role):
        """Where role starts iteration k: the base model, or its checkpoint of iteration k - 1."""
        return self.cfg.model if k == 1 else str(self.role_dir(k - 1, role))

    def save_role(self, role, write):
        """The role as it ends this iteration's phase: write(folder) into iter_k/role, atomically."""
        self.save_folder(self.role_dir(self.state.iteration, role), write)

    def save_folder(self, folder, write):
        """write(folder) into `folder`, atomically, in rank 0, its files' digests recorded for the next
        save_state; write(None) in the other processes, which writes nothing but lets a role sharded
        over them (--fsdp) be gathered from all."""
        if not self.writer:
            return write(None)
        with writing(folder):
            try:
                save_folder_atomic(folder, write)
            except (RuntimeError, SafetensorError) as err:  # torch.save's and safetensors' full disk
                raise OSError(errno.EIO, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            self.record_digests(folder)

    def record_digests(self, target):
        """The digests of the file or folder `target` in place of any it had."""
        name = str(Path(target).relative_to(self.dir))
        self.state.digests = {k: v for k, v in self.state.digests.items() if k != name and not k.startswith(name + "/")}
        self.state.digests.update(integrity.digests(self.dir, target))

    # --- files

    def append(self, path, records):
        """Appends to one of LOGS, counting its lines for the next save_state."""
        if self.writer:
            with writing(path):
                path.parent.mkdir(exist_ok=True)
                append_jsonl(path, records)
        name = str(path.relative_to(self.dir))
        self.state.lines[name] = self.state.lines.get(name, 0) + len(records)

    def log(self, record):
        self.append(self.dir / "metrics.jsonl", [record])

    def metrics(self):
        return integrity.read_jsonl(self.dir / "metrics.jsonl")

    def save_questions(self, records):
        """Curation's candidates, all at once (curation has no steps to resume from)."""
        if self.writer:
            path = self.iteration_dir() / "questions.jsonl"
            with writing(path):
                self.iteration_dir().mkdir(exist_ok=True)
                write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
                self.record_digests(path)

    def questions(self, k=None):
        return integrity.read_jsonl(self.dir / f"iter_{k or self.state.iteration}" / "questions.jsonl")

    def log_episodes(self, role, rows):
        self.append(self.iteration_dir() / f"{role}_episodes.jsonl", rows)

    def iteration_dir(self):
        return self.dir / f"iter_{self.state.iteration}"

    def save_state(self, **changes):
        for k, v in changes.items():
            setattr(self.state, k, v)
        self.state.image_rng = self.image_rng.bit_generator.state
        if self.writer:
            with writing(self.dir / "state.json"):
                write_json(self.dir / "state.json", dataclasses.asdict(self.state))

    def logs(self):
        return sorted(path for pattern in LOGS for path in self.dir.glob(pattern))

    def tidy(self):
        """Undoes what a kill left behind: appended lines of a step that never finished, the
        checkpoint state.json no longer points to (killed between writing its successor and
        deleting it), and half-written temp files."""
        for path in self.logs():  # (their counted lines were checked: checked_state)
            counted = self.state.lines.get(str(path.relative_to(self.dir)), 0)
            lines = path.read_bytes().splitlines(keepends=True)
            if len(lines) != counted:
                write_atomic(path, b"".join(lines[:counted]).decode("utf-8"))
        times = self.dir / "phase_times.jsonl"  # not counted (no two runs time alike): cut a half line
        text = times.read_bytes() if times.exists() else b""
        if text and not text.endswith(b"\n"):
            write_atomic(times, text[:text.rfind(b"\n") + 1].decode("utf-8", "replace"))
        self.remove_old_checkpoints()
        for path in [*self.dir.glob("*.tmp"), *self.dir.glob("iter_*/*.tmp")]:  # "*" matches dot files too
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def remove_old_checkpoints(self):
        if not self.writer:
            return
        current = self.dir / self.state.checkpoint if self.state.checkpoint else None
        for path in (self.dir / "resume").glob("*"):
            if path != current:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.state.digests = {k: v for k, v in self.state.digests.items()
                              if not k.startswith("resume/") or (current and k.startswith(self.state.checkpoint + "/"))}


# -----------------------------------------------------------------------------
# Starting and resuming

def resolve_config(config_class, cfg, given):
    """The config to run: the command line's, or for --resume the run's saved one (`saved_config`).
    --fsdp, given or saved, is refused with --lora-rank: it shards a fully fine-tuned role."""
    cfg = saved_config(config_class, cfg, given) if cfg.resume else cfg
    if cfg.fsdp and cfg.lora_rank > 0:
        raise DataError("--fsdp shards the role of full fine-tuning; with --lora-rank only small adapters train "
                        "and every process holds the frozen base anyway: drop --fsdp")
    return cfg


def saved_config(config_class, cfg, given):
    """The config of the run cfg.resume, where only --quiet, --device, --threads, --fsdp and
    --print-config may be given, and --iterations to run a finished run on for more iterations. (A
    thread count other than the run's own can change the last bits of its results.)"""
    may_change = {"quiet", "device", "threads", "fsdp", "print_config", "iterations"}
    refused = sorted(given - may_change - {"resume"})
    if refused:
        flags = ", ".join("--" + name.replace("_", "-") for name in refused)
        raise DataError(f"--resume continues with the run's own settings (its config.json): drop {flags} "
                        "(only --quiet, --device, --threads, --fsdp, --print-config and --iterations may be "
                        "given)")
    folder = Path(cfg.resume)
    for name in ("state.json", "config.json"):
        if not (folder / name).is_file():
            raise DataError(f"cannot resume: '{folder}' has no {name} (not a run folder, or it never started)")
    saved = integrity.read_json(folder / "config.json")
    unknown = sorted(saved.keys() - {f.name for f in dataclasses.fields(config_class)})
    if unknown:  # a run started by another version of selfplay.py
        raise DataError(f"cannot resume: '{folder}/config.json' has settings this selfplay.py does not know: "
                        f"{', '.join(unknown)}")
    given_now = {name: getattr(cfg, name) for name in given & may_change}
    # through the command line's checks: an edited value out of range stops here, not deep in a run
    return dataclasses.replace(checked(config_class, saved, folder / "config.json"), resume=str(folder), **given_now)


def check_output(folder, images):
    """A new run goes into a new or empty folder, never among the user's files or over another run,
    nor among its own images (its files would become images of the next run on that folder)."""
    if folder.resolve().is_relative_to(Path(images).resolve()):
        raise DataError(f"--output '{folder}' is inside --images '{images}': pass a folder outside it")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--output '{folder}' is a file: pass a folder for the run")
    if (folder / "state.json").exists():
        raise DataError(f"'{folder}' already holds a run: pass --resume {folder} to continue it, or another --output")
    if folder.is_dir() and any(folder.iterdir()):
        raise DataError(f"--output '{folder}' is a folder with other files in it: pass a new or empty folder")


def new_run(cfg, device, paths):
    """The run folder with config.json, images.txt and the first state.json, made whole in a temp
    folder and renamed into place: a kill leaves either no run or one that resumes."""
    folder = Path(cfg.output or dist.from_rank0(f"runs/{time.strftime('%Y%m%d-%H%M%S')}"))
    check_output(folder, cfg.images)  # in every process, before rank 0 writes: all stop, or none
    cfg = dataclasses.replace(cfg, output=str(folder))

    def write(tmp):
        integrity.take_lock(tmp)  # the folder appears with its lock, this process's
        write_json(tmp / "config.json", dataclasses.asdict(cfg))
        run = Run(cfg, tmp, State(), device)
        check_images(run, paths)
        run.save_state()
    with writing(folder):
        dist.on_rank0(lambda: create_folder(folder, write))
    return cfg, Run(cfg, folder, State(**json.loads((folder / "state.json").read_text())), device)


def create_folder(folder, write):
    """write(tmp) into a temp folder of this process's own, then renamed to `folder`: rename(2) takes
    the place of no folder or an empty one, and fails on a non-empty one, so of two runs started on
    one --output at once, one gets the folder and the other is refused."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.tmp."))
    try:
        write(tmp)
        os.rename(tmp, folder)
    except BaseException as err:
        integrity.release_lock(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise DataError(f"'{folder}' already holds a run (started at the same moment): pass --resume {folder} "
                            "to continue it, or another --output") from None
        raise


def resumed_run(cfg, device, paths):
    """The run folder of --resume with its state, tidied; more --iterations than it was started
    with are written to its config.json (fewer than it has begun are refused)."""
    folder = Path(cfg.resume)
    lock(folder)  # before anything is read: a second process never sees a folder half-written
    try:
        return resume_in(folder, cfg, device, paths)
    except BaseException:
        if dist.rank() == 0:
            integrity.release_lock(folder)
        raise


def resume_in(folder, cfg, device, paths):
    """resumed_run, once the lock is taken."""
    saved = integrity.read_json(folder / "state.json")
    unknown = sorted(saved.keys() - {f.name for f in dataclasses.fields(State)})
    if unknown:
        raise DataError(f"cannot resume: '{folder}/state.json' has fields this selfplay.py does not know: "
                        f"{', '.join(unknown)}")
    state = checked_state(folder, saved, cfg)
    begun = state.iteration - (state.phase == PHASES[0] and state.step == 0)  # iterations with anything done
    if cfg.iterations < begun:
        raise DataError(f"--iterations {cfg.iterations}: the run has already begun {begun} iterations; pass "
                        f"{begun} or more")
    run = Run(cfg, folder, state, device)
    check_images(run, paths)

    def tidy():
        run.tidy()
        write_json(folder / "config.json", dataclasses.asdict(dataclasses.replace(cfg, resume="", print_config=False)))
    with writing(folder):
        dist.on_rank0(tidy)
    return cfg, run


def lock(folder):
    """The run folder's lock (integrity.take_lock), taken by rank 0 for all of torchrun's processes;
    a refusal stops every process."""
    refusal = None
    if dist.rank() == 0:
        try:
            integrity.take_lock(folder)
        except DataError as err:
            refusal = str(err)
    refusal = dist.from_rank0(refusal)
    if refusal:
        raise DataError(refusal)


def checked_state(folder, saved, cfg):
    """state.json's fields, each of its type and in its range, and every file the resume will read
    as it was written (integrity.check_digests): the checkpoint in training, the roles it starts
    from, curation's questions. A DataError names the first that is not."""
    path = folder / "state.json"
    if "digests" not in saved or (folder / "images.txt").exists():
        raise DataError(f"cannot resume: '{folder}' was written by a selfplay.py from before 2026-12-07, whose "
                        "run folders resume no more: start a new run")
    kinds = {f.name: f.type for f in dataclasses.fields(State)}
    for name, value in saved.items():
        if not isinstance(value, kinds[name]) or (kinds[name] is int and isinstance(value, bool)):
            raise integrity.damaged(path, f"{name} is {value!r}, not a{'n' if name[0] in 'aeiou' else ''} "
                                          f"{kinds[name].__name__}")
    state = State(**saved)
    steps = {"questioner": cfg.questioner_steps, "reasoner": cfg.reasoner_steps}.get(state.phase, 0)
    if state.phase not in PHASES or state.iteration < 1 or not 0 <= state.step <= steps:  # (the roles' files
        raise integrity.damaged(path, f"iteration {state.iteration}, phase {state.phase!r}, step {state.step}: no "
                                      f"such point in a run")  # below vouch for the iteration)
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in state.lines.values()):
        raise integrity.damaged(path, "its line counts are not whole numbers")
    if not all(any(fnmatch.fnmatch(name, pattern) and ".." not in name for pattern in LOGS) for name in state.lines):
        raise integrity.damaged(path, "it counts lines of files that are not its logs")
    if state.checkpoint and not fnmatch.fnmatch(state.checkpoint, "resume/*_*_*") or "/.." in state.checkpoint:
        raise integrity.damaged(path, f"its checkpoint {state.checkpoint!r} is none of the run's")
    if any(not (isinstance(d, list) and len(d) == 2 and isinstance(d[0], int) and isinstance(d[1], str))
           for d in state.digests.values()):
        raise integrity.damaged(path, "its digests are not [size, SHA-256] pairs")
    try:
        if state.image_rng:  # ({} before the first draw)
            np.random.default_rng().bit_generator.state = state.image_rng
    except (TypeError, ValueError, KeyError):
        raise integrity.damaged(path, "its image sampler's state is not one") from None
    k, done = state.iteration, PHASES.index(state.phase)  # the phases of iteration k finished before it
    read = [state.checkpoint] if state.checkpoint else []
    read += [f"iter_{k - 1}/questioner", f"iter_{k - 1}/reasoner"] if k > 1 else []
    read += [f"iter_{k}/questioner"] * (done > 0) + [f"iter_{k}/questions.jsonl"] * (done > 1)
    read += [f"iter_{k}/reasoner"] * (done > 2)
    for target in read:
        integrity.check_digests(folder, state.digests, target)
    for name, counted in state.lines.items():  # the logs' lines that count (the rest, tidy cuts)
        integrity.read_jsonl(folder / name, counted)
    return state


def discard_if_unstarted(run):
    """Removes a run folder that this command made and nothing ran in (a model whose weights do not
    load, say), so the corrected command is not refused for it."""
    if run.writer and dataclasses.astuple(run.state)[:4] == (1, PHASES[0], 0, {}):
        integrity.release_lock(run.dir)
        shutil.rmtree(run.dir, ignore_errors=True)


def check_images(run, paths):
    """The run refers to its images by position (questions.jsonl, the image sampler's draws), so a
    resumed run must find the same list: it is written when the run starts and compared after."""
    listed = "".join(json.dumps(os.path.relpath(p, run.cfg.images)) + "\n" for p in paths)  # a name may hold a newline
    path = run.dir / IMAGE_LIST
    if not path.exists():
        if run.writer:
            write_atomic(path, listed)
    elif path.read_text() != listed:
        before, now = set(path.read_text().splitlines()), set(listed.splitlines())
        raise DataError(f"cannot resume: the readable images under '{run.cfg.images}' are not those the run "
                        f"started with ({len(now - before)} new, {len(before - now)} gone; its list: {path}); "
                        f"restore them, or start a new run")


def record_skipped(run, skipped):
    if run.writer:
        with writing(run.dir / "skipped_images.txt"):
            write_atomic(run.dir / "skipped_images.txt", "".join(f"{p}\t{why}\n" for p, why in skipped))
    if skipped and not run.cfg.quiet:
        print(f"skipped {len(skipped)} unreadable image(s), listed in {run.dir / 'skipped_images.txt'}")


class Images:
    """The run's images by index, decoded when used (see data.readable_images), and by path the
    scenes of those that have one (a folder written by data.write_shapes_folder: every answer known)."""

    def __init__(self, folder, paths, max_pixels):
        self.paths, self.max_pixels = [str(p) for p in paths], max_pixels
        known = load_scenes(folder) if (Path(folder) / SCENES_FILE).is_file() else {}
        self.scenes = {path: known[Path(path).name] for path in self.paths
                       if Path(path).parent == Path(folder) and Path(path).name in known}

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.max_pixels)


# -----------------------------------------------------------------------------
# GPU memory

def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
