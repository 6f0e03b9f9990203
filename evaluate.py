"""Score Reasoner checkpoints on benchmarks, side by side, as the paper evaluates (METHOD.md, "Evaluation").

    python evaluate.py --model tiny --model tiny@1 --bench shapes --limit 100
    python evaluate.py --model Qwen/Qwen2.5-VL-3B-Instruct --model runs/NAME/iter_3/reasoner \
        --bench shapes,mmmu=data/mmmu,mathvision=data/mathvision --device cuda --dtype bfloat16

What happens, in order:
1. Every benchmark becomes a list of `Record`s, one common form: the built-in `shapes` questions,
   a JSONL file in our own format (see `our_record`), or a local export of one of the paper's
   benchmarks in its public Hugging Face schema (`--bench mmmu=FOLDER`). A bare name (`--bench
   mmmu`) loads from the hub when the optional `datasets` package is installed.
2. Each model answers every record once, greedily (temperature 0), with the Reasoner prompt,
   batched through our sampler. The models are loaded one at a time. With --samples M it also
   draws M answers per record at temperature 1 (the full distribution, as GRPO samples the policy)
   for pass@1 and maj@M. A batch is encoded once for both; on CPU it is also prefilled once, and
   its rows that have stopped are dropped from the decoding (machinery/cpu_decode.py): the answers are
   the reference decoder's, whatever the batch size (each question draws from its own random
   stream). Unless --no-blind, it then answers everything again with the images deranged among
   the benchmark's records (`derangement`): the blind baseline, what the questions alone earn,
   scored the same way (greedy only with --no-blind-samples).
3. The prediction is the last \\boxed{} of the response, else its first 100 characters (the
   paper's fallback), and `score` decides by rules per answer type.
4. Out come a markdown table on stdout (models as columns, benchmarks as rows, accuracy with its
   95% Wilson interval and the blind accuracy; with --samples, a pass@1 and a maj@M row per
   benchmark), results.json (with this run's config) and, per model and benchmark, a JSONL file of
   every prompt, response and verdict (samples/<model>/<bench>.jsonl; the blind run's in
   samples/<model>/blind/<bench>.jsonl).

Left out:
- The paper's LLM judge. Its numbers come from a judge that decides whether a prediction means the
  gold answer; ours come from fixed rules, so they are lower wherever a right answer is written
  differently (free text and expressions: MM-Vet above all). `score(..., judge=fn)` is the seam
  where a judge plugs in; none is implemented here.
- Questions with several images (a few in MMMU): one image per prompt in this codebase, so they
  are skipped and counted, like records without an image or without a gold answer.
"""

import ast
import base64
import binascii
import io
import json
import math
import random
import re
import sys
import time
import typing
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers
from PIL import Image
from tqdm import tqdm

from machinery.cli import AT_LEAST_1, NON_NEGATIVE, option, parse, progress
from data import DataError, decode_image, load_image, shapes_benchmark, write_atomic
from model import ModelError, encode_prompts, load_processors, load_vlm, resolve_device
from reasoner import reasoner_prompt
from rewards import answers_equivalent, as_number, extract_boxed, majority_vote, normalize_answer
from machinery.cpu_decode import Prefill, ShrinkingDecoder
from machinery.fast_decode import decoder_for
from machinery.keys import prompt_keys
from sampler import sample

# -----------------------------------------------------------------------------
# Config: one dataclass; the command-line flags are generated from its fields


