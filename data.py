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
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

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
    never enlarged. Example: a 4000x3000 photo with max_pixels=448*448 comes back 517x387.
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


def make_scene(seed: int, size=224, max_shapes=8) -> Scene:
    """
    A random scene of up to max_shapes (at least MIN_SHAPES) non-overlapping shapes on a size x size
    canvas, each 10% to 30% of the canvas across; the same scene for the same seed.
    """
    rng = np.random.default_rng(seed)
    # a few colours per scene, so colours repeat and counting them is worth asking
    colours = [str(c) for c in rng.choice(list(PALETTE), size=rng.integers(2, 5), replace=False)]
    n_shapes = rng.integers(MIN_SHAPES, max_shapes + 1)
    shapes = []
    for _ in range(100 * n_shapes):  # rejection sampling: a crowded canvas may end with fewer shapes
        if len(shapes) == n_shapes:
            break
        side = int(rng.integers(size // 10, size * 3 // 10 + 1))
        x = int(rng.integers(EDGE + side // 2, size - EDGE - side + side // 2 + 1))
        y = int(rng.integers(EDGE + side // 2, size - EDGE - side + side // 2 + 1))
        shape = Shape(str(rng.choice(KINDS)), str(rng.choice(colours)), x, y, side)
        if all(_apart(shape, other) for other in shapes):
            shapes.append(shape)
    return Scene(size, size, BACKGROUND, shapes)


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


def scene_questions(scene: Scene, rng) -> list[dict]:
    """
    At most one question per category about the scene, each a dict with question, answer,
    category and choices (None unless multiple choice). Only unambiguous questions are asked: every
    "the red circle" names exactly one shape, left/right and above/below only between shapes that
    do not overlap on that axis, larger/smaller only with a clear margin. Answers are exact
    strings: "3", "red", "yes", "A". Example:
    {"question": "How many circles are there?", "answer": "2", "category": "counting", "choices": None}
    """
    askers = (_counting, _colour, _spatial, _size, _arithmetic)
    questions = []
    for category, ask in zip(CATEGORIES, askers):
        asked = ask(scene.shapes, rng)
        if asked is not None:
            question, answer, choices = asked
            questions.append({"question": question, "answer": str(answer), "category": category, "choices": choices})
    return questions


def shapes_benchmark(n_questions=500, seed=0, size=224) -> list[dict]:
    """
    n_questions questions on fresh scenes, as equal across the five categories as n allows, the
    same for the same seed. Each record: id, image, question, answer, category, choices, scene.
    """
    rng = np.random.default_rng((seed, 1))  # stream 1: never the scenes shapes_images(seed) trains on (stream 0)
    quota = {c: n_questions // len(CATEGORIES) + (i < n_questions % len(CATEGORIES)) for i, c in enumerate(CATEGORIES)}
    records = []
    while any(quota.values()):
        scene = make_scene(int(rng.integers(2**63)), size)
        image = render(scene)
        for q in scene_questions(scene, rng):
            if quota[q["category"]] > 0:
                quota[q["category"]] -= 1
                records.append({"id": f"shapes-{seed}-{len(records):05d}", "image": image, **q, "scene": scene})
    return records


def shapes_images(n, seed=0, size=224) -> list[Image.Image]:
    """n rendered scenes, for self-play on generated images."""
    return [render(make_scene(s, size)) for s in _image_seeds(n, seed)]


def write_shapes_folder(folder, n, seed=0, size=224) -> list[Path]:
    """Writes the n images of shapes_images(n, seed, size) as PNGs into folder; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(_image_seeds(n, seed)):  # one image at a time, so n can be large
        path = folder / f"shapes_{i:05d}.png"
        render(make_scene(s, size)).save(path)
        paths.append(path)
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
