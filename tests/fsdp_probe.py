"""Under ``torchrun`` (gloo on CPU): the real ``vlsi interact`` with accelerate switched to FSDP2, the engine of
``configs/accelerate/fsdp2.yaml`` (one unit per decoder and vision block), and what each process saw.

``python -m torch.distributed.run --nproc_per_node 2 fsdp_probe.py RESULT vlsi-args...``

accelerate runs FSDP only on GPUs; here its state is switched to FSDP2 right after it is made (the same
``fully_shard`` calls, on the CPU), and everything else is the unchanged command. Each process writes
``RESULT.<rank>.json``:

- ``synced``: per micro-batch, whether its backward reduce-scattered gradients (FSDP2's post-backward of any
  unit found gradient sync on).
- ``teacher_load``: ``{"rss_before", "peak"}`` bytes of this process around loading the teacher (peak RSS
  reset just before).
- ``resident``: bytes of parameters this process holds at the first optimizer step: ``teacher`` (its
  backbone), ``teacher_verbalizers``, ``student`` (the trained module: student and its verbalizers).
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
from torch.distributed.tensor import DTensor

# What configs/accelerate/fsdp2.yaml wraps for Qwen2-VL.
WRAPPED = ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]

seen: dict = {"synced": [], "resident": None, "teacher_load": None}


class FSDP2OnCPU(Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Both shared states: an AcceleratorState made later copies the PartialState's type over its own.
        PartialState().distributed_type = self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=WRAPPED,
            reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT",
        )

    def backward(self, loss, **kwargs):
        reduced.clear()
        super().backward(loss, **kwargs)
        seen["synced"].append(any(reduced))


# FSDP2 decides in each unit's post-backward whether to reduce-scatter its gradients (``reduce_grads``, which
# ``set_requires_gradient_sync`` sets): recorded there, per backward.
reduced: list[bool] = []
_post_backward = FSDPParamGroup.post_backward


def _recorded_post_backward(self, *args, **kwargs):
    reduced.append(bool(self.reduce_grads))
    return _post_backward(self, *args, **kwargs)


FSDPParamGroup.post_backward = _recorded_post_backward


def held_bytes(params) -> int:
    """Bytes of the parameters this process stores: a sharded one's local shard, others whole; shared
    parameters once."""
    unique = {id(p): p for p in params}.values()
    local = [p.to_local() if isinstance(p, DTensor) else p for p in unique]
    return sum(t.numel() * t.element_size() for t in local)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(result: str, args: list[str]) -> int:
    import vlsi.train.interact as interact
    import vlsi.train.runtime as runtime
    import vlsi.train.training as training
    from vlsi.run.cli import main as vlsi

    runtime.Accelerator = FSDP2OnCPU
    load_teacher, optimizer_step = interact._load_teacher, training.optimizer_step
    teacher = {}

    def measured_load(cfg, accelerator):
        rss = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        teacher["backbone"], teacher["verbalizers"] = load_teacher(cfg, accelerator)
        seen["teacher_load"] = {"rss_before": rss, "peak": _status("VmHWM")}
        return teacher["backbone"], teacher["verbalizers"]

    def recorded_step(accelerator, module, *rest):
        if seen["resident"] is None:
            seen["resident"] = {
                "teacher": held_bytes(teacher["backbone"].model.parameters()),
                "teacher_verbalizers": held_bytes(teacher["verbalizers"].parameters()),
                "student": held_bytes(module.parameters()),
            }
        return optimizer_step(accelerator, module, *rest)

    interact._load_teacher, training.optimizer_step = measured_load, recorded_step
    code = vlsi(args)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(f"{result}.{rank}.json", "w") as f:
        json.dump(seen, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