@dataclass
class EvalConfig:
    model: list[str] = option(
        "a model to score; repeat for side-by-side columns. A hub id, a local folder, a run "
        "checkpoint (runs/NAME/iter_K/reasoner), or a built-in random model: 'tiny', 'random-3b'. "
        "'tiny@SEED' is the tiny model with the random weights of SEED")
    bench: str = option(
        "comma-separated benchmarks: 'shapes' (built in), a .jsonl file in our format, NAME=PATH "
        "(a local .jsonl/.parquet export of NAME, file or folder) or NAME alone (from the hub, "
        "needs the `datasets` package). NAME: " + ", ".join(["mmmu", "mathverse", "mathvision",
        "hallusionbench", "realworldqa", "visnumbench", "mmvet", "mmstar"]), default="shapes")
    limit: int | None = option("only the first N records of each benchmark", valid=AT_LEAST_1, default=None)
    output: str | None = option("results folder (default runs/eval/DATE-TIME)", default=None)
    batch_size: int = option(
        "questions answered together: a larger batch is faster on CPU, a smaller one holds less KV cache (on a "
        "GPU with --samples and long responses; on CPU 48 took a fifth less time than 16)", valid=AT_LEAST_1, default=16)
    max_new_tokens: int = option("longest response in tokens (the paper's: 2048)", valid=AT_LEAST_1, default=2048)
    device: str = option("auto (a GPU if there is one), cpu, cuda or cuda:N", default="auto")
    dtype: str = option("model dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    min_pixels: int | None = option("fewest pixels an image is resized to (default: the model's)", valid=AT_LEAST_1,
                                    default=None)
    max_pixels: int | None = option("most pixels an image is resized to (default: the model's)", valid=AT_LEAST_1,
                                    default=None)
    seed: int = option("random weights of the built-in models ('tiny@SEED' overrides it)", default=0)
    blind: bool = option(
        "also score the blind baseline: the same questions, each shown another record's image (a fixed "
        "derangement by --eval-seed), scored the same way, to tell a score from a question prior. "
        "Doubles the evaluation time (less with --no-blind-samples); --no-blind skips it", default=True)
    blind_samples: bool = option(
        "the blind run samples --samples answers too (pass@1 and maj@M of the questions alone); "
        "--no-blind-samples scores it greedy only, in a fraction of the time", default=True)
    samples: int = option(
        "M answers per question sampled at temperature 1 (top-p 1, top-k 0: the full distribution, as "
        "GRPO samples the policy), for pass@1 and maj@M beside the greedy accuracy; 0 = off. Each batch "
        "then also decodes batch-size x M rows", valid=NON_NEGATIVE, default=0)
    images_anywhere: bool = option("let a benchmark's image paths leave its folder (../x.png, /abs/x.png)",
                                   default=False)
    eval_seed: int = option("seed of the blind baseline's image derangement and of the --samples draws",
                            valid=NON_NEGATIVE, default=0)
    quiet: bool = option("no progress bar", default=False)


def parse_args(argv=None):
    """argv (list[str], None = sys.argv[1:]) -> EvalConfig."""
    return parse(EvalConfig, argv, "Score Reasoner checkpoints on benchmarks, side by side.")


# -----------------------------------------------------------------------------
# The common record form


LETTERS = "ABCDEFGHIJ"  # the option letters a question may use


@dataclass
class Record:
    """One benchmark question in the form every benchmark is turned into.

    image: where the picture is, opened only when the question is asked (`open_image`): a PIL
        image, a Path, bytes, or base64 text (a str); None when the row has none.
    question: the text shown to the model, with the choices ("A. red\\nB. blue" appended when the
        benchmark keeps them apart from the question).
    answer: the gold answer; a capital letter for multiple-choice questions.
    answer_type: "multiple-choice", "number", "yes-no" or "text".
    choices: option texts in letter order; [] when there are none, or when the question holds them
        in a form `inline_choices` does not read (then only the letter can be right).
    skip: why the question is not asked ("no image", "missing image file", "no answer",
        "several images", "unreadable image"), None when it is.
    """
    id: str
    image: object
    question: str
    answer: str
    answer_type: str
    choices: list[str]
    category: str
    skip: str | None = None


def option_letter(text):
    """"B", "b", "(b)", "B." -> "B"; anything else -> None."""
    m = re.fullmatch(rf"\(?([{LETTERS}])\)?\.?", text.strip(), re.IGNORECASE)
    return m.group(1).upper() if m else None


# Only labels the answer type for the reports; scoring itself reads numbers with rewards.py.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:/\d+)?\s*(?:\\?%|°)?")


def answer_type(answer, multiple_choice):
    if multiple_choice:
        return "multiple-choice"
    s = normalize_answer(answer)
    if s in ("yes", "no", "true", "false"):
        return "yes-no"
    return "number" if _NUMBER.fullmatch(s) else "text"


def _is_file(path):
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system: base64 text where a path belongs
        return False


def make_record(id, image, question, answer, category, choices=(), choices_in_question=False, skip=None):
    """A Record from a benchmark's fields.

    choices: option texts; unless choices_in_question (the question already shows them), they are
    appended to the question as "A. ...". A record is multiple-choice when it has choices (or
    shows them) and its gold is a letter; a gold written as the text of an option becomes that
    option's letter. skip, unless given: "no image", "missing image file", "no answer", or "answer
    not among the options" (given choices, a gold that is neither one of their letters nor the text
    of one). ValueError for a question that is not text, or choices that are not a list.
    """
    if not isinstance(question, str):
        raise ValueError(f"the question is {type(question).__name__}, not text")
    if not isinstance(choices, (list, tuple)):
        raise ValueError(f"the choices are {type(choices).__name__}, not a list of option texts")
    answer = "" if answer is None else str(answer).strip()
    choices = [str(c).strip() for c in choices]
    if choices and option_letter(answer) is None:
        answer = next((L for L, c in zip(LETTERS, choices) if answers_equivalent(answer, c)), answer)
    letter = option_letter(answer)
    multiple_choice = (bool(choices) or choices_in_question) and letter is not None
    if multiple_choice:
        answer = letter
    listed = bool(choices) and not choices_in_question  # options we show, so the gold must be one of them
    if listed:
        question = question.rstrip() + "\n" + "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, choices))
    off_options = listed and (letter is None or LETTERS.index(letter) >= len(choices))
    if skip is None:
        skip = ("no image" if image is None else
                "missing image file" if isinstance(image, Path) and not _is_file(image) else
                "no answer" if not normalize_answer(answer) else
                "answer not among the options" if off_options else None)
    return Record(str(id), image, question, answer, answer_type(answer, multiple_choice), choices,
                  str(category or "all"), skip)


# "A. x", "A: x", "A:x", "A) x", "(A) x", each at the start of a line or after a space, "," or "(".
_MARK = re.compile(rf"(?<![^\s,(])\(?([{LETTERS}])(?:\)|[.:])\s*")


def inline_choices(question):
    """Option texts written into a question, in letter order; [] if there are none.

    Reads the last run of marks A, B, C, ... (options follow the question, which may itself say
    "point A."): "Options: A: 2, B: 3" -> ["2", "3"]; "Choices:\\nA:30°\\nB:60°" -> ["30°", "60°"].
    An option ends where the next mark starts; the last one at the end of its line.
    """
    marks = list(_MARK.finditer(question))
    run = []
    for i, first in enumerate(marks):
        if first.group(1) == "A":
            chain = [first]
            for m in marks[i + 1:]:
                if ord(m.group(1)) == ord(chain[-1].group(1)) + 1:
                    chain.append(m)
            if len(chain) >= 2:
                run = chain
    texts = []
    for m, following in zip(run, run[1:] + [None]):
        end = following.start() if following else question.find("\n", m.end())
        texts.append(question[m.end():end if end >= 0 else len(question)].strip().rstrip(",;").strip())
    return texts


def image_source(value, folder):
    """Where a row's image is, in the forms exports hold it -> a PIL image, a Path, bytes or base64
    text (str); None when there is none. Hugging Face image columns arrive as PIL images (through
    `datasets`) or as {"bytes": ..., "path": ...} dicts, whose bytes are base64 text in JSONL (JSON
    has no binary); a plain string is a path, relative to the folder of the file that names it."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, str):
        return folder / value if value else None
    if value is not None and not isinstance(value, (bytes, Image.Image)):
        raise ValueError(f"the image is a {type(value).__name__}, not a path, bytes or a picture")
    return value


def open_image(record):
    """The record's image as RGB PIL, read as the training images are (data.load_image: the same
    size checks, transparency over white, high bit depth stretched); DataError naming the record
    when it cannot be read."""
    source = record.image
    if isinstance(source, Path):
        return load_image(source)
    name = f"record '{record.id}'"
    if isinstance(source, str):
        try:
            source = base64.b64decode(source, validate=True)
        except binascii.Error as err:
            raise DataError(f"{name}: its image is not base64 ({err})") from None
    return decode_image(source if isinstance(source, Image.Image) else io.BytesIO(source), name)


# -----------------------------------------------------------------------------
# Benchmarks: the built-in shapes, our JSONL format, and the paper's benchmarks

SHAPES_QUESTIONS, SHAPES_SEED = 500, 0


def shapes_records():
    """data.shapes_benchmark's 500 questions (seed 0): counting, colour, spatial, size, arithmetic."""
    return [make_record(q["id"], q["image"], q["question"], q["answer"], q["category"],
                        choices=q["choices"] or [], choices_in_question=bool(q["choices"]))
            for q in shapes_benchmark(SHAPES_QUESTIONS, seed=SHAPES_SEED)]


