"""Runs the real ``vlsi`` command line and records what its first optimizer step saw.

``python grad_probe.py DUMP.pt vlsi-args...`` (alone, or under ``accelerate launch``) runs ``vlsi`` unchanged
except that, just before the first optimizer step, the main process writes ``DUMP.pt``:
``{"loss": the global loss of the step, "grads": {name: gradient after the cross-process reduction},
"world": processes}``. The tests compare these between process counts, batch sizes and accumulation.

The loss is read from what each process hands to ``accelerator.backward`` (its share of the global token
mean, scaled by the number of processes because DDP averages gradients), summed over the accumulation window
and all processes and divided by the number of processes: the global mean whatever the loops log.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager

import torch
from accelerate import Accelerator

# Where the training loop of every step (vlsi.train.training) looks up the optimizer step.
STEP_MODULES = ("vlsi.train.training",)


@contextmanager
def probe(dump_path):
    """While active, ``vlsi`` training steps write their first step's loss and gradients to ``dump_path``."""
    seen = {"loss": 0.0, "done": False}
    original_backward = Accelerator.backward

    def backward(self, loss, **kwargs):
        if not seen["done"]:
            seen["loss"] += loss.detach().float().item()
        return original_backward(self, loss, **kwargs)

    def wrap(optimizer_step):
        def step(accelerator, module, optimizer, scheduler, max_grad_norm, *args):
            if not seen["done"]:
                seen["done"] = True
                total = torch.tensor(seen["loss"], device=accelerator.device)
                loss = accelerator.reduce(total, "sum").item() / accelerator.num_processes
                params = accelerator.unwrap_model(module).named_parameters()
                grads = {name: p.grad.detach().cpu().clone() for name, p in params if p.grad is not None}
                if accelerator.is_main_process:
                    torch.save({"loss": loss, "grads": grads, "world": accelerator.num_processes}, dump_path)
            return optimizer_step(accelerator, module, optimizer, scheduler, max_grad_norm, *args)

        return step

    patched = []
    for name in STEP_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "optimizer_step"):
            patched.append((module, module.optimizer_step))
            module.optimizer_step = wrap(module.optimizer_step)
    Accelerator.backward = backward
    try:
        yield
    finally:
        Accelerator.backward = original_backward
        for module, original in patched:
            module.optimizer_step = original


if __name__ == "__main__":
    from vlsi.run.cli import main

    with probe(sys.argv[1]):
        code = main(sys.argv[2:])
    sys.exit(code)
