"""What each distributed engine needs beyond ``accelerator.prepare``: the frozen teacher's loading and
placement (sharded as it loads under FSDP2; refused under ZeRO-3), the vision tower run on every micro-batch
of a multi-process run, DeepSpeed's batch settings, and whole weights for loading and exporting a sharded run.

accelerate prepares what is trained (the student, its verbalizers, the optimizer); a frozen model that must
be sharded but never stepped (the 72B teacher) is left to us, as TRL does for its reference models.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

log = logging.getLogger("vlsi.train.engines")


def configure_deepspeed(accelerator: Accelerator, cfg) -> None:
    """Fills what DeepSpeed reads from a dataloader we do not have, and keeps its stepping ours.

    The loops step once per window and normalise the loss by the window's global tokens themselves;
    DeepSpeed would instead step per backward and divide the loss by its own accumulation count, so
    only one micro-batch per step is exact under it.
    """
    if cfg.grad_accum != 1:
        raise ValueError(
            f"--grad-accum {cfg.grad_accum} is not supported under DeepSpeed (it steps and rescales the loss "
            "per backward); use --grad-accum 1 with a larger --batch-size, or FSDP2 / DDP"
        )
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    config["train_batch_size"] = cfg.batch_size * accelerator.num_processes
    config["gradient_accumulation_steps"] = 1
    if cfg.max_grad_norm:
        config["gradient_clipping"] = cfg.max_grad_norm


# Side of the blank stand-in image: the processors resize it to their smallest input (Qwen2-VL: 56 x 56 px,
# 16 patches; LLaVA-OneVision: its smallest anyres layout), so the extra vision forward is a small one.
STAND_IN_PIXELS = 56


def vision_on_every_batch(accelerator: Accelerator, model: nn.Module, processor) -> None:
    """Over several processes, a trained model's micro-batch without an image still runs the vision tower.

    Without ``pixel_values`` the model's forward skips the vision tower. Under FSDP2 (one unit per vision
    block) and ZeRO-3 the other processes then all-gather vision weights while this one gathers decoder
    layers: the collectives pair up wrongly, a crash or a hang part-way through any run whose data mixes in
    text-only records; under DDP a trained vision tower's gradients are awaited from a process that has none.
    So, as LLaVA-style trainers do, such a micro-batch also runs the vision tower (with its projector) on a
    blank stand-in image, right after the token embedding, where the real forward runs it, and adds its
    features times zero to the embeddings: the same collectives in the same order on every process, the
    loss and gradients unchanged (exact zeros). One process: nothing is installed, nothing changes.
    """
    if accelerator.num_processes == 1:
        return
    from PIL import Image

    from vlsi.model.backbone import Backbone

    backbone = Backbone(model)
    inner, image_token = backbone._inner, processor.image_token_id
    blank = Image.new("RGB", (STAND_IN_PIXELS, STAND_IN_PIXELS))
    stand_in = processor.process_images([blank])

    def hook(module: nn.Module, args, output: torch.Tensor):
        # Training forwards only: generation (evaluation) embeds one new token at a time, with no image.
        if not module.training or bool((args[0] == image_token).any()):
            return None
        inputs = {k: v.to(output.device) for k, v in stand_in.items()}
        features = inner.get_image_features(**inputs)
        zero = sum(t.float().sum() for t in _float_tensors(features)) * 0.0
        return output + zero.to(output.dtype)

    backbone.embed_tokens.register_forward_hook(hook)


def _float_tensors(value) -> list[torch.Tensor]:
    """The floating-point tensors in a model output (a ModelOutput, tuple or list, nested)."""
    if torch.is_tensor(value):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _float_tensors(item)]
    return []


def refuse_frozen_under_zero3(accelerator: Accelerator, what: str) -> None:
    """ZeRO-3 is not offered for a frozen model (step 1's backbone, step 2's live teacher, the teacher-cache
    pass): refused before any weights load, naming why.

    Such a model is loaded whole on every process (its verbalizers copy its final norm; ``zero.Init`` is
    off, :func:`whole_load`), and DeepSpeed's engine moves a module without partitioned parameters whole onto
    its GPU before it partitions it: Qwen2-VL-72B is 146 GB in bf16, more than any one GPU, and every process
    would first hold it in host RAM. The chunked losses cannot read a partitioned head either. FSDP2 places
    it (decoder layers sharded as they load, :func:`load_frozen_sharded`).
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise ValueError(
            f"{what} under DeepSpeed ZeRO-3 is not offered: the frozen model would be loaded whole on every "
            "process and moved whole onto one GPU before DeepSpeed partitions it (a 72B teacher is 146 GB in "
            "bf16), and the chunked losses cannot read a partitioned head. Use FSDP2 "
            "(configs/accelerate/fsdp2.yaml) for steps 1 and 2; under ZeRO-3 run step 2 with --teacher-cache "
            "(a cache built under FSDP2 or DDP) and step 3"
        )