def our_record(row, folder, index):
    """Our JSONL format, one question per line; anyone can write it:
    {"image": "images/cat.png", "question": "What animal is this?", "answer": "B",
     "choices": ["a dog", "a cat"], "category": "animals", "id": "q7"}
    image: a path relative to the JSONL file. choices (optional): option texts, shown to the model
    as "A. a dog\\nB. a cat"; the answer is then a letter or the text of the right option.
    category and id are optional (id defaults to the row's index, counting from 0)."""
    return make_record(row.get("id", index), image_source(row.get("image"), folder), row["question"],
                       row.get("answer"), row.get("category"), choices=row.get("choices") or [])


def mmmu_record(row, folder, index):
    # MMMU: up to 7 images in image_1..image_7, options a stringified Python list, answer a letter;
    # ids look like "validation_Art_Theory_12".
    images = [image_source(row.get(f"image_{i}"), folder) for i in range(1, 8)]
    images = [im for im in images if im is not None]
    multiple_choice = row.get("question_type") == "multiple-choice"
    options = row.get("options") or "[]"
    choices = (options if isinstance(options, list) else ast.literal_eval(options)) if multiple_choice else []
    subject = "_".join(row["id"].split("_")[1:-1]) or row.get("subfield")
    return make_record(row["id"], images[0] if images else None, row["question"], row["answer"], subject,
                       choices=choices, skip="several images" if len(images) > 1 else None)


def mathverse_record(row, folder, index):
    # MathVerse testmini: choices inline ("Choices:\nA:..."); "Vision Only" rows hold the whole
    # question in the image and an empty question text.
    question = row.get("question") or "Answer the question shown in the image."
    multiple_choice = row.get("question_type") == "multi-choice"
    return make_record(row["sample_index"], image_source(row.get("image"), folder), question, row["answer"],
                       row.get("problem_version"), choices_in_question=multiple_choice,
                       choices=inline_choices(question) if multiple_choice else [])


def mathvision_record(row, folder, index):
    # MATH-Vision: options a list ([] for open questions), the picture in decoded_image; image
    # is its path inside the dataset repo ("images/1.jpg").
    image = image_source(row.get("decoded_image"), folder)
    if image is None:
        image = image_source(row.get("image"), folder)
    return make_record(row["id"], image, row["question"], row["answer"], row.get("subject"),
                       choices=row.get("options") or [])


