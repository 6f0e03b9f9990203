"""
Images for visplay: folders of the user's images read safely, and built-in synthetic "shapes"
scenes whose questions have exact answers.

Part 1 reads a folder of unlabeled images, the only input VisPlay needs. Every file either loads
as an RGB PIL image or is skipped with a one-line reason that names it, so one bad file never
stops a run and the run folder can list what was left out. Every mode Pillow reads is turned into
plain RGB the same way: transparency over white, high bit depth stretched by its own value range,
EXIF orientation applied, the first frame of animations.

Part 2 draws flat-coloured circles, squares and triangles on a white canvas and asks questions in
five categories (counting, colour, spatial, size, arithmetic) whose answers follow exactly from
the drawing. They serve the tests, the offline first run, and a built-in benchmark.

Left out: captions or labels (VisPlay reads none), video, augmentation, caching decoded images.
"""

import contextlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from rewards import answers_equivalent

# -----------------------------------------------------------------------------
# Part 1: image folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 178_956_970  # Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS); lower it to be stricter
MIN_SIDE = 28  # one merged 28x28 patch of Qwen2.5-VL's vision encoder; anything smaller is all upsampling
MAX_ASPECT = 200  # Qwen2.5-VL's image processor refuses images longer than 200:1
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA")


class DataError(ValueError):
    """A problem with the user's data, said in one line that names the file or folder."""