def prepare_frozen(accelerator: Accelerator, model: torch.nn.Module, layers: torch.nn.ModuleList):
    """A frozen model (the teacher) placed for inference under the run's engine; never in the optimizer.

    - single process / DDP: moved to the device, whole on every process (DDP has nothing to synchronise).
    - FSDP2: each of ``layers`` (the decoder layers, nearly all of a 72B model's weights) is sharded with
      ``fully_shard`` and gathered only for its own forward; the embeddings, final norm, head and vision
      tower stay whole on every process, so the verbalizers can call the head outside the model's forward.
    - DeepSpeed ZeRO-1/2: its own inference engine, no optimizer, replicated (what TRL does for reference
      models). ZeRO-3 is refused before loading (:func:`refuse_frozen_under_zero3`).

    Returns what to call for a forward: the model itself, or under DeepSpeed its engine (whose forward marks
    the pass for ZeRO-3's parameter fetching). Either way ``model``'s submodules are the ones that run.
    """
    model.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _deepspeed_inference(accelerator, model)
    if accelerator.distributed_type == DistributedType.FSDP:
        if not getattr(accelerator, "is_fsdp2", False):
            raise ValueError(
                "the frozen teacher is sharded with FSDP2; set fsdp_version: 2 (configs/accelerate/fsdp2.yaml)"
            )
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):  # load_frozen shards as it loads
            shard_frozen_layers(model, layers)
    return model.to(accelerator.device)


class NeedsConversion(ValueError):
    """A checkpoint whose tensors are not the model's by renaming alone (fused or split tensors, as a mixture
    of experts' fused experts): it cannot be read row by row into shards."""


def load_frozen(accelerator: Accelerator, path: str, dtype: torch.dtype) -> nn.Module:
    """A frozen model (step 1's backbone, step 2's teacher), in eval mode without gradients.

    Under FSDP2 it is built sharded (:func:`load_frozen_sharded`): no process ever holds more of it than
    its share of the decoder layers and the parts kept whole. Elsewhere ``from_pretrained`` loads it whole
    on each process (DDP and ZeRO-1/2 hold it whole anyway; ZeRO-3 is refused before this).
    """
    from vlsi.model.loading import load_model

    if accelerator.distributed_type == DistributedType.FSDP:
        try:
            return load_frozen_sharded(path, dtype, accelerator.device).eval().requires_grad_(False)
        except NeedsConversion as e:
            # Loaded whole, then sharded by prepare_frozen: correct, but each process holds the whole model
            # in host RAM while it loads.
            log.warning("%s: %s; loading it whole on every process, then sharding", path, e)
    with whole_load(accelerator):
        model = load_model(path, dtype=dtype)
    return model.eval().requires_grad_(False)