def hallusionbench_record(row, folder, index):
    # HallusionBench (lmms-lab): gt_answer "1" / "0" for yes / no; the non_image split has no image.
    answer = {"1": "yes", "0": "no"}.get(str(row.get("gt_answer")).strip(), row.get("gt_answer"))
    id = "_".join(str(row.get(k)) for k in ("category", "subcategory", "set_id", "figure_id", "question_id"))
    return make_record(id, image_source(row.get("image"), folder), row["question"], answer,
                       row.get("subcategory"))


_ANSWER_DIRECTLY = re.compile(r"\s*Please answer directly with[^\n]*$")


def realworldqa_record(row, folder, index):
    # RealWorldQA: choices inline; the closing "Please answer directly with only the letter ..."
    # is dropped because the Reasoner prompt asks for reasoning first.
    question = _ANSWER_DIRECTLY.sub("", row["question"]).strip()
    choices = inline_choices(question)
    return make_record(index, image_source(row.get("image"), folder), question, row["answer"], "all",
                       choices=choices, choices_in_question=bool(choices))


def visnumbench_record(row, folder, index):
    # VisNumBench: option is a list, or a string "(a) (90, 100) degrees, (b) ..."; answer "(d)",
    # "d" or an option's text.
    option = row.get("option") or []
    if isinstance(option, str):  # split at the "(a)" marks, which the option texts never are
        option = [text.strip().rstrip(",;").strip()
                  for text in re.split(r"\(([a-j])\)\s*", option, flags=re.IGNORECASE)[2::2]]
    return make_record(row.get("id", index), image_source(row.get("image"), folder), row["question"],
                       row["answer"], row.get("Attributes") or row.get("task_class"), choices=option)


def mmvet_record(row, folder, index):
    # MM-Vet: free-form answers, scored by a GPT judge in its own protocol (some write alternatives
    # as "a<OR>b", which our rules read as one string); capability is a list.
    capability = row.get("capability") or []
    category = "+".join(capability) if isinstance(capability, list) else capability
    return make_record(row.get("question_id", index), image_source(row.get("image"), folder),
                       row["question"], row["answer"], category)


def mmstar_record(row, folder, index):
    # MMStar: "...\nOptions: A: x, B: y, C: z, D: w" in the question, answer a letter.
    question = row["question"]
    return make_record(row.get("index", index), image_source(row.get("image"), folder), question,
                       row["answer"], row.get("category"), choices=inline_choices(question),
                       choices_in_question=True)


def problem_record(row, folder, index):
    """The problem / answer / images schema of EasyR1-style re-exports (the VisPlay authors' own
    evaluation copies of these benchmarks use it), read for any benchmark name."""
    images = row.get("images") or []
    images = [image_source(im, folder) for im in (images if isinstance(images, list) else [images])]
    question = row["problem"].replace("<image>", "").strip()
    choices = inline_choices(question)
    return make_record(index, images[0] if images else None, question, row["answer"], "all",
                       choices=choices, choices_in_question=bool(choices),
                       skip="several images" if len(images) > 1 else None)


@dataclass
class Source:
    hub_id: str
    config: str | None
    split: str
    to_record: typing.Callable


BENCHMARKS = {  # the paper's benchmarks (MMStar: its validation set), as their public hub copies
    "mmmu": Source("lmms-lab/MMMU", None, "validation", mmmu_record),  # MMMU/MMMU, subjects merged
    "mathverse": Source("AI4Math/MathVerse", "testmini", "testmini", mathverse_record),
    "mathvision": Source("MathLLMs/MathVision", None, "test", mathvision_record),
    "hallusionbench": Source("lmms-lab/HallusionBench", None, "image", hallusionbench_record),
    "realworldqa": Source("lmms-lab/RealWorldQA", None, "test", realworldqa_record),
    "visnumbench": Source("GML-FMGroup/VisNumBench", None, "train", visnumbench_record),
    "mmvet": Source("lmms-lab/MMVet", None, "test", mmvet_record),
    "mmstar": Source("Lin-Chen/MMStar", None, "val", mmstar_record),
}


@dataclass
class Benchmark:
    name: str
    records: list[Record]

    def skipped(self):
        """{reason: count} of the records that were not asked."""
        return dict(Counter(r.skip for r in self.records if r.skip))


def load_benchmark(spec, limit=None, images_anywhere=False):
    """--bench entry -> Benchmark of its first `limit` records. DataError for unknown names,
    missing files, rows that are not of the named benchmark's schema, and (unless images_anywhere)
    image paths that leave the benchmark's folder."""
    name, equals, path = spec.strip().partition("=")
    if equals and not path:
        raise DataError(f"--bench '{spec}': no path after '='")
    if name == "shapes" and not path:
        records = shapes_records()
    elif name.endswith(".jsonl") and not path:
        records = read_rows(Path(name), our_record, images_anywhere)
        name = Path(name).stem
    elif name in BENCHMARKS:
        source = BENCHMARKS[name]
        records = read_rows(Path(path), source.to_record, images_anywhere) if path else read_hub(name, source)
    else:
        raise DataError(f"unknown benchmark '{spec}': use shapes, a .jsonl file, or NAME / NAME=PATH "
                        f"with NAME one of {', '.join(BENCHMARKS)}")
    if not records:  # else it would score 0/0 and exit as if all went well
        raise DataError(f"--bench '{spec}': no questions in it (no rows); check the file, or drop it from --bench")
    return Benchmark(name, records[:limit])


