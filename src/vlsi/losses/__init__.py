"""Losses: pure tensor functions over model outputs. Response-token bookkeeping and cross-entropy (``tokens``),
the divergences between teacher and student distributions (``divergences``), their memory-bounded chunked
forms over the vocabulary (``chunked``), the same against a cached teacher's top-k distribution (``sparse``),
and the layer matching of the interaction step (``matching``). Unit-tested on hand-made tensors; no training
loop, optimizer or files."""
