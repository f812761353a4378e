"""Running: the last stage, what a user calls. The ``vlsi`` command line (``cli``, with step configs read from
flags and YAML by ``config``), the whole distillation as resumable stages (``distill``; the tiny baselines in
``pipeline``), evaluation (``evaluate``), the plots of a run (``figures``), and ``vlsi plan``: a recipe's layers,
parameter counts and per-GPU memory from model configs alone (``plan``, ``memory``)."""
