"""Commands beside the method: pretrain.py (the shapes world's small base model), report.py (a
run folder as one HTML page), bench.py (speed and memory figures). Each runs as
`python tools/NAME.py ...`."""