def read_rows(path, to_record, images_anywhere=False):
    """Records of a local export: a .jsonl or .parquet file, or a folder holding the split's
    .jsonl files (read in name order) or .parquet files. Parquet needs the optional `datasets`."""
    if not path.exists():
        raise DataError(f"'{path}' does not exist")
    files = [path] if path.is_file() else sorted(path.glob("*.jsonl")) or sorted(path.glob("*.parquet"))
    if not files:
        raise DataError(f"no .jsonl or .parquet files in '{path}'")
    if files[0].suffix == ".parquet":
        try:
            import datasets
        except ImportError:
            raise DataError(f"'{path}' is parquet, which needs the optional `datasets` package; "
                            "or export the split as JSONL (see README)") from None
        rows = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        return to_records(((row, files[0].parent, f"'{path}' row {i}")
                           for i, row in enumerate(rows)), to_record, images_anywhere)
    return to_records(jsonl_rows(files), to_record, images_anywhere)


def jsonl_rows(files):
    for file in files:
        with open(file, "rb") as f:  # bytes, decoded line by line, so an encoding error names its line
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"'{file}' line {n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                    f"{err.start + 1}); save the file as UTF-8") from None
                if line.strip():
                    try:
                        yield json.loads(line), file.parent, f"'{file}' line {n}"
                    except json.JSONDecodeError as err:
                        raise DataError(f"'{file}' line {n}: not JSON ({err.msg})") from None


def to_records(rows, to_record, images_anywhere=False):
    """(row, folder, where) triples -> Records; a row of the wrong schema is a DataError at `where`,
    as is an image path that leaves the row's folder (../, an absolute path), unless images_anywhere:
    a benchmark file from elsewhere does not get to read any file it names."""
    records = []
    for index, (row, folder, where) in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}: a {type(row).__name__}, not a record (a JSON object)")
        try:
            record = (problem_record if "problem" in row else to_record)(row, folder, index)
        except KeyError as err:
            raise DataError(f"{where}: no field {err}; is this the right benchmark's export?") from None
        except (ValueError, SyntaxError) as err:  # e.g. a malformed stringified option list
            raise DataError(f"{where}: {err}") from None
        if (isinstance(record.image, Path) and not images_anywhere
                and not record.image.resolve().is_relative_to(Path(folder).resolve())):
            raise DataError(f"{where}: its image '{record.image}' is outside the benchmark's folder '{folder}'; "
                            "pass --images-anywhere to allow it")
        records.append(record)
    return records


def read_hub(name, source):
    config = f" (config '{source.config}')" if source.config else ""
    what = f"{source.hub_id}{config}, split '{source.split}'"
    try:
        import datasets
    except ImportError:
        raise DataError(f"benchmark '{name}' is not here: download {what} as JSONL or parquet and pass "
                        f"--bench {name}=PATH (see README), or install the optional `datasets` package "
                        "to load it from the hub") from None
    # Offline, gated, renamed: the hub fails in many ways, and each means "download it yourself".
    try:
        rows = datasets.load_dataset(source.hub_id, source.config, split=source.split)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load {what} from the hub ({reason}); download it and pass "
                        f"--bench {name}=PATH") from None
    return to_records(((row, Path("."), f"{source.hub_id} row {i}") for i, row in enumerate(rows)),
                      source.to_record)


# -----------------------------------------------------------------------------
# Scoring

FALLBACK_CHARS = 100  # the paper's: without a \boxed{}, the prediction is the response's first 100 characters
NUMBER_REL_TOL = 1e-2  # decimals and fractions: 1.732 counts for 1.73, 1/2 for 0.5; 1.75 does not
SCORING = ("rule-based: last \\boxed{} (else the first 100 characters); multiple choice by letter or "
           "the exact text of an option; numbers within 1% relative (whole numbers exactly); yes/no; "
           "normalised text. The paper uses an LLM judge instead.")


def extract_prediction(response):
    """The last \\boxed{} of a response, else its first 100 characters (the paper's fallback)."""
    boxed = extract_boxed(response)
    return boxed if boxed is not None else response[:FALLBACK_CHARS]


def chosen_letter(prediction, choices):
    """The option a prediction picks: its letter ("B", "(b)", "B. red") or the text of exactly that
    option ("red"); None when it picks none."""
    for letter in LETTERS:
        if answers_equivalent(prediction, letter):
            return letter
    for letter, text in zip(LETTERS, choices):
        if answers_equivalent(prediction, text):
            return letter
    return None


