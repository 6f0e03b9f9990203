"""See it learn, cut down: the shapes demonstration (examples/shapes_demo.py) at a few minutes' size
must still show self-play helping. A base pretrained for 400 steps, two iterations of self-play and
of its random-label control, greedy accuracy on 200 held-out questions. Fails if the vote's silver
labels are no better than the control's random ones, or if the trained Reasoner does not beat the
control's (and its own base) on held-out questions."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import shapes_demo  # noqa: E402

QUICK = shapes_demo.Plan(pretrain=("--steps", "400", "--guess-steps", "100", "--eval-questions", "0"), iterations=2,
                         train_images=128, held_out=200, samples=0, runs=("selfplay", "random_labels"),
                         every_iteration=False)


@pytest.mark.slow
def test_self_play_beats_its_random_label_control(tmp_path):
    result = shapes_demo.demo(tmp_path, seed=0, plan=QUICK)
    accuracy = {name: r["accuracy"] for name, r in result["models"].items()}
    silver = [v for v in result["silver_accuracy"].values() if v is not None]
    random = [v for v in result["controls_silver_accuracy"]["random_labels"].values() if v is not None]
    print(accuracy, silver, random)
    # the vote's labels: right more often than chance (a count of 0-4) and than labels drawn without it
    assert len(silver) == QUICK.iterations and min(silver) > 0.4 and sum(silver) / len(silver) > max(random) + 0.1
    # ... and what they teach holds on scenes never trained on
    assert accuracy["iter_2"] > accuracy["random_labels"] + 0.15 and accuracy["iter_2"] > accuracy["base"] + 0.15