def write_atomic(path, text):
    """Readers see the old file or the new one, never half of one (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def find_images(folder) -> list[Path]:
    """Every image file under folder, recursively, sorted so runs see the same order."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"image folder '{folder}' does not exist")
    if not folder.is_dir():
        raise DataError(f"'{folder}' is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"no images found in '{folder}' (looked for {', '.join(IMAGE_EXTENSIONS)} recursively)")
    return paths


def load_image(path, max_pixels=None) -> Image.Image:
    """
    One image file as an upright RGB image, or a DataError naming the file and what is wrong.
    With max_pixels, the image is shrunk (aspect kept) so width * height <= max_pixels; it is
    never enlarged. Example: a 4000x3000 photo with max_pixels=448*448 comes back 517x388.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"'{path}': no such file")
    if path.stat().st_size == 0:
        raise DataError(f"'{path}': empty file (0 bytes)")
    return decode_image(path, f"'{path}'", max_pixels)


def decode_image(source, name, max_pixels=None) -> Image.Image:
    """What load_image does once the file is found, for any source: a path, an open binary file
    (the bytes of a benchmark export) or a PIL image. DataError messages start with `name`."""
    try:
        with warnings.catch_warnings():
            # Pillow warns from half its hard limit up; we enforce MAX_IMAGE_PIXELS ourselves
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Image.open reads the header only (multi-frame files open on frame 0); a PIL image given
            # is the caller's, so it is not closed here.
            opened = contextlib.nullcontext(source) if isinstance(source, Image.Image) else Image.open(source)
            with opened as image:
                _check_size(name, *image.size)  # before a single pixel is decoded
                too_big = max_pixels is not None and image.width * image.height > max_pixels
                if too_big and image.format in ("JPEG", "MPO"):  # (MPO: a phone's JPEG with a second frame)
                    # a JPEG decodes at 1/2, 1/4 or 1/8 of its size at a fraction of the cost: the
                    # largest reduction still above the size it is shrunk to below
                    scale = math.sqrt(max_pixels / (image.width * image.height))
                    image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
                image.load()  # decode every pixel now, inside the try, so a truncated file is caught here
                image = _to_rgb(ImageOps.exif_transpose(image))
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: {_first_line(e)}") from None
    except PermissionError:
        raise DataError(f"{name}: not readable (permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{name}: corrupt or truncated image ({_first_line(e)})") from None
    if max_pixels is not None and image.width * image.height > max_pixels:
        image = _downscale(image, max_pixels)
    return image


def readable_images(folder, max_pixels=None):
    """
    The image files under folder that load: returns (paths, skipped) with skipped a list of
    (path, one-line reason). Each image is decoded once to check it, then dropped: a pool of
    thousands of photos does not fit in memory, so callers load_image each path when they use it.
    DataError if nothing loads.
    """
    paths, skipped = [], []
    for path in find_images(folder):
        try:
            load_image(path, max_pixels)
            paths.append(path)
        except DataError as e:
            skipped.append((path, str(e)))
    if not paths:
        raise DataError(f"none of the {len(skipped)} image files in '{folder}' could be read (first: {skipped[0][1]})")
    return paths, skipped


def _check_size(name, width, height):
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of "
                        f"{MAX_IMAGE_PIXELS:,} (a decompression bomb?)")
    if min(width, height) < MIN_SIDE:
        raise DataError(f"{name}: {width}x{height} is too small to hold a question (under {MIN_SIDE} px a side)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise DataError(f"{name}: {width}x{height} is longer than {MAX_ASPECT}:1, which the vision encoder refuses")


def _to_rgb(image):
    if image.mode in HIGH_BIT_DEPTH_MODES:
        # Pillow's own convert clips at 255, which turns most 16-bit scans and depth maps all white
        return _stretch_to_8bit(image).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        # what lies under transparent pixels is often black or junk; white is how viewers show it
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # RGB, L, P, 1, CMYK, YCbCr: Pillow's conversions are right for these


def _stretch_to_8bit(image):
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)  # NaN and ±inf pixels: the range's ends
    scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)  # flat stays flat
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def _downscale(image, max_pixels):
    """The image shrunk to at most max_pixels. The short side rounds up and the long side down, so
    the shrunk image is never longer than the original (one within MAX_ASPECT stays within it), and
    the long side is capped so that the bound holds exactly despite float rounding."""
    scale = math.sqrt(max_pixels / (image.width * image.height))
    short, long = sorted(image.size)
    new_short = math.ceil(short * scale)
    new_long = max(1, min(math.floor(long * scale), max_pixels // new_short))
    size = (new_short, new_long) if image.width <= image.height else (new_long, new_short)
    return image.resize(size, Image.Resampling.LANCZOS)


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# -----------------------------------------------------------------------------
# Part 2: synthetic shapes with exact answers

KINDS = ("circle", "square", "triangle")
PALETTE = {  # far apart in RGB so neither a model nor a pixel count can confuse two of them
    "red": (230, 25, 25),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 210, 0),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
BACKGROUND = (255, 255, 255)
CATEGORIES = ("counting", "colour", "spatial", "size", "arithmetic")
MIN_SHAPES = 3
EDGE = 4  # pixels kept free between every shape and the border of the canvas
GAP = 6  # pixels kept free between the bounding boxes of any two shapes, so each is its own blob
AREA_MARGIN = 1.5  # "larger" is asked only when one area is at least this many times the other


@dataclass
class Shape:
    kind: str  # "circle", "square" or "triangle"
    colour: str  # a key of PALETTE
    x: int  # centre, pixels
    y: int
    size: int  # side of the bounding box: the square's side, the circle's diameter, the triangle's base and height


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: list[Shape]


def make_scene(seed: int, size=224, max_shapes=8, min_shapes=MIN_SHAPES, grid=0, colours=None,
               distinct=False, two_sizes=False) -> Scene:
    """
    A random scene of up to max_shapes (at least min_shapes) non-overlapping shapes on a size x size
    canvas, each 10% to 30% of the canvas across; the same scene for the same seed.

    The knobs of an easier world (pretrain.py's), defaults unchanged: `colours`, the palette colours
    a scene may use (default all of PALETTE); `grid` > 0 puts each shape at the centre of its own
    cell of a grid x grid layout, all 75% of a cell across (so no size is clearly larger and no
    question compares sizes). With size 112 and grid 4 a cell is one 28 x 28 merged patch of the
    vision encoder: every image token sees one whole shape or none. `distinct`: no two shapes share
    both colour and kind, so "the red circle" always names one shape and a list of shapes by
    colour and kind never repeats an item. `two_sizes` (with `grid`): each shape is drawn either
    75% or 37.5% of its cell across, so sizes can be compared, and all five categories are asked.
    """
    rng = np.random.default_rng(seed)
    # a few colours per scene, so colours repeat and counting them is worth asking
    palette = list(PALETTE) if colours is None else list(colours)
    colours = [str(c) for c in rng.choice(palette, size=min(len(palette), rng.integers(2, 5)), replace=False)]
    n_shapes = rng.integers(min_shapes, max_shapes + 1)
    if grid:
        return Scene(size, size, BACKGROUND, _grid_shapes(rng, size, grid, int(n_shapes), colours, distinct, two_sizes))
    shapes = []
    for _ in range(100 * n_shapes):  # rejection sampling: a crowded canvas may end with fewer shapes
        if len(shapes) == n_shapes:
            break
        side = int(rng.integers(size // 10, size * 3 // 10 + 1))
        x = int(rng.integers(EDGE + side // 2, size - EDGE - side + side // 2 + 1))
        y = int(rng.integers(EDGE + side // 2, size - EDGE - side + side // 2 + 1))
        shape = Shape(str(rng.choice(KINDS)), str(rng.choice(colours)), x, y, side)
        if all(_apart(shape, other) for other in shapes) and not (distinct and _named_as(shape, shapes)):
            shapes.append(shape)
    return Scene(size, size, BACKGROUND, shapes)


def _named_as(shape, shapes):
    return any((s.colour, s.kind) == (shape.colour, shape.kind) for s in shapes)


def _grid_shapes(rng, size, grid, n_shapes, colours, distinct, two_sizes):
    """n_shapes shapes in distinct cells of a grid x grid layout, centred in their cells (fewer
    if `distinct` runs out of colour and kind pairs); two_sizes: each full or half size."""
    cell = size // grid
    side = cell * 3 // 4
    if cell - side <= GAP or cell // 2 - side // 2 < EDGE:
        raise ValueError(f"a {grid} x {grid} grid on {size} pixels leaves no room between shapes")
    shapes = []
    for index in rng.choice(grid * grid, size=min(n_shapes, grid * grid), replace=False):
        row, col = divmod(int(index), grid)
        # half the side is a quarter of the area: clearly smaller by any reading (AREA_MARGIN)
        this_side = side // 2 if two_sizes and rng.random() < 0.5 else side
        for _ in range(100):  # redraw a repeated colour and kind (distinct); give the cell up after 100
            shape = Shape(str(rng.choice(KINDS)), str(rng.choice(colours)), col * cell + cell // 2,
                          row * cell + cell // 2, this_side)
            if not (distinct and _named_as(shape, shapes)):
                shapes.append(shape)
                break
    return shapes


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image. ImageDraw does not anti-alias: every pixel is the background or a palette colour."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0, y0, x1, y1 = _bbox(shape)
        fill = PALETTE[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image


def scene_questions(scene: Scene, rng, categories=CATEGORIES) -> list[dict]:
    """
    At most one question per category of `categories` about the scene, each a dict with question, answer,
    category and choices (None unless multiple choice). Only unambiguous questions are asked: every
    "the red circle" names exactly one shape, left/right and above/below only between shapes that
    do not overlap on that axis, larger/smaller only with a clear margin. Answers are exact
    strings: "3", "red", "yes", "A". Example:
    {"question": "How many circles are there?", "answer": "2", "category": "counting", "choices": None}
    """
    askers = (_counting, _colour, _spatial, _size, _arithmetic)
    questions = []
    for category, ask in zip(CATEGORIES, askers):
        if category not in categories:
            continue
        asked = ask(scene.shapes, rng)
        if asked is not None:
            question, answer, choices = asked
            questions.append({"question": question, "answer": str(answer), "category": category, "choices": choices})
    return questions


def shapes_benchmark(n_questions=500, seed=0, size=224, categories=CATEGORIES, **world) -> list[dict]:
    """
    n_questions questions on fresh scenes, as equal across the categories as n allows, the
    same for the same seed. Each record: id, image, question, answer, category, choices, scene.
    world: make_scene's knobs (max_shapes, min_shapes, grid, colours).
    """
    rng = np.random.default_rng((seed, 1))  # stream 1: never the scenes shapes_images(seed) trains on (stream 0)
    quota = {c: n_questions // len(categories) + (i < n_questions % len(categories)) for i, c in enumerate(categories)}
    records = []
    while any(quota.values()):
        scene = make_scene(int(rng.integers(2**63)), size, **world)
        image = render(scene)
        for q in scene_questions(scene, rng, categories):
            if quota[q["category"]] > 0:
                quota[q["category"]] -= 1
                records.append({"id": f"shapes-{seed}-{len(records):05d}", "image": image, **q, "scene": scene})
    return records


def write_benchmark(folder, n, seed, categories=CATEGORIES, **world) -> Path:
    """shapes_benchmark(n, seed, categories, **world) written as evaluate.py's JSONL
    (folder/heldout.jsonl, written last) with the images beside it; returns the JSONL's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in shapes_benchmark(n, seed=seed, categories=categories, **world):
        r["image"].save(folder / f"{r['id']}.png")
        lines.append(json.dumps({"id": r["id"], "image": f"{r['id']}.png", "question": r["question"],
                                 "answer": r["answer"], "category": r["category"]}) + "\n")
    write_atomic(folder / "heldout.jsonl", "".join(lines))
    return folder / "heldout.jsonl"


def shapes_images(n, seed=0, size=224, **world) -> list[Image.Image]:
    """n rendered scenes, for self-play on generated images; world: make_scene's knobs."""
    return [render(make_scene(s, size, **world)) for s in _image_seeds(n, seed)]


def write_shapes_folder(folder, n, seed=0, size=224, **world) -> list[Path]:
    """Writes the n images of shapes_images(n, seed, size, **world) as PNGs into folder, and each
    image's scene as a line of folder/scenes.jsonl ({"file": "shapes_00000.png", "scene": {...}},
    read back by load_scenes); returns the images' paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for i, s in enumerate(_image_seeds(n, seed)):  # one image at a time, so n can be large
        path = folder / f"shapes_{i:05d}.png"
        scene = make_scene(s, size, **world)
        render(scene).save(path)
        paths.append(path)
        lines.append(json.dumps({"file": path.name, "scene": asdict(scene)}) + "\n")
    write_atomic(folder / SCENES_FILE, "".join(lines))
    return paths


def _image_seeds(n, seed):
    return [int(s) for s in np.random.default_rng((seed, 0)).integers(2**63, size=n)]


def _bbox(shape):
    """Inclusive pixel box (x0, y0, x1, y1), size x size around the centre."""
    x0, y0 = shape.x - shape.size // 2, shape.y - shape.size // 2
    return x0, y0, x0 + shape.size - 1, y0 + shape.size - 1


def _apart(a, b):
    ax0, ay0, ax1, ay1 = _bbox(a)
    bx0, by0, bx1, by1 = _bbox(b)
    return ax1 + GAP < bx0 or bx1 + GAP < ax0 or ay1 + GAP < by0 or by1 + GAP < ay0


def _area(shape):
    return shape.size**2 * {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}[shape.kind]


def _clearly_larger(a, b):
    # larger both in area and in extent, so no reading of "larger" disagrees
    return a.size > b.size and _area(a) >= AREA_MARGIN * _area(b)


def _name(shape):
    return f"the {shape.colour} {shape.kind}"


def _uniquely_named(shapes):
    return [s for s in shapes if sum((o.colour, o.kind) == (s.colour, s.kind) for o in shapes) == 1]


def _pick(rng, items):
    return items[rng.integers(len(items))]


def _count(shapes, colour=None, kind=None):
    return sum((colour is None or s.colour == colour) and (kind is None or s.kind == kind) for s in shapes)


def _counting(shapes, rng):
    colour = _pick(rng, sorted({s.colour for s in shapes}))  # sorted: set order changes between processes
    kind = _pick(rng, KINDS)  # any kind, so "0" is sometimes the answer
    return _pick(rng, [
        (f"How many {colour} shapes are there?", _count(shapes, colour=colour), None),
        (f"How many {kind}s are there?", _count(shapes, kind=kind), None),
        (f"How many {colour} {kind}s are there?", _count(shapes, colour, kind), None),
    ])


def _colour(shapes, rng):
    options = []
    largest, smallest = max(shapes, key=_area), min(shapes, key=_area)
    if all(s is largest or _clearly_larger(largest, s) for s in shapes):
        options.append(("What colour is the largest shape?", largest.colour, None))
    if all(s is smallest or _clearly_larger(s, smallest) for s in shapes):
        options.append(("What colour is the smallest shape?", smallest.colour, None))
    for kind in KINDS:
        of_kind = [s for s in shapes if s.kind == kind]
        if len(of_kind) == 1:
            options.append((f"What colour is the {kind}?", of_kind[0].colour, None))
    return _pick(rng, options) if options else None


def _spatial(shapes, rng):
    options = []  # every pair in both orders and both directions, so "yes" and "no" are equally likely
    named = _uniquely_named(shapes)
    for a in named:
        for b in named:
            ax0, ay0, ax1, ay1 = _bbox(a)
            bx0, by0, bx1, by1 = _bbox(b)
            if ax1 < bx0 or bx1 < ax0:  # no overlap on x, so left and right are clear
                options.append(_yes_no(f"Is {_name(a)} to the left of {_name(b)}?", ax1 < bx0))
                options.append(_yes_no(f"Is {_name(a)} to the right of {_name(b)}?", ax0 > bx1))
            if ay1 < by0 or by1 < ay0:
                options.append(_yes_no(f"Is {_name(a)} above {_name(b)}?", ay1 < by0))
                options.append(_yes_no(f"Is {_name(a)} below {_name(b)}?", ay0 > by1))
    return _pick(rng, options) if options else None


def _yes_no(question, truth):
    return question, "yes" if truth else "no", None


def _size(shapes, rng):
    named = _uniquely_named(shapes)
    pairs = [(a, b) for a in named for b in named if _clearly_larger(a, b)]
    if not pairs:
        return None
    big, small = _pick(rng, pairs)
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    word, target = (("larger", big), ("smaller", small))[rng.integers(2)]
    question = f"Which is {word}, (A) {_name(first)} or (B) {_name(second)}? Answer with the letter."
    return question, "A" if target is first else "B", [_name(first), _name(second)]


def _arithmetic(shapes, rng):
    by_kind = {f"{k}s": _count(shapes, kind=k) for k in KINDS}
    by_colour = {f"{c} shapes": _count(shapes, colour=c) for c in sorted({s.colour for s in shapes})}
    counts = by_colour if len(by_colour) >= 2 and rng.random() < 0.5 else by_kind
    p, q = (str(g) for g in rng.choice(list(counts), size=2, replace=False))
    if rng.random() < 0.5:
        return f"How many {p} and {q} are there in total?", counts[p] + counts[q], None
    if counts[p] < counts[q]:
        p, q = q, p  # keep the difference a count, never negative
    return f"How many more {p} than {q} are there?", counts[p] - counts[q], None


# -----------------------------------------------------------------------------
# Questions read back: the answer of any question in scene_questions' templates, for any scene

_COLOURS, _KINDS = "|".join(PALETTE), "|".join(KINDS)
_THE = rf"the ({_COLOURS}) ({_KINDS})"  # one named shape: colour, kind
_RELATIONS = ("to the left of", "to the right of", "above", "below")
_TEMPLATES = [  # (category, pattern), tried in order: the arithmetic ones would also match "How many (.+)"
    ("arithmetic", re.compile(r"How many more (.+) than (.+) are there\?")),
    ("arithmetic", re.compile(r"How many (.+) and (.+) are there in total\?")),
    ("counting", re.compile(r"How many (.+) are there\?")),
    ("colour", re.compile(r"What colour is the (largest|smallest) shape\?")),
    ("colour", re.compile(rf"What colour is the ({_KINDS})\?")),
    ("spatial", re.compile(rf"Is {_THE} ({'|'.join(_RELATIONS)}) {_THE}\?")),
    ("size", re.compile(rf"Which is (larger|smaller), \(A\) {_THE} or \(B\) {_THE}\? Answer with the letter\.")),
]


def true_answer(question: str, scene: Scene) -> str | None:
    """The exact answer to a question in the templates of scene_questions about `scene`, as
    scene_questions would give it ("3", "red", "yes", "A"); None when the text is not one of the
    templates, or when the scene does not determine an answer: "the circle" with two circles,
    "the red square" with none, left/right of shapes that overlap on that axis, a size comparison
    without the clear margin, "how many more" with fewer. Surrounding spaces are ignored, nothing else.

    >>> scene = Scene(112, 112, BACKGROUND, [Shape("circle", "red", 20, 20, 14), Shape("square", "red", 80, 20, 20)])
    >>> true_answer("How many red shapes are there?", scene), true_answer("What colour is the triangle?", scene)
    ('2', None)
    """
    read = _read_question(question, scene.shapes)
    return None if read is None else read[1]


def question_category(question: str) -> str | None:
    """The category ("counting", "colour", "spatial", "size", "arithmetic") of a question in the
    templates of scene_questions, whatever the scene; None for any other text."""
    read = _read_question(question, None)
    return None if read is None else read[0]


def question_shapes(question: str, scene: Scene) -> list[list[Shape]] | None:
    """The shapes an answer rests on, in groups: [the counted shapes] for counting, [the first
    phrase's, the second's] for arithmetic, [[the one shape]] for colour, [[A], [B]] for spatial and
    size; each group in reading order (top to bottom, then left to right). None where true_answer is."""
    read = _read_question(question, scene.shapes)
    return None if read is None or read[1] is None else read[2]


def counted(question: str) -> tuple[str | None, str | None] | None:
    """What a counting question counts, as (colour, kind), either None for any: "How many red shapes
    are there?" -> ("red", None), "How many circles are there?" -> (None, "circle"); None if the
    text is not a counting question of scene_questions' templates."""
    if question_category(question) != "counting":
        return None
    return _phrase(_TEMPLATES[2][1].fullmatch(question.strip())[1])


def _read_question(question, shapes):
    """question -> (category, answer | None, groups of shapes), or None if it fits no template.
    With shapes None only the category is worked out."""
    if not isinstance(question, str):
        return None
    question = question.strip()
    for category, pattern in _TEMPLATES:
        m = pattern.fullmatch(question)
        if m is None:
            continue
        if category == "arithmetic":
            p, q = _phrase(m[1]), _phrase(m[2])
            # as scene_questions asks: two different kinds ("circles"), or two different colours ("red shapes")
            if p is None or q is None or p == q or None not in p or p.index(None) != q.index(None):
                return None
            if shapes is None:
                return category, None, None
            groups = [_matching(shapes, *p), _matching(shapes, *q)]
            total = len(groups[0]) + len(groups[1]) if " in total?" in question else len(groups[0]) - len(groups[1])
            return category, str(total) if total >= 0 else None, groups
        if category == "counting":
            phrase = _phrase(m[1])
            if phrase is None:
                return None
            if shapes is None:
                return category, None, None
            group = _matching(shapes, *phrase)
            return category, str(len(group)), [group]
        if shapes is None:
            return category, None, None
        return (category, *_answer(category, m.groups(), shapes))
    return None


def _phrase(text):
    """'red shapes' -> ('red', None), 'circles' -> (None, 'circle'), 'red circles' -> ('red', 'circle'); else None."""
    m = re.fullmatch(rf"(?:({_COLOURS}) shapes|(?:({_COLOURS}) )?({_KINDS})s)", text)
    return None if m is None else (m[1] or m[2], m[3])


def _matching(shapes, colour, kind):
    return _reading_order(s for s in shapes if (colour is None or s.colour == colour) and (kind is None or s.kind == kind))


def _reading_order(shapes):
    return sorted(shapes, key=lambda s: (s.y, s.x))


def _answer(category, args, shapes):
    """(answer | None, groups) of a colour, spatial or size question, args being its pattern's groups."""
    if category == "colour" and args[0] in ("largest", "smallest"):
        pick = (max if args[0] == "largest" else min)(shapes, key=_area)
        clear = all(s is pick or (_clearly_larger(pick, s) if args[0] == "largest" else _clearly_larger(s, pick))
                    for s in shapes)
        return (pick.colour, [[pick]]) if clear else (None, [])
    if category == "colour":
        of_kind = [s for s in shapes if s.kind == args[0]]
        return (of_kind[0].colour, [of_kind]) if len(of_kind) == 1 else (None, [])
    if category == "spatial":
        a, relation, b = _the(shapes, *args[:2]), args[2], _the(shapes, *args[3:])
        if a is None or b is None or a is b:
            return None, []
        ax0, ay0, ax1, ay1 = _bbox(a)
        bx0, by0, bx1, by1 = _bbox(b)
        horizontal = relation in ("to the left of", "to the right of")
        lo_a, hi_a, lo_b, hi_b = (ax0, ax1, bx0, bx1) if horizontal else (ay0, ay1, by0, by1)
        if not (hi_a < lo_b or hi_b < lo_a):
            return None, []  # they overlap on the asked axis
        first = hi_a < lo_b  # a is left of / above b
        return ("yes" if first == (relation in ("to the left of", "above")) else "no"), [[a], [b]]
    # size: which of A, B is larger / smaller, when one is clearly larger
    word, a, b = args[0], _the(shapes, *args[1:3]), _the(shapes, *args[3:5])
    if a is None or b is None or a is b:
        return None, []
    big = "A" if _clearly_larger(a, b) else "B" if _clearly_larger(b, a) else None
    if big is None:
        return None, []
    return (big if word == "larger" else {"A": "B", "B": "A"}[big]), [[a], [b]]


def _the(shapes, colour, kind):
    """The one shape of this colour and kind, or None if there are none or several."""
    matches = [s for s in shapes if (s.colour, s.kind) == (colour, kind)]
    return matches[0] if len(matches) == 1 else None


# -----------------------------------------------------------------------------
# Scenes beside their images

SCENES_FILE = "scenes.jsonl"  # written by write_shapes_folder; find_images takes image extensions only


def load_scenes(folder) -> dict[str, Scene]:
    """The scenes of a folder written by write_shapes_folder, by image file name:
    {"shapes_00000.png": Scene, ...}; DataError if the folder has no scenes file."""
    path = Path(folder) / SCENES_FILE
    if not path.is_file():
        raise DataError(f"'{folder}' has no {SCENES_FILE} (only write_shapes_folder writes one)")
    scenes = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                s = row["scene"]
                scenes[row["file"]] = Scene(s["width"], s["height"], tuple(s["background"]),
                                            [Shape(**shape) for shape in s["shapes"]])
    return scenes


def grade_candidates(records, scenes):
    """Curation's candidates checked against the truth, for images with a known scene (a folder
    written by write_shapes_folder; `scenes` by image path): each record gets `true_answer` (None
    where its question does not parse or the scene does not determine an answer), `answerable` and
    `category`. A diagnostic of the silver labels only: nothing in training ever reads it.

    Returns {answerable_frac: of the valid candidates, silver_accuracy: of the kept ones, the share
    whose silver label is the true answer (an unanswerable question's label counts as wrong, as in
    the paper's pseudo-label accuracy), categories: {category or "other": valid candidates}}, or {}
    when no record's image has a scene.
    """
    graded = [r for r in records if r["image"] in scenes]
    for r in graded:
        question = r["question"] if r["valid"] else None
        r["true_answer"] = true_answer(question, scenes[r["image"]]) if question else None
        r["answerable"] = r["true_answer"] is not None
        r["category"] = question_category(question) if question else None
    valid = [r for r in graded if r["valid"]]
    kept = [r for r in graded if r["kept"]]
    if not graded:
        return {}
    categories = {}
    for r in valid:
        categories[r["category"] or "other"] = categories.get(r["category"] or "other", 0) + 1
    kept_categories = {}
    for r in kept:
        kept_categories[r["category"] or "other"] = kept_categories.get(r["category"] or "other", 0) + 1
    right = sum(r["answerable"] and answers_equivalent(r["silver"], r["true_answer"]) for r in kept)
    return {"answerable_frac": sum(r["answerable"] for r in valid) / len(valid) if valid else None,
            "silver_accuracy": right / len(kept) if kept else None, "categories": categories,
            "kept_categories": kept_categories}


# -----------------------------------------------------------------------------
# Labels that no vote chose, for the ablations' controls (shapes-world images only)

def answer_space(category, max_shapes, colours) -> list[str]:
    """Every answer a question of `category` can have in a world of at most max_shapes shapes in
    the given colours: counts 0..max_shapes (counting, arithmetic), a colour, yes/no (spatial),
    A/B (size)."""
    if category in ("counting", "arithmetic"):
        return [str(n) for n in range(max_shapes + 1)]
    return {"colour": sorted(colours), "spatial": ["yes", "no"], "size": ["A", "B"]}[category]


def oracle_labels(records):
    """The upper bound: each kept candidate's silver label replaced by its true answer (records
    as grade_candidates left them). A kept question without one (it does not parse, or the scene
    does not determine an answer) is dropped, as no label could be right."""
    for r in records:
        if r["kept"]:
            r["silver"], r["kept"] = r.get("true_answer"), r.get("answerable", False)


def null_labels(records, scenes, rng):
    """The noise floor: each kept candidate labelled with an answer drawn uniformly from its
    category's answer_space, independent of the votes and of the image. A kept question of no
    known category is dropped. scenes: every scene of the image folder, by path; the world's
    bounds are read off all of them, so they tell nothing about any one."""
    shapes = [s.shapes for s in scenes.values()]
    most, colours = max(map(len, shapes)), {shape.colour for scene in shapes for shape in scene}
    spaces = {c: answer_space(c, most, colours) for c in CATEGORIES}
    for r in records:
        if r["kept"]:
            r["kept"] = r.get("category") in spaces  # None, or absent: an image without a scene
            if r["kept"]:
                space = spaces[r["category"]]
                r["silver"] = space[rng.integers(len(space))]
