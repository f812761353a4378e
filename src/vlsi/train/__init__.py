"""Training steps: the losses applied to the models over the data. The shared runtime (``runtime``: the
accelerator, batches and the guarded optimizer step; ``training``: the resumable loop; ``checkpointing``;
``optim``; ``engines``: DDP / FSDP2 / ZeRO-3) and the steps built on it: step 1 verbalization
(``verbalize``), step 2 interaction (``interact``, optionally against a cached teacher: ``teacher_cache``,
``teacher_cache_build``), step 3 supervised fine-tuning (``sft``), and the vision-encoder pre-training of the
tiny setting (``vision_pretrain``)."""
