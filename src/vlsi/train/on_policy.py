"""On-policy step 2: a fraction of the batches answered by the current student, then judged layer by layer.

GKD (Agarwal et al., *On-Policy Distillation of Language Models*) trains a fraction ``lmbda`` of its batches on
the student's own outputs, because at inference the student conditions on its own tokens, never on the
dataset's. :class:`OnPolicyBatches` is step 2's batch source with that option: before each micro-batch it
draws, from a generator of its own, whether the batch is on-policy; if so, the current student answers each
record's prompt (and image) with HF ``generate`` (KV cache, the batch left-padded), and the micro-batch is
the prompt followed by that answer, labelled on the answer alone. Both models then run teacher-forced on it
and Algorithm 1 and the divergences apply unchanged (:mod:`vlsi.train.interact`).

- ``lmbda`` 0 is the paper's step 2 exactly: the ordinary batches, and no draw from any generator.
- The draws (and the sampling seed of each generated batch) come from one generator seeded by ``--seed``
  alone, the same on every process, so all processes generate on the same micro-batches. Its state is saved
  in the run's checkpoints, so a resumed run makes the same draws.
- Sampling (``gen_temperature`` > 0) runs under a forked RNG seeded from that generator: the global RNG is
  untouched and a resume samples the same tokens.
- A multi-turn record gets its *last* assistant turn generated, the earlier turns kept as in the data; only
  the generated turn is labelled. A record without an answer (its last turn the user's) is answered the same
  way, so ``lmbda`` 1 needs no answers at all.
- On one process and under DDP the trained student generates; under FSDP2 / ZeRO-3, a whole copy of it synced
  once per optimizer step (:class:`GenerationCopy`).
"""

from __future__ import annotations

import contextlib
import time

import torch
from accelerate.utils import DistributedType
from transformers import GenerationConfig

from vlsi.data.loading import BatchLoader, BuildBatch
from vlsi.data.records import IGNORE_INDEX, BatchStream, ChatDataset, RecordError, collate, record_name
from vlsi.model.backbone import MEDIA_TOKEN_KEYS
from vlsi.train.engines import whole_weights
from vlsi.train.runtime import Batch, append_jsonl

# Added to seed * 1000003 for the draws' generator: far from the match generators' seed * 1000003 + rank.
STREAM_OFFSET = 7_777_777
# The on-policy options: they change nothing when lmbda is 0, so a run resumes across them then.
OPTIONS = ("lmbda", "gen_temperature", "gen_max_new_tokens")


# Every logits processor a checkpoint's generation config may turn on, set to leave the distribution as it is:
# generate fills whatever a passed config leaves unset from the checkpoint's, and released ones set sampling
# defaults and a repetition penalty (Qwen2-VL-Instruct: top_k 1, top_p 0.001, repetition_penalty 1.05), while
# on-policy answers must come from the student's own distribution.
NEUTRAL_GENERATION = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "top_k": 0,
    "top_p": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "diversity_penalty": 0.0,
}