def score(record, prediction, judge=None):
    """Is `prediction` (the extracted answer, str) right for `record`? -> bool.

    Rules, built on rewards.answers_equivalent:
    - multiple-choice: the option the prediction picks (letter, or the text of one option) is the
      gold letter; another option's letter or text, or no option, is wrong.
    - number: equal within a relative tolerance of 1e-2 when the gold has decimals or is a
      fraction; a whole-number gold (a count, "50%", "30°") must be matched exactly: 146 is not 145.
    - yes-no ("true" = "yes") and text: equal after normalize_answer.
    An empty prediction is never right. judge(record, prediction) -> bool, when given, replaces
    the rules: the seam for an LLM judge like the paper's.
    """
    if judge is not None:
        return bool(judge(record, prediction))
    if record.answer_type == "multiple-choice":
        return chosen_letter(prediction, record.choices) == record.answer
    gold = as_number(record.answer)
    if gold is not None and gold.is_integer():  # a count, "50%" or "30°" too: exactly
        return answers_equivalent(prediction, record.answer)
    return answers_equivalent(prediction, record.answer, rel_tol=NUMBER_REL_TOL)


def wilson_interval(correct, total, z=1.959964):
    """95% Wilson score interval of correct / total -> (low, high) in [0, 1]; None when total is 0.
    Unlike p ± z·sqrt(p(1-p)/n) it is never zero-width at 0/n or n/n, where a random model sits.
    E.g. 117/500 -> (0.199, 0.273); 0/10 -> (0.0, 0.278)."""
    if total == 0:
        return None
    p, n = correct / total, total
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# -----------------------------------------------------------------------------
# Running the models

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRESETS = ("tiny", "random-3b")


def model_source(spec, default_seed):
    """--model entry -> (name for load_vlm, seed): 'tiny@3' -> ('tiny', 3); 'tiny' -> ('tiny',
    default_seed). Only the built-in presets take @SEED; anything else is passed on whole."""
    name, at, seed = spec.partition("@")
    if name in PRESETS and at:
        if not seed.isdigit():
            raise ModelError(f"'{spec}': the seed after @ must be a whole number, as in tiny@1")
        return name, int(seed)
    return spec, default_seed


def same_image(a, b):
    """Do two image sources (Record.image) hold the same picture? Paths, bytes and base64 text by
    value, PIL images by their pixels; sources of different forms are taken to differ."""
    if a is b:
        return True
    if isinstance(a, Image.Image) and isinstance(b, Image.Image):
        return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()
    return type(a) is type(b) and not isinstance(a, Image.Image) and a == b


def derangement(images, seed):
    """Which image each question is shown in the blind run: images (the records' image sources, in
    order) -> perm, a list where question i gets images[perm[i]]. The same for the same seed.

    A random cycle through all n records (Sattolo's algorithm), so perm[i] != i for every i when
    n >= 2 (n = 1: [0], nothing to swap with). Then a question shown a copy of its own picture
    (benchmarks like HallusionBench ask several questions about one figure) swaps targets with the
    first question where that leaves neither of the two its own picture; it keeps it only when no
    such swap exists (e.g. every record has the same picture).
    """
    rng = random.Random(seed)
    n = len(images)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]

    def fine(question, image):
        return question != image and not same_image(images[question], images[image])
    for i in range(n):
        if n >= 2 and not fine(i, perm[i]):
            j = next((j for j in range(n) if fine(i, perm[j]) and fine(j, perm[i])), None)
            if j is not None:
                perm[i], perm[j] = perm[j], perm[i]
    return perm


# -----------------------------------------------------------------------------
# Answering: a batch encoded once; on CPU also prefilled once, and its stopped rows dropped


@torch.no_grad()
def answer_batch(model, tokenizer, image_processor, images, prompts, *, max_new_tokens, m=0, keys=None):
    """The model's responses to (image, prompt) pairs -> (greedy, sampled): greedy a list[str], one
    per pair; sampled m per pair (pair-major), drawn at temperature 1, top-k 0, top-p 1 from each
    pair's random stream (keys: machinery.keys.Keys of len(prompts)); [] when m = 0. The one place
    evaluate.py calls the sampler. The prompts are encoded once for both calls; on CPU they are
    also prefilled once (Prefill), and ShrinkingDecoder drops the rows that have stopped. On a GPU
    each call keeps fast_decode's decoder, whose CUDA graph wants fixed shapes."""
    encoded = encode_prompts(tokenizer, image_processor, images, prompts).to(model.device)
    decoder = decoder_for(model.device)
    if decoder is ShrinkingDecoder:
        decoder = Prefill(model, encoded).decoder
    greedy = sample(model, encoded, max_new_tokens=max_new_tokens, temperature=0.0, decoder=decoder)
    sampled = sample(model, encoded, n=m, max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                     keys=keys, decoder=decoder).texts(tokenizer) if m else []
    return greedy.texts(tokenizer), sampled


