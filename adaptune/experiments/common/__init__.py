"""What more than one experiment uses: settings checks and seeding (config.py), the bases (encoders.py for
encoders, causal.py for causal LMs), the datasets registry and its reader (datasets.py, data.py), the fine-tuning
methods (methods.py), pooled encoding and the learning-rate schedule (training.py), the quantized bases of
--quantize (quantize.py), run directories and results files (runs.py), tables (tables.py) and the machine a result
was measured on (machine.py).

It imports no experiment: multitask/, vae/ and fewshot/ import it (and not each other); .importlinter holds
the rule."""