def validate(lmbda: float, temperature: float, max_new_tokens: int) -> None:
    if not 0 <= lmbda <= 1:
        raise ValueError(f"--lmbda is a fraction of batches, in [0, 1]; got {lmbda}")
    if temperature < 0:
        raise ValueError(f"--gen-temperature must be >= 0 (0 = greedy); got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"--gen-max-new-tokens must be >= 1; got {max_new_tokens}")


def media_token_ids(model) -> list[int]:
    """The ids of the model's media-placing tokens (image / video placeholders, vision start / end). A random or
    young student that wrote one would make the teacher-forced pass look for an image that is not there."""
    ids = set()
    for config in (model.config, getattr(model.config, "text_config", None)):
        for key in MEDIA_TOKEN_KEYS:
            value = getattr(config, key, None) if config is not None else None
            if isinstance(value, int) and value >= 0:
                ids.add(value)
    return sorted(ids)


def answer_tokens(row: torch.Tensor, eos_ids: set[int], pad_id: int | None) -> list[int]:
    """One generated row (new tokens only) up to and including its first end-of-turn token: the tokens the
    answer's labels hold, as the dataset's answers are labelled through their end-of-turn token. A row cut by
    the token budget is kept whole, less any padding."""
    tokens = []
    for token in row.tolist():
        tokens.append(token)
        if token in eos_ids:
            return tokens
    while tokens and tokens[-1] == pad_id and pad_id not in eos_ids:
        tokens.pop()
    return tokens


@torch.no_grad()
def generate_tokens(
    model, prompts: list[dict], pad_id: int, eos_id, max_new_tokens: int, temperature: float
) -> list[list[int]]:
    """The model's answer to each prompt (encoded as :meth:`vlsi.data.records.Encoder.encode_prompt` does),
    generated as one left-padded batch with the KV cache: greedy at temperature 0, else sampled from the
    whole distribution at that temperature (under the caller's RNG), with no other processing of the logits
    than the media tokens' suppression."""
    batch = collate([dict(p) for p in prompts], pad_id, padding_side="left")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        suppress_tokens=media_token_ids(model) or None,
        use_cache=True,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        **NEUTRAL_GENERATION,
    )
    out = model.generate(**batch, generation_config=config)
    eos = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    new = out[:, batch["input_ids"].shape[1] :].cpu()
    return [answer_tokens(row, eos, pad_id) for row in new]