def load_frozen_sharded(path: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model at ``path`` as :func:`shard_frozen_layers` places it, read without ever being whole in memory.

    Loading whole on every process, then sharding, needs the whole model in host RAM once per process
    (146 GB x 8 for a 72B teacher in bf16). Instead (as ``fsdp_cpu_ram_efficient_loading`` does for a trained
    model, but with no process holding it all): the model is built on the meta device (buffers, such as the
    rotary frequencies, computed as usual), its decoder layers sharded there, storage allocated on ``device``
    for this process's shards and the whole parts only, and each tensor filled from the checkpoint files with
    just the rows this process keeps (:class:`vlsi.model.partial_load.Checkpoint`). Checkpoint names are
    mapped to the model's as ``from_pretrained`` maps them (transformers' conversion mapping).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlsi.model.backbone import Backbone
    from vlsi.model.loading import resolve_model
    from vlsi.model.partial_load import Checkpoint

    name = resolve_model(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(name), dtype=dtype)
    model.tie_weights()  # built on the meta device the declared ties are not made
    checkpoint = Checkpoint(name)
    sources = _checkpoint_names(model, checkpoint)
    # Tied parameters (a head sharing the embedding) are one tensor under several names; allocating storage
    # unties them, so they are tied again after, and read once, under whichever name the checkpoint has.
    tied: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(key)
    shard_frozen_layers(model, Backbone(model).layers)
    buffers = {key: b.clone() for key, b in model.named_buffers()}
    model.to_empty(device=device)
    for first, *others in tied.values():
        for other in others:
            owner, _, leaf = other.rpartition(".")
            setattr(model.get_submodule(owner), leaf, model.get_parameter(first))
    names = {group[0]: group for group in tied.values()}
    with torch.no_grad():
        for key, buffer in model.named_buffers():  # to_empty left them uninitialised
            buffer.copy_(buffers[key])
        for key, param in model.named_parameters():
            key = next((k for k in names.get(key, [key]) if k in sources), key)
            if key not in sources:
                raise ValueError(f"{name}: no weights for {key} in the checkpoint")
            _read_local(checkpoint, sources[key], param)
    return model


def _read_local(checkpoint, name: str, param: torch.Tensor) -> None:
    """This process's part of ``param`` read from tensor ``name`` of ``checkpoint``: its rows of a sharded
    (DTensor) parameter, the whole of any other."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        checkpoint.read_rows(name, 0, param)
        return
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    assert tuple(local.shape) == tuple(shape), (name, local.shape, shape)
    checkpoint.read_rows(name, offset[0] if offset else 0, local)


def _checkpoint_names(model: nn.Module, checkpoint) -> dict[str, str]:
    """``{model parameter or buffer name: checkpoint tensor name}``, renamed as ``from_pretrained`` renames
    (older checkpoints say ``model.layers.*`` and ``visual.*`` for v5's ``model.language_model.layers.*`` and
    ``model.visual.*``). A checkpoint that needs more than renaming (fused or split tensors) is refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    wanted = model.state_dict()
    prefix = model.base_model_prefix
    out = {}
    for stored in checkpoint.tensors:
        key, converter = rename_source_key(stored, renamings, converters, prefix, wanted)
        if key not in wanted and stored in wanted:
            key, converter = rename_source_key(stored, [], [], prefix, wanted)
        if converter is not None:
            raise NeedsConversion(
                f"checkpoint tensor {stored!r} needs a weight conversion, not read sharded here"
            )
        if key in wanted:
            out[key] = stored
    return out


def shard_frozen_layers(model: torch.nn.Module, layers: torch.nn.ModuleList) -> None:
    """FSDP2 for inference: each of ``layers`` sharded over all processes, everything else left whole.

    Each layer is all-gathered for its own forward and resharded after it, so a process holds its shards plus
    one whole layer at a time. The model itself is wrapped too, managing nothing (its other parameters are
    ignored): without a root above them each layer would be its own root, and FSDP2 keeps a root's parameters
    whole after forward, expecting a backward that a frozen model never runs. Sharding happens before any move,
    so only a process's shards reach its device.
    """
    from torch.distributed.fsdp import fully_shard

    in_layers = {id(p) for p in layers.parameters()}
    rest = {p for p in model.parameters() if id(p) not in in_layers}
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True, ignored_params=rest)