def answer_benchmark(model, tokenizer, image_processor, bench, cfg, label, judge=None, blind=False):
    """Greedy answers of one model to every askable record of bench -> list of sample dicts, in
    record order; with cfg.samples = M > 0 each also holds M answers sampled at temperature 1
    ("sampled", "sampled_extracted", "sampled_correct") and their majority ("majority": the
    rewards.majority_vote label of the M last boxes, missing boxes not counted, None when no answer
    has one; "majority_correct").
    blind: each question is shown the image of the record `derangement(..., cfg.eval_seed)` gives
    it ("image_of": that record's id), the rest as above. Records whose image does not open are
    marked skipped (for every model) and left out; so run the real pass before the blind one.
    """
    askable = [r for r in bench.records if r.skip is None]
    shown = [askable[j] for j in derangement([r.image for r in askable], cfg.eval_seed)] if blind else askable
    samples = []
    keys = prompt_keys(cfg.eval_seed, "samples", n=len(askable))  # each question's own stream, whatever its batch
    bar = progress(total=len(askable), desc=f"{label} | {bench.name}" + (" | blind" if blind else ""), unit="q",
                   disable=cfg.quiet)
    for start in range(0, len(askable), cfg.batch_size):
        batch, images, rows = [], [], []
        for row, (record, source) in enumerate(zip(askable[start:start + cfg.batch_size],
                                                   shown[start:start + cfg.batch_size]), start):
            try:
                images.append(open_image(source))
                batch.append((record, source))
                rows.append(row)
            except DataError as err:
                source.skip = "unreadable image"
                if not cfg.quiet:
                    tqdm.write(f"skipped: {err}", file=sys.stderr)
        if batch:
            prompts = [reasoner_prompt(r.question) for r, _ in batch]
            m = cfg.samples
            responses, sampled = answer_batch(model, tokenizer, image_processor, images, prompts,
                                              max_new_tokens=cfg.max_new_tokens, m=m, keys=keys[rows])
            for i, ((record, source), prompt, response) in enumerate(zip(batch, prompts, responses)):
                prediction = extract_prediction(response)
                row = {"id": record.id, "category": record.category, "answer_type": record.answer_type,
                       "prompt": prompt, "prediction": response, "extracted": prediction, "gold": record.answer,
                       "correct": score(record, prediction, judge)}
                if blind:
                    row["image_of"] = source.id
                if m:
                    texts = sampled[i * m:(i + 1) * m]
                    extracted = [extract_prediction(t) for t in texts]
                    majority, _ = majority_vote([extract_boxed(t) for t in texts])
                    row.update(sampled=texts, sampled_extracted=extracted,
                               sampled_correct=[score(record, e, judge) for e in extracted], majority=majority,
                               majority_correct=majority is not None and score(record, majority, judge))
                samples.append(row)
        bar.update(len(askable[start:start + cfg.batch_size]))
    bar.close()
    return samples


PASS1_INTERVAL = ("Wilson 95% at p = pass@1 over the n questions: conservative, since a question's share of "
                  "right samples varies no more than a 0/1 outcome")


def counts(samples, key):
    """{correct, scored, accuracy, wilson95, by_category: {category: {correct, scored}}} of the
    samples' boolean `key`."""
    correct, total = sum(s[key] for s in samples), len(samples)
    by_category = {}
    for s in samples:
        tally = by_category.setdefault(s["category"], {"correct": 0, "scored": 0})
        tally["correct"] += s[key]
        tally["scored"] += 1
    return {"correct": correct, "scored": total, "accuracy": correct / total if total else None,
            "wilson95": wilson_interval(correct, total), "by_category": by_category}


def pass_at_1(samples, m):
    """pass@1 at temperature 1: the mean over questions of the share of their m samples that are
    right -> {m, accuracy, wilson95 (see PASS1_INTERVAL), interval, scored (questions),
    right_samples, by_category: {category: {accuracy, scored}}}."""
    shares = [sum(s["sampled_correct"]) / m for s in samples]
    by_category = {}
    for s, share in zip(samples, shares):
        by_category.setdefault(s["category"], []).append(share)
    return {"m": m, "accuracy": sum(shares) / len(shares) if shares else None,
            "wilson95": wilson_interval(sum(shares), len(shares)), "interval": PASS1_INTERVAL,
            "scored": len(shares), "right_samples": sum(sum(s["sampled_correct"]) for s in samples),
            "by_category": {c: {"accuracy": sum(v) / len(v), "scored": len(v)} for c, v in by_category.items()}}


def summarize(samples, seconds, m=0):
    """A model's result on a benchmark: counts of the greedy verdicts and the seconds it took; with
    m > 0, "pass1" (pass_at_1) and "maj" ({m, **counts of majority_correct})."""
    result = {**counts(samples, "correct"), "seconds": round(seconds, 2)}
    if m:
        result["pass1"] = pass_at_1(samples, m)
        result["maj"] = {"m": m, **counts(samples, "majority_correct")}
    return result


def percent(value):
    return f"{100 * value:.1f}"