def answered_item(prompt: dict, answer: list[int]) -> dict:
    """The training item: the prompt followed by the answer, labelled on the answer alone."""
    ids = prompt["input_ids"]
    tail = torch.tensor(answer, dtype=ids.dtype)
    item = {k: v for k, v in prompt.items() if k not in ("input_ids", "mm_token_type_ids", "attention_mask")}
    item["input_ids"] = torch.cat([ids, tail])
    item["labels"] = torch.cat([torch.full_like(ids, IGNORE_INDEX), tail])
    if "mm_token_type_ids" in prompt:  # the answer is text (media tokens are suppressed in generation)
        item["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(tail)])
    return item


def sharded(accelerator) -> bool:
    """Whether the run's engine shards the student's parameters (FSDP2, DeepSpeed ZeRO-3): generation then
    runs on a :class:`GenerationCopy`."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


class GenerationCopy:
    """A whole, plain copy of the student that generates where the trained one is sharded (FSDP2, ZeRO-3).

    Generating with the sharded student itself would gather each layer's parameters at every forward, a
    collective, while each process's answers end after a different number of tokens. Instead the trained
    weights are gathered once per optimizer step, through the engine's own context
    (:func:`vlsi.train.engines.whole_weights`: ``full_tensor`` per FSDP2 parameter, ZeRO-3's
    ``GatheredParameters``), into this copy, which then generates alone on each process. It costs one more
    whole student per process, held in the teacher's precision.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.step: int | None = None

    def sync(self, accelerator, module: torch.nn.Module, step: int) -> None:
        """The trained student's current weights into the copy; once per ``step``. A collective: every process
        calls it for the same steps (the on-policy draws are the same on all of them)."""
        if self.step == step:
            return
        with whole_weights(accelerator, module):
            trained = accelerator.unwrap_model(module).student.state_dict()
            self.model.load_state_dict(trained)  # copies (and casts) into the copy's own tensors
        self.step = step


@contextlib.contextmanager
def generating(accelerator, module: torch.nn.Module, copy: GenerationCopy | None = None, step: int = 0):
    """The model that generates, in eval mode (no dropout; gradient checkpointing, which would turn the KV cache
    off, is inactive) and restored to training mode after: on one process and under DDP the trained student,
    unwrapped (its forward needs no collective); under FSDP2 / ZeRO-3 ``copy``, synced first."""
    if copy is not None:
        copy.sync(accelerator, module, step)
        model = copy.model
    else:
        model = accelerator.unwrap_model(module).student
    was_training = model.training
    model.eval()
    try:
        with accelerator.autocast():
            yield model
    finally:
        model.train(was_training)


class OnPolicyBatches:
    """Step 2's ``fetch`` (:func:`vlsi.train.training.train`): the ordinary batch, or with probability ``lmbda``
    the same records answered by the current student.

    ``run`` is step 2's :class:`vlsi.train.training.Run`; ``encoder`` the dataset's. On-policy batches are
    logged on the main process to ``on_policy.jsonl`` (step, records, the decoded answers), and the time spent
    generating is kept for the summary. ``loader`` builds the ordinary batches (in ``DataLoader`` workers
    if it has them) and hands out the on-policy ones' records, so both come from the one order.
    """

    def __init__(
        self,
        run,
        cfg,
        processor,
        log_file,
        copy: GenerationCopy | None = None,
        loader: BatchLoader | None = None,
    ):
        self.run, self.cfg, self.processor, self.file, self.copy = run, cfg, processor, log_file, copy
        self.loader = loader or BatchLoader(BuildBatch(processor.pad_token_id))
        self.lmbda = cfg.lmbda
        # The same on every process: they all draw the same on-policy micro-batches.
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000003 + STREAM_OFFSET)
        self.batches = 0  # on-policy micro-batches of the whole run (restored on resume)
        self.seconds = 0.0  # spent generating in this process's session (as the summary's "seconds")

    def __call__(self, stream: BatchStream, dataset: ChatDataset, pad_id: int) -> Batch:
        if self.lmbda == 0:  # the paper's step 2: no draw at all
            return self.loader(stream, dataset)
        draw = torch.rand((), generator=self.generator).item()
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        if draw >= self.lmbda:
            return self.loader(stream, dataset)
        return self._generated(stream, dataset, pad_id, seed)

    def close(self) -> None:
        self.loader.close()

    def _generated(self, stream: BatchStream, dataset: ChatDataset, pad_id: int, seed: int) -> Batch:
        accelerator = self.run.accelerator
        for _ in range(1000):
            indices = self.loader.next_indices(stream, dataset)
            prompts, names = [], []
            for i in indices:
                try:
                    prompt, _ = dataset.encoder.encode_prompt(dataset.records[i], dataset.base, False)
                except RecordError as e:
                    dataset.skips.skip(str(dataset.path), i, dataset.records[i], e)
                    continue
                prompts.append(prompt)
                names.append(record_name(dataset.records[i], i))
            if prompts:
                break
        else:
            raise RuntimeError(f"{dataset.path}: 1000 consecutive batches had no usable record")
        started = time.perf_counter()
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        generator = generating(accelerator, self.run.module, self.copy, self.run.step)
        with torch.random.fork_rng(devices=devices), generator as model:
            # Each process its own stream of samples; the seed's generator restores them on resume.
            torch.manual_seed(seed + accelerator.process_index)
            answers = generate_tokens(
                model,
                prompts,
                pad_id,
                self.processor.tokenizer.eos_token_id,
                self.cfg.gen_max_new_tokens,
                self.cfg.gen_temperature,
            )
        self.seconds += time.perf_counter() - started
        self.batches += 1
        batch = Batch(collate([answered_item(p, a) for p, a in zip(prompts, answers, strict=True)], pad_id))
        batch.record_ids = names
        if accelerator.is_main_process:
            step = self.run.step + 1
            text = self.processor.tokenizer.batch_decode(answers, skip_special_tokens=True)
            append_jsonl(self.file, {"step": step, "records": names, "responses": text})
        return batch

    def state(self) -> dict:
        return {"on_policy": {"generator": self.generator.get_state().tolist(), "batches": self.batches}}

    def load(self, state: dict) -> None:
        saved = state.get("on_policy")
        if saved is not None:
            self.generator.set_state(torch.tensor(saved["generator"], dtype=torch.uint8))
            self.batches = saved["batches"]

    def summary(self, run_seconds: float) -> dict:
        """The summary's ``on_policy`` entry: how many micro-batches were generated and the share of this
        session's training time spent generating them."""
        return {
            "lmbda": self.lmbda,
            "batches": self.batches,
            "generation_seconds": round(self.seconds, 2),
            "generation_share": round(self.seconds / run_seconds, 4) if run_seconds > 0 else None,
        }
