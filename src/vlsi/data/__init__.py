"""Data: the first stage. Chat records on disk (``records``: the JSONL format, the :class:`Encoder` that turns
a record into token ids and labels, :class:`ChatDataset` and the resumable :class:`BatchStream`), the
processor that turns images and text into a model family's inputs (``processing``), and two deterministic
synthetic sets small enough to train on a CPU (``digits``: the tiny setting's seven-segment digit task;
``synth``: the earlier grid of coloured shapes)."""
