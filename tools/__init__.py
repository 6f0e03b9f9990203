"""Commands beside the method: pretrain.py (the shapes world's small base model), report.py (a
run folder as one HTML page), ablation_page.py (an ablation's results as one HTML page; a module
ablate.py imports), bench.py (speed and memory figures). Each runs as
`python tools/NAME.py ...`."""