def cell(result, key=None):
    """'23.4 (117/500) [19.9, 27.3]': accuracy %, (correct/scored), 95% Wilson interval; then
    ' (blind 20.0)' when the result has a blind run. key "pass1" or "maj": that figure instead
    ('21.3 [17.9, 25.1]' for pass@1, whose right answers are shares)."""
    blind = result.get("blind")
    if key is not None:
        result, blind = result[key], blind and blind.get(key)  # a greedy-only blind run has no pass1, maj
    if not result["scored"]:
        return "n/a (0/0)"
    low, high = result["wilson95"]
    tally = "" if key == "pass1" else f" ({result['correct']}/{result['scored']})"
    text = f"{percent(result['accuracy'])}{tally} [{percent(low)}, {percent(high)}]"
    if blind and blind["scored"]:
        text += f" (blind {percent(blind['accuracy'])})"
    return text


def markdown_table(results, models):
    lines = ["| benchmark | " + " | ".join(models) + " | skipped |",
             "|---" * (len(models) + 2) + "|"]
    m = results["config"].get("samples", 0)
    for name, bench in results["benchmarks"].items():
        skipped = ", ".join(f"{n} {reason}" for reason, n in bench["skipped"].items()) or "0"
        rows = [(name, None, skipped)] + ([(f"{name} pass@1 (T=1, m={m})", "pass1", ""),
                                           (f"{name} maj@{m}", "maj", "")] if m else [])
        for label, key, tail in rows:
            cells = [cell(bench["models"][model], key) if model in bench["models"] else "-" for model in models]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {tail} |")
    lines.append("")
    lines.append("Accuracy % (correct/scored) [95% Wilson interval], greedy. Scoring is " + SCORING)
    if results["config"].get("blind"):
        lines.append("(blind X): the same questions, each shown another record's image, scored the same way.")
    if m:
        lines.append(f"pass@1: the mean share of right answers among {m} sampled at temperature 1; its interval is "
                     f"{PASS1_INTERVAL}. maj@{m}: the majority of their boxed answers, scored like a greedy one.")
    return "\n".join(lines)


def safe_name(text):
    return re.sub(r"[^\w.@=-]+", "_", text).strip("_")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def evaluate(cfg, judge=None):
    """Runs cfg (EvalConfig) and writes its results; returns the results dict."""
    device = resolve_device(cfg.device)
    specs = [s for s in cfg.bench.split(",") if s.strip()]
    if not specs:
        raise DataError("no benchmark given: pass --bench shapes, a .jsonl file, or NAME=PATH")
    # Every benchmark and every model's processors load first, so a mistake in any shows before a
    # model has spent its time; results are kept by name, so names must differ.
    benchmarks = [load_benchmark(spec, cfg.limit, cfg.images_anywhere) for spec in specs]
    for what, names, hint in (("benchmark", [b.name for b in benchmarks], "rename one of the files"),
                              ("model", cfg.model, "drop one, or give a built-in model another @SEED")):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DataError(f"{what} '{twice[0]}' is given twice: results are kept by name ({hint})")
    for spec in cfg.model:
        load_processors(model_source(spec, cfg.seed)[0])
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise DataError(f"--output '{out}' is a file, not a folder")
    results = {"config": {**asdict(cfg), "device": str(device)}, "scoring": SCORING,  # the device it ran on
               "benchmarks": {b.name: {"records": len(b.records), "skipped": {}, "models": {}}
                              for b in benchmarks}}
    for spec in cfg.model:
        name, seed = model_source(spec, cfg.seed)
        model, tokenizer, image_processor = load_vlm(
            name, device=device, dtype=DTYPES[cfg.dtype], min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels, seed=seed)
        for bench in benchmarks:
            start = time.perf_counter()
            samples = answer_benchmark(model, tokenizer, image_processor, bench, cfg, spec, judge)
            write_jsonl(out / "samples" / safe_name(spec) / f"{safe_name(bench.name)}.jsonl", samples)
            entry = results["benchmarks"][bench.name]
            result = summarize(samples, time.perf_counter() - start, cfg.samples)
            if cfg.blind:  # after the real run, which has marked the images that do not open
                start = time.perf_counter()
                blind_cfg = cfg if cfg.blind_samples else replace(cfg, samples=0)
                blind = answer_benchmark(model, tokenizer, image_processor, bench, blind_cfg, spec, judge, blind=True)
                write_jsonl(out / "samples" / safe_name(spec) / "blind" / f"{safe_name(bench.name)}.jsonl", blind)
                result["blind"] = summarize(blind, time.perf_counter() - start, blind_cfg.samples)
            entry["models"][spec] = result
            entry["skipped"] = bench.skipped()
        del model  # one model in memory at a time
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "results.json", json.dumps(results, indent=2))  # kept even if a later model fails
    return results


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 a user mistake, said in one line on stderr)."""
    cfg = parse_args(argv)
    cfg = replace(cfg, output=cfg.output or f"runs/eval/{time.strftime('%Y%m%d-%H%M%S')}")
    if cfg.quiet:
        transformers.utils.logging.disable_progress_bar()  # loading weights draws one per model
    try:
        results = evaluate(cfg)
    except (ModelError, DataError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    table = markdown_table(results, cfg.model)
    out = Path(cfg.output)
    write_atomic(out / "table.md", table + "\n")
    print(table)
    print(f"done: {out} (results.json, table.md, samples/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