def load_frozen_verbalizers_sharded(
    path: str, backbone, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """A frozen model's verbalizers as :func:`prepare_frozen_verbalizers` places them under FSDP2, read as
    :func:`load_frozen_sharded` reads the model: built on the meta device, each verbalizer sharded (its own
    unit), and only this process's rows read from ``verbalizers.safetensors``, in ``dtype``. Loading them whole
    first would hold the 72B teacher's 20 (4.0B parameters, 16 GB in fp32) in every process's host RAM."""
    from vlsi.model.partial_load import Checkpoint
    from vlsi.model.verbalizer import WEIGHTS_FILE, Verbalizers

    with torch.device("meta"):
        verbalizers = Verbalizers.for_model(path, backbone)
    verbalizers.to(device="meta", dtype=dtype).eval().requires_grad_(False)
    _shard_each_verbalizer(verbalizers)
    verbalizers.to_empty(device=device)
    stored = Checkpoint(path, WEIGHTS_FILE)
    with torch.no_grad():
        for key, param in verbalizers.named_parameters():
            _read_local(stored, key, param)
    return verbalizers


def _shard_each_verbalizer(verbalizers: nn.Module) -> None:
    """FSDP2 over each verbalizer, its own unit, gathered for its own forward and resharded after it."""
    from torch.distributed.fsdp import fully_shard

    for module in verbalizers.per_layer.values():
        fully_shard(module, reshard_after_forward=True)


def prepare_frozen_verbalizers(accelerator: Accelerator, verbalizers: nn.Module) -> nn.Module:
    """The frozen teacher's verbalizers (20 x 3 hidden^2 for a 72B teacher: 4.0B parameters, 7.5 GiB in
    bf16) placed for inference: under FSDP2 each verbalizer is sharded over all processes, its own unit,
    gathered for its own forward and resharded after it (``reshard_after_forward=True``, also as a root); whole
    on every process otherwise. Every process must then run the same verbalizers in the same order, which
    the step-2 losses and the teacher cache do (each teacher layer once per micro-batch, in order)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        _shard_each_verbalizer(verbalizers)
    return verbalizers.to(accelerator.device)


@contextlib.contextmanager
def whole_weights(accelerator: Accelerator, module: torch.nn.Module):
    """Every parameter of ``module`` whole on every process while inside: for exporting a sharded run, or
    for calling its parts outside the engine's forward (step 1's held-out metrics).

    Enter it on all processes (it gathers), then write from the main process only. ZeRO-3 gathers in place and
    drops the copies on exit. FSDP2's own unshard leaves storage that safetensors cannot read, so each sharded
    parameter is gathered with ``full_tensor`` and swapped for a plain tensor, the sharded one restored on
    exit. Elsewhere it does nothing.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
        return
    from torch.distributed.tensor import DTensor

    swapped = []
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if isinstance(param, DTensor):
                full = param.full_tensor()  # a collective: every process takes part
                owner._parameters[name] = nn.Parameter(full.detach(), param.requires_grad)
                swapped.append((owner, name, param))
    try:
        yield
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


@contextlib.contextmanager
def whole_load(accelerator: Accelerator):
    """``from_pretrained`` inside loads whole weights on each process, also under ZeRO-3 (which would otherwise
    partition them while loading): the verbalizers copy the final norm of the model they are loaded onto.
    Used for the trained student (small); a frozen model is not offered ZeRO-3 (:func:`refuse_frozen_under_zero3`)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    # accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says, and
    # transformers then partitions while loading; unregistered here, registered again after.
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def _deepspeed_inference(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    import copy

    import deepspeed

    refuse_frozen_under_zero3(accelerator, "a frozen model")  # callers refuse earlier, before loading it
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    # Below ZeRO-3 nothing of a frozen model is partitioned: each process holds it whole.
    config.setdefault("zero_optimization", {})["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
