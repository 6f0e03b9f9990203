"""Tests for data.py: image folders read safely, and shapes questions checked against their pixels."""

import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from model import load_processors  # noqa: E402

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)

# -----------------------------------------------------------------------------
# Part 1: image folders


def halves(size, left, right, mode="RGB"):
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def gradient(low, high, dtype, width=64, height=32):
    return Image.fromarray(np.tile(np.linspace(low, high, width).astype(dtype), (height, 1)))


def write_good_images(folder):
    """One small file per mode and format that load_image must turn into RGB."""
    Image.new("RGB", (40, 30), RED).save(folder / "rgb.jpg", quality=95)
    gradient(0, 255, np.uint8).save(folder / "grey.png")
    halves((32, 32), (0, 255), (0, 0), "LA").save(folder / "grey_alpha.png")
    palette = halves((32, 32), 0, 1, "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(folder / "palette_transparent.png", transparency=1)
    rgba = Image.new("RGBA", (32, 32), (0, 255, 0, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black
    rgba.save(folder / "rgba.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    gradient(0, 4000, np.uint16).save(folder / "grey16.png")  # 12-bit data: naive conversion is all white
    gradient(0, 100_000, np.int32).save(folder / "grey32.tif")
    gradient(-1, 1, np.float32).save(folder / "float.tif")
    halves((32, 32), 0, 1, "1").save(folder / "bilevel.png")
    Image.new("RGB", (32, 32), BLUE).save(folder / "photo.webp", lossless=True)
    Image.new("RGB", (32, 32), GREEN).save(folder / "photo.bmp")
    frames = [Image.new("RGB", (32, 32), c) for c in (RED, BLUE)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pages = [Image.new("RGB", (32, 32), c) for c in (GREEN, RED)]
    pages[0].save(folder / "pages.tiff", save_all=True, append_images=pages[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    halves((60, 30), RED, BLUE).save(folder / "rotated.jpg", exif=exif, quality=95)


def write_bad_images(folder):
    """Files that must be skipped, each for its own reason."""
    rng = np.random.default_rng(0)
    (folder / "garbage.png").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "scrambled.png")
    raw = bytearray((folder / "scrambled.png").read_bytes())
    raw[100:400] = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    (folder / "scrambled.png").write_bytes(bytes(raw))
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "truncated.jpg", quality=95)
    whole = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) * 6 // 10])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("these are my holiday notes, not a photo\n")
    Image.new("RGB", (1, 1), RED).save(folder / "tiny.png")
    Image.new("RGB", (600, 600), RED).save(folder / "bomb.png")  # over the lowered limit below
    Image.new("RGB", (6000, 28), RED).save(folder / "strip.png")  # 214:1
    return {"garbage.png", "scrambled.png", "truncated.jpg", "empty.jpg", "notes.jpg",
            "tiny.png", "bomb.png", "strip.png"}


def test_find_images_is_recursive_sorted_and_filtered(tmp_path):
    for relative in ["b.png", "a.jpg", "sub/c.JPG", "sub/deeper/d.TIFF", "notes.txt", "sub/readme.md"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a directory with an image-like name is not an image
    found = [p.relative_to(tmp_path).as_posix() for p in data.find_images(tmp_path)]
    assert found == ["a.jpg", "b.png", "sub/c.JPG", "sub/deeper/d.TIFF"]


@pytest.mark.parametrize("case", ["missing", "file", "no_images"])
def test_find_images_errors_are_one_line_naming_the_path(tmp_path, case):
    path = {"missing": tmp_path / "nope", "file": tmp_path / "a.png", "no_images": tmp_path / "docs"}[case]
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("hi")
    with pytest.raises(data.DataError) as error:
        data.find_images(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    if case == "no_images":
        assert ".jpg" in message and "recursively" in message


def test_every_mode_loads_as_upright_rgb(tmp_path):
    write_good_images(tmp_path)
    paths, skipped = data.readable_images(tmp_path)
    assert skipped == []
    loaded = {path.name: data.load_image(path) for path in paths}
    assert len(loaded) == 15 and all(image.mode == "RGB" for image in loaded.values())
    pixels = {name: np.asarray(image).astype(int) for name, image in loaded.items()}

    assert np.abs(pixels["rgb.jpg"] - RED).max() < 10
    assert (pixels["grey.png"][..., 0] == pixels["grey.png"][..., 2]).all()
    assert (pixels["grey_alpha.png"][0, 0] == 0).all() and (pixels["grey_alpha.png"][0, -1] == 255).all()
    assert tuple(pixels["palette_transparent.png"][0, 0]) == RED
    assert tuple(pixels["palette_transparent.png"][0, -1]) == WHITE  # transparent index over white
    assert tuple(pixels["rgba.png"][0, 0]) == WHITE  # fully transparent red becomes white, not red or black
    assert np.abs(pixels["rgba.png"][0, 1] - 127).max() <= 1  # half black over white is mid grey
    assert tuple(pixels["rgba.png"][5, 5]) == GREEN
    assert np.abs(pixels["cmyk.jpg"][5, 5] - RED).max() < 10
    for name in ["grey16.png", "grey32.tif", "float.tif"]:
        row = pixels[name][0, :, 0]
        assert row[0] == 0 and row[-1] == 255, name  # stretched by the value range, not clipped or wrapped
        assert (np.diff(row) >= 0).all() and 100 < row[32] < 155, name  # order and spacing kept
    assert set(np.unique(pixels["bilevel.png"])) == {0, 255}
    assert tuple(pixels["photo.webp"][0, 0]) == BLUE and tuple(pixels["photo.bmp"][0, 0]) == GREEN
    with Image.open(tmp_path / "animated.gif") as gif, Image.open(tmp_path / "pages.tiff") as tiff:
        assert gif.n_frames == 2 and tiff.n_frames == 2
    assert tuple(pixels["animated.gif"][5, 5]) == RED  # first frame
    assert tuple(pixels["pages.tiff"][5, 5]) == GREEN  # first page
    assert loaded["rotated.jpg"].size == (30, 60)  # stored 60x30, displayed upright
    top, bottom = pixels["rotated.jpg"][5, 15], pixels["rotated.jpg"][-5, 15]
    assert np.abs(top - RED).max() < 30 and np.abs(bottom - BLUE).max() < 30  # the left half turned to the top


def test_bad_files_are_skipped_each_with_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 200_000)  # a 600x600 image stands in for a bomb
    write_good_images(tmp_path)
    bad = write_bad_images(tmp_path)
    paths, skipped = data.readable_images(tmp_path)
    assert {path.name for path, _ in skipped} == bad
    assert len(paths) == 15
    reasons = {path.name: reason for path, reason in skipped}
    for name, reason in reasons.items():
        assert name in reason and "\n" not in reason, reason
    assert "empty" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "too small" in reasons["tiny.png"]
    assert "limit of 200,000" in reasons["bomb.png"]
    assert "200:1" in reasons["strip.png"]


def test_folder_where_nothing_loads_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_text("not an image")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(data.DataError, match="none of the 2 image files") as error:
        data.readable_images(tmp_path)
    assert "\n" not in str(error.value)


def test_max_pixels_shrinks_within_bound_keeping_aspect(tmp_path):
    path = tmp_path / "wide.png"
    halves((1000, 300), RED, BLUE).save(path)
    for max_pixels in [10_000, 50_000, 123_457]:
        image = data.load_image(path, max_pixels=max_pixels)
        assert image.width * image.height <= max_pixels
        assert image.width * image.height > 0.95 * max_pixels  # shrunk no more than needed
        assert abs(image.width / image.height - 1000 / 300) < 0.05
    assert data.load_image(path, max_pixels=10_000_000).size == (1000, 300)  # never enlarged
    assert data.load_image(path).size == (1000, 300)


class SizeOnly:
    """What _downscale reads of an image; resize returns the size it was asked for."""
    def __init__(self, width, height):
        self.width, self.height, self.size = width, height, (width, height)

    def resize(self, size, resample):
        return size


def test_shrinking_never_makes_an_image_longer_or_larger_than_allowed():
    rng = np.random.default_rng(0)
    for _ in range(5000):
        short = int(rng.integers(28, 2000))
        width, height = sorted((short, int(short * rng.uniform(1, data.MAX_ASPECT))), key=lambda _: rng.random())
        max_pixels = int(rng.integers(784, width * height))
        new_width, new_height = data._downscale(SizeOnly(width, height), max_pixels)
        assert 1 <= new_width * new_height <= max_pixels
        assert max(new_width, new_height) * min(width, height) <= max(width, height) * min(new_width, new_height)


@pytest.mark.parametrize("size, max_pixels", [((28, 5600), 12_544), ((29_990, 150), 4_194_304)])
def test_a_long_image_shrunk_stays_within_what_the_image_processor_takes(tmp_path, size, max_pixels):
    """Both are within 200:1; rounding the short side down used to take them past it."""
    path = tmp_path / "long.png"
    Image.new("RGB", size, RED).save(path)
    image = data.load_image(path, max_pixels=max_pixels)
    assert max(image.size) <= data.MAX_ASPECT * min(image.size)
    _, image_processor = load_processors("tiny", max_pixels=max_pixels)
    assert image_processor(images=[image], return_tensors="pt")["image_grid_thw"].shape == (1, 3)


def test_non_finite_pixels_take_the_ends_of_the_finite_range(tmp_path):
    values = np.tile(np.linspace(-1, 1, 64, dtype=np.float32), (32, 1))
    values[5, :3] = [np.inf, -np.inf, np.nan]
    Image.fromarray(values).save(tmp_path / "inf.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings from the stretch
        pixels = np.asarray(data.load_image(tmp_path / "inf.tif"))[..., 0].astype(int)
    assert pixels[0, 0] == 0 and pixels[0, -1] == 255 and 100 < pixels[0, 32] < 155  # stretched by -1..1
    assert list(pixels[5, :3]) == [255, 0, 0]


def test_an_image_without_read_permission_says_so(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    Image.new("RGB", (64, 64), RED).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(data.Image, "open", refuse)
    with pytest.raises(data.DataError, match="not readable \\(permission denied\\)"):
        data.load_image(path)

# -----------------------------------------------------------------------------
# Part 2: shapes, recounted from the pixels alone


def blobs_of_colour(pixels, rgb):
    """4-connected blobs of one exact colour, found by joining runs of pixels that touch across rows."""
    mask = np.all(pixels == rgb, axis=-1).astype(np.int8)
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))), axis=1)
    starts, ends = np.argwhere(edges == 1).tolist(), np.argwhere(edges == -1).tolist()  # row-major: they pair up
    runs = [(y, start, end) for (y, start), (_, end) in zip(starts, ends)]
    parent = list(range(len(runs)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    in_row = {}
    for i, (y, start, end) in enumerate(runs):
        for j in in_row.get(y - 1, []):
            if start < runs[j][2] and runs[j][1] < end:
                parent[root(j)] = root(i)
        in_row.setdefault(y, []).append(i)
    groups = {}
    for i, run in enumerate(runs):
        groups.setdefault(root(i), []).append(run)
    return [blob_stats(group) for group in groups.values()]


def blob_stats(runs):
    area = sum(end - start for _, start, end in runs)
    x0, x1 = min(start for _, start, _ in runs), max(end for _, _, end in runs) - 1
    y0, y1 = min(y for y, _, _ in runs), max(y for y, _, _ in runs)
    fill = area / ((x1 - x0 + 1) * (y1 - y0 + 1))
    # a square fills its box, a circle pi/4 of it, a triangle half; the gaps between are wide
    assert fill > 0.97 or 0.72 < fill < 0.84 or 0.42 < fill < 0.62, fill
    kind = "square" if fill > 0.97 else "circle" if fill > 0.72 else "triangle"
    return {"kind": kind, "area": area, "x0": x0, "x1": x1, "y0": y0, "y1": y1, "extent": max(x1 - x0, y1 - y0) + 1}


def pixel_blobs(image):
    pixels = np.asarray(image)
    known = np.zeros(pixels.shape[:2], bool)
    blobs = []
    for colour, rgb in data.PALETTE.items():
        known |= np.all(pixels == rgb, axis=-1)
        blobs += [dict(blob, colour=colour) for blob in blobs_of_colour(pixels, rgb)]
    known |= np.all(pixels == data.BACKGROUND, axis=-1)
    assert known.all(), "a pixel is neither background nor a palette colour (anti-aliasing?)"
    return blobs


def count(blobs, phrase):
    """'red shapes', 'circles' or 'red circles' counted among the blobs."""
    words = phrase.split()
    colour = words[0] if len(words) == 2 else None
    kind = None if words[-1] == "shapes" else words[-1].removesuffix("s")
    assert colour in (None, *data.PALETTE) and kind in (None, *data.KINDS), phrase
    return sum((colour is None or b["colour"] == colour) and (kind is None or b["kind"] == kind) for b in blobs)


def the(blobs, colour, kind):
    matches = [b for b in blobs if (b["colour"], b["kind"]) == (colour, kind)]
    assert len(matches) == 1, f"'the {colour} {kind}' names {len(matches)} shapes"
    return matches[0]


def clearly_larger(a, b):
    # the scene promises 1.5x in ideal area; rasterising small shapes costs some of that
    return a["area"] >= 1.3 * b["area"] and a["extent"] >= b["extent"]


def expected_answer(question, blobs):
    """(category, answer) for a question, from the blobs alone."""
    if m := re.fullmatch(r"How many more (.+) than (.+) are there\?", question):
        difference = count(blobs, m[1]) - count(blobs, m[2])
        assert difference >= 0
        return "arithmetic", str(difference)
    if m := re.fullmatch(r"How many (.+) and (.+) are there in total\?", question):
        return "arithmetic", str(count(blobs, m[1]) + count(blobs, m[2]))
    if m := re.fullmatch(r"How many (.+) are there\?", question):
        return "counting", str(count(blobs, m[1]))
    if m := re.fullmatch(r"What colour is the (largest|smallest) shape\?", question):
        ranked = sorted(blobs, key=lambda b: b["area"], reverse=m[1] == "largest")
        pick = ranked[0]
        others = ranked[1:]
        assert all(clearly_larger(pick, o) if m[1] == "largest" else clearly_larger(o, pick) for o in others)
        return "colour", pick["colour"]
    if m := re.fullmatch(r"What colour is the (circle|square|triangle)\?", question):
        of_kind = [b for b in blobs if b["kind"] == m[1]]
        assert len(of_kind) == 1
        return "colour", of_kind[0]["colour"]
    relation = r"(to the left of|to the right of|above|below)"
    if m := re.fullmatch(rf"Is the (\w+) (\w+) {relation} the (\w+) (\w+)\?", question):
        a, b = the(blobs, m[1], m[2]), the(blobs, m[4], m[5])
        lo, hi = ("x0", "x1") if m[3] in ("to the left of", "to the right of") else ("y0", "y1")
        assert a[hi] < b[lo] or b[hi] < a[lo], "the two shapes overlap on the asked axis"
        before = a[hi] < b[lo]  # a is left of / above b
        return "spatial", "yes" if before == (m[3] in ("to the left of", "above")) else "no"
    if m := re.fullmatch(r"Which is (larger|smaller), \(A\) the (\w+) (\w+) or \(B\) the (\w+) (\w+)\? "
                         r"Answer with the letter\.", question):
        a, b = the(blobs, m[2], m[3]), the(blobs, m[4], m[5])
        big = "A" if clearly_larger(a, b) else "B" if clearly_larger(b, a) else None
        assert big is not None, "no clear size difference"
        return "size", big if m[1] == "larger" else {"A": "B", "B": "A"}[big]
    raise AssertionError(f"no template matches {question!r}")


def test_make_scene_is_deterministic_per_seed():
    assert data.make_scene(7) == data.make_scene(7)
    assert np.array_equal(np.asarray(data.render(data.make_scene(7))), np.asarray(data.render(data.make_scene(7))))
    assert len({str(data.make_scene(seed)) for seed in range(20)}) == 20
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert data.scene_questions(data.make_scene(7), rng_a) == data.scene_questions(data.make_scene(7), rng_b)


def test_shapes_are_separate_and_inside_the_canvas():
    for seed in range(60):
        scene = data.make_scene(seed)
        assert data.MIN_SHAPES <= len(scene.shapes) <= 8
        boxes = [data._bbox(s) for s in scene.shapes]
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 and 0 <= y0 and x1 < scene.width and y1 < scene.height
            for bx0, by0, bx1, by1 in boxes[i + 1:]:
                assert x1 < bx0 or bx1 < x0 or y1 < by0 or by1 < y0, "bounding boxes overlap"
        blobs = pixel_blobs(data.render(scene))
        assert len(blobs) == len(scene.shapes)  # none merged into or hidden by another
        drawn = Counter((b["colour"], b["kind"]) for b in blobs)
        assert drawn == Counter((s.colour, s.kind) for s in scene.shapes)


def test_benchmark_is_balanced_deterministic_and_well_formed():
    bench = data.shapes_benchmark(500, seed=0)
    assert len(bench) == 500 and len({r["id"] for r in bench}) == 500
    assert Counter(r["category"] for r in bench) == {c: 100 for c in data.CATEGORIES}
    again = data.shapes_benchmark(500, seed=0)
    assert [(r["question"], r["answer"]) for r in bench] == [(r["question"], r["answer"]) for r in again]
    other = data.shapes_benchmark(500, seed=1)
    assert [r["question"] for r in bench] != [r["question"] for r in other]
    for r in bench:
        assert r["image"].size == (224, 224) and isinstance(r["scene"], data.Scene)
        if r["category"] == "size":
            assert r["answer"] in ("A", "B") and len(r["choices"]) == 2
            assert all(choice in r["question"] for choice in r["choices"])
        else:
            assert r["choices"] is None
            assert re.fullmatch(r"\d+|yes|no|" + "|".join(data.PALETTE), r["answer"]), r["answer"]
    answers = Counter(r["answer"] for r in bench if r["category"] in ("spatial", "size"))
    assert min(answers["yes"], answers["no"]) > 30 and min(answers["A"], answers["B"]) > 30  # no answer bias


def test_every_benchmark_answer_matches_a_recount_of_the_pixels():
    bench = data.shapes_benchmark(500, seed=0)
    blobs_of = {}
    for r in bench:
        key = id(r["image"])
        if key not in blobs_of:
            blobs_of[key] = pixel_blobs(r["image"])
        category, answer = expected_answer(r["question"], blobs_of[key])
        assert (category, answer) == (r["category"], r["answer"]), r["question"]
    templates = Counter(re.sub(r"red|green|blue|yellow|purple|orange|circle|square|triangle", "_", r["question"])
                        for r in bench)
    assert len(templates) >= 12  # the benchmark uses the whole range of templates


def test_shapes_folder_round_trips_and_differs_from_the_benchmark(tmp_path):
    paths = data.write_shapes_folder(tmp_path / "shapes", 6, seed=0)
    assert [p.name for p in paths] == [f"shapes_{i:05d}.png" for i in range(6)]
    readable, skipped = data.readable_images(tmp_path / "shapes")
    assert skipped == [] and readable == paths
    generated = data.shapes_images(6, seed=0)
    for path, made in zip(readable, generated):
        assert np.array_equal(np.asarray(data.load_image(path)), np.asarray(made))
    benchmark_images = {r["image"].tobytes() for r in data.shapes_benchmark(50, seed=0)}
    assert not benchmark_images & {image.tobytes() for image in data.shapes_images(50, seed=0)}


# -----------------------------------------------------------------------------
# Questions read back into answers, the easier world's knobs, scenes beside their images

EASY_WORLD = dict(size=112, grid=4, min_shapes=2, max_shapes=6, colours=["red", "green", "blue", "yellow"])


def test_every_generated_question_reads_back_to_its_own_answer_and_category():
    rng = np.random.default_rng(0)
    seen = Counter()
    for seed in range(600):
        scene = data.make_scene(seed, **(EASY_WORLD if seed % 3 == 0 else {}))
        for q in data.scene_questions(scene, rng):
            assert data.true_answer(q["question"], scene) == q["answer"], q
            assert data.question_category(q["question"]) == q["category"], q
            assert data.true_answer(f"  {q['question']}\n", scene) == q["answer"]  # surrounding spaces only
            groups = data.question_shapes(q["question"], scene)
            assert all(s in scene.shapes for g in groups for s in g)
            if q["category"] == "counting":
                assert len(groups[0]) == int(q["answer"])
            seen[q["category"]] += 1
    assert set(seen) == set(data.CATEGORIES) and min(seen.values()) > 100


def scene_of(*shapes):
    """Shapes given as (kind, colour, x, y, size) on a 224 canvas."""
    return data.Scene(224, 224, data.BACKGROUND, [data.Shape(*s) for s in shapes])


def test_true_answer_on_a_hand_made_scene():
    scene = scene_of(("circle", "red", 30, 30, 30), ("square", "red", 120, 30, 40), ("circle", "blue", 30, 150, 60))
    assert data.true_answer("How many circles are there?", scene) == "2"
    assert data.true_answer("How many red shapes are there?", scene) == "2"
    assert data.true_answer("How many green triangles are there?", scene) == "0"
    assert data.true_answer("How many purple shapes are there?", scene) == "0"  # a colour the scene lacks: 0
    assert data.true_answer("How many circles and squares are there in total?", scene) == "3"
    assert data.true_answer("How many more red shapes than blue shapes are there?", scene) == "1"
    assert data.true_answer("What colour is the square?", scene) == "red"
    assert data.true_answer("What colour is the largest shape?", scene) == "blue"
    assert data.true_answer("Is the red square to the right of the blue circle?", scene) == "yes"
    assert data.true_answer("Is the blue circle above the red square?", scene) == "no"
    assert data.true_answer("Which is smaller, (A) the blue circle or (B) the red square? Answer with the letter.",
                            scene) == "B"
    assert [[s.colour for s in g] for g in data.question_shapes("How many circles are there?", scene)] == [["red", "blue"]]


@pytest.mark.parametrize("question", [
    "How many circles are there",                       # no question mark
    "how many circles are there?",                      # case
    "How many  circles are there?",                     # spacing inside
    "How many pink shapes are there?",                  # not a palette colour
    "How many circle are there?",                       # singular
    "How many red shapes circles are there?",
    "What colour is the circle?",                       # two circles: no one answer
    "What colour is the triangle?",                     # none
    "What colour is the smallest shape?",               # 30 vs 40 square: no clear margin over all
    "How many more blue shapes than red shapes are there?",  # fewer: a false premise
    "How many circles and circles are there in total?",  # the same phrase twice
    "How many circles and red shapes are there in total?",  # a kind with a colour: not a template
    "How many red circles and blue circles are there in total?",
    "Is the red circle to the left of the blue circle?",  # they overlap on x
    "Is the green circle above the blue circle?",        # no green circle
    "Is the red circle above the red circle?",
    "Which is larger, (A) the red circle or (B) the red square? Answer with the letter.",  # no clear margin
    "Which is larger, (A) the red circle or (B) the blue circle?",  # the instruction cut off
    "",
    None,
])
def test_near_misses_have_no_true_answer(question):
    # the red square is 1.45 times the red circle's area: no clear margin (1.5) between them
    scene = scene_of(("circle", "red", 30, 30, 30), ("square", "red", 120, 30, 32), ("circle", "blue", 40, 150, 60))
    assert data.true_answer(question, scene) is None


def test_question_category_needs_the_grammar_not_the_scene():
    assert data.question_category("What colour is the triangle?") == "colour"
    assert data.question_category("How many more circles than squares are there?") == "arithmetic"
    assert data.question_category("Is the red circle below the blue square?") == "spatial"
    assert data.question_category("How many pink shapes are there?") is None
    assert data.question_category("What is in the image?") is None


def test_scene_questions_asks_only_the_given_categories():
    rng = np.random.default_rng(1)
    asked = {q["category"] for seed in range(50)
             for q in data.scene_questions(data.make_scene(seed, **EASY_WORLD), rng, ("counting", "colour"))}
    assert asked == {"counting", "colour"}


def test_grid_scenes_put_one_shape_in_each_used_cell_of_the_chosen_colours():
    for seed in range(60):
        scene = data.make_scene(seed, **EASY_WORLD)
        assert 2 <= len(scene.shapes) <= 6
        assert {s.colour for s in scene.shapes} <= set(EASY_WORLD["colours"])
        cells = set()
        for s in scene.shapes:
            x0, y0, x1, y1 = data._bbox(s)
            assert x0 // 28 == x1 // 28 and y0 // 28 == y1 // 28, "a shape crosses a 28-pixel patch border"
            cells.add((x0 // 28, y0 // 28))
        assert len(cells) == len(scene.shapes)
        blobs = pixel_blobs(data.render(scene))  # drawn as the scene says, each its own blob
        assert Counter((b["colour"], b["kind"]) for b in blobs) == Counter((s.colour, s.kind) for s in scene.shapes)


def test_shapes_folder_stores_each_scene_and_the_image_reader_skips_that_file(tmp_path):
    paths = data.write_shapes_folder(tmp_path, 5, seed=3, **EASY_WORLD)
    assert (tmp_path / data.SCENES_FILE).is_file()
    assert data.find_images(tmp_path) == paths and data.readable_images(tmp_path) == (paths, [])
    scenes = data.load_scenes(tmp_path)
    assert list(scenes) == [p.name for p in paths]
    for path in paths:
        assert np.array_equal(np.asarray(data.render(scenes[path.name])), np.asarray(data.load_image(path)))
    assert [scenes[p.name] for p in paths] == [data.make_scene(s, **EASY_WORLD) for s in data._image_seeds(5, 3)]
    with pytest.raises(data.DataError, match="scenes.jsonl"):
        data.load_scenes(tmp_path / "elsewhere")


def test_grade_candidates_against_a_hand_made_scene():
    scene = data.Scene(112, 112, (255, 255, 255), [data.Shape("circle", "red", 20, 20, 14),
                                                   data.Shape("square", "red", 80, 20, 20),
                                                   data.Shape("triangle", "blue", 50, 80, 20)])

    def record(question, silver, kept, image="a.png"):
        return {"image": image, "question": question, "valid": question is not None, "silver": silver, "kept": kept}
    records = [record("How many red shapes are there?", "2", True),     # answerable, silver right
               record("What colour is the triangle?", "red", True),     # answerable, silver wrong
               record("Why is the sky blue?", "1", True),               # not the grammar: no true answer
               record("How many red shapes are there?", "3", False),    # not kept: not in the accuracy
               record(None, None, False),                               # invalid: not asked
               record("How many red shapes are there?", "2", True, image="unknown.png")]  # no scene
    grades = data.grade_candidates(records, {"a.png": scene})
    assert [r.get("true_answer") for r in records] == ["2", "blue", None, "2", None, None]
    assert [r.get("answerable") for r in records] == [True, True, False, True, False, None]
    assert records[0]["category"] == "counting" and records[1]["category"] == "colour"
    assert grades == {"answerable_frac": 3 / 4, "silver_accuracy": 1 / 3,
                      "categories": {"counting": 2, "colour": 1, "other": 1},
                      "kept_categories": {"counting": 1, "colour": 1, "other": 1}}
    assert data.grade_candidates(records[-1:], {"a.png": scene}) == {}  # no scene known: no grades


def test_counted_says_what_a_counting_question_counts():
    assert data.counted("How many red shapes are there?") == ("red", None)
    assert data.counted(" How many circles are there?") == (None, "circle")
    assert data.counted("How many blue triangles are there?") == ("blue", "triangle")
    assert data.counted("How many circles and squares are there in total?") is None
    assert data.counted("What colour is the circle?") is None
    assert data.counted("How many pink shapes are there?") is None


@pytest.mark.parametrize("world", [dict(EASY_WORLD, grid=2, max_shapes=4), {}])
def test_distinct_scenes_never_repeat_a_colour_and_kind(world):
    repeats = 0
    for seed in range(100):
        names = [(s.colour, s.kind) for s in data.make_scene(seed, **world, distinct=True).shapes]
        assert len(set(names)) == len(names)
        plain = [(s.colour, s.kind) for s in data.make_scene(seed, **world).shapes]
        repeats += len(set(plain)) < len(plain)
    assert repeats > 10  # without the knob they do repeat


def test_a_large_jpeg_is_decoded_reduced_to_about_the_size_it_is_shrunk_to(tmp_path, monkeypatch):
    """A photo far above max_pixels decodes at a JPEG reduction (the decoder's own 1/2 .. 1/8), not in
    full and then resized: the pixels decoded, their size and what comes out."""
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((100, 100, 1))).astype(np.uint8)  # 3000 x 4000
    Image.fromarray(smooth).save(tmp_path / "photo.jpg", quality=90)
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: (decoded.append(self.size), real_load(self))[1])
    image = data.load_image(tmp_path / "photo.jpg", max_pixels=448 * 448)
    assert decoded and decoded[0][0] * decoded[0][1] <= 4000 * 3000 / 16, decoded  # 1/4 a side at least
    monkeypatch.undo()
    full = data._downscale(Image.open(tmp_path / "photo.jpg").convert("RGB"), 448 * 448)
    assert image.size == full.size == (517, 388)  # the docstring's example
    difference = np.abs(np.asarray(image, dtype=float) - np.asarray(full, dtype=float)).mean()
    assert difference < 4, difference  # the same picture, up to the reduction's own filtering
