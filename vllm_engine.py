"""The optional vLLM rollout engine (paper §3): y ~ S_θ(·|x) sampled by vLLM's offline engine in the trainer's
process, in `rollout.generate_rollouts`' layout, synced to the student after every step and checked to sample
from the student's own distribution (`check_on_policy`), so training stays on-policy.
"""
from __future__ import annotations

import copy
import os
import random
import tempfile

import numpy
import torch

import pair
import tip
from rollout import Rollouts, encode_for_sampling, stop_and_pad_ids, to_rollouts


def require_vllm():
    """The vllm module, or an InputError that says how to install it (the core install does without it)."""
    try:
        import vllm
    except ImportError as error:
        raise tip.InputError(f"the vLLM engine needs vllm ({error}): pip install -r requirements-vllm.txt") from error
    return vllm


class OffPolicyError(RuntimeError):
    """The rollout engine's distribution is not the student's (VLLMEngine.check_on_policy)."""


def engine_weights(model):
    """(name, full tensor) under every name the student holds a parameter by. named_parameters() lists a shared
    tensor once, so a head tied to the embeddings (Qwen3 0.6B-4B, Llama 3.2) would never reach the engine's
    `lm_head.weight`, which then keeps its dummy initialisation. A sharded parameter is gathered once."""
    names: dict[torch.nn.Parameter, list[str]] = {}
    for name, p in tip.unwrap(model).named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(name)
    for p, aliases in names.items():
        full = p.full_tensor() if tip.is_sharded(p) else p.detach()
        for name in aliases:
            yield name, full


class VLLMEngine:
    """Rollouts y ~ S_θ(·|x) (§3) from vLLM's offline engine, in this process beside the trainer.

    Create it once from the student; after every optimizer step (and after a resume) `sync(student)` pushes
    θ into it, so the samples stay on-policy. `generate` returns exactly `generate_rollouts`' layout, stop
    tokens and sampling (temperature and top-p only). On GPU, `sleep()` frees the engine's memory for the
    training step; the next `sync` wakes it. `dtype` "auto" is bf16 where vLLM runs on GPU, fp32 on CPU.
    """

    def __init__(self, model, tokenizer, max_model_len: int | None = None, gpu_memory_utilization: float = 0.5,
                 dtype="auto", seed: int = 0, check_every: int = 1, check_tolerance: float = 0.0):
        vllm = require_vllm()
        from vllm.platforms import current_platform
        # in-process: a separate engine process would re-import the caller's main module
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        on_cpu = current_platform.is_cpu()
        if on_cpu:  # vLLM's CPU backend otherwise reserves gpu_memory_utilization of all RAM
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB
        inner = tip.unwrap(model)
        self.tokenizer, self.device = tokenizer, next(inner.parameters()).device
        self.eos, self.pad = stop_and_pad_ids(inner, tokenizer)
        # vLLM builds the model from a folder: config and tokenizer only; the weights come from sync()
        self._folder = tempfile.TemporaryDirectory(prefix="tip-vllm-")
        config = copy.deepcopy(inner.config)
        config.architectures = config.architectures or [type(inner).__name__.removeprefix("FSDP")]
        config.save_pretrained(self._folder.name)
        tokenizer.save_pretrained(self._folder.name)
        self._devices = [] if on_cpu else [torch.cuda.current_device()]
        states = random.getstate(), numpy.random.get_state()
        with torch.random.fork_rng(devices=self._devices):  # vLLM reseeds every generator of the process
            self.llm = vllm.LLM(
                model=self._folder.name, load_format="dummy", seed=seed, max_model_len=max_model_len,
                dtype=pair.torch_dtype(dtype, "cpu" if on_cpu else "cuda"), enforce_eager=on_cpu,
                gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=not on_cpu,
                # a partly prefilled request rewinds its seeded generator, which CPU generators cannot do
                enable_chunked_prefill=not on_cpu,
                generation_config="vllm",  # no sampling defaults from the model's generation config
                # under torchrun each rank runs its own engine on its own GPU (LOCAL_RANK)
                distributed_executor_backend="external_launcher" if tip.world_size() > 1 else None)
        random.setstate(states[0])
        numpy.random.set_state(states[1])
        self.can_sleep, self.asleep, self.stale = not on_cpu, False, True
        # a mismatch from an unsynced weight is several nats; rounding is ~1e-5 in fp32, a few tenths in bf16
        fp32 = self.llm.llm_engine.model_config.dtype == torch.float32
        self.check_every, self.check_tolerance = check_every, check_tolerance or (0.05 if fp32 else 1.0)
        self.syncs, self.last_gap = 0, None
        try:
            self.sync(model)
        except BaseException:  # an engine that failed its first check is shut down, not left holding vLLM's state
            self.close()
            raise

    def sync(self, model) -> None:
        """Load the current weights θ of the transformers `model` into the engine (waking it if asleep), then,
        every `check_every` syncs, `check_on_policy`. Sharded FSDP2 parameters are gathered with full_tensor(),
        a collective: every rank must call this."""
        self.wake_up()
        # the model runner's in-place reload; the model's own load_weights fails once vLLM repacked the weights
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=engine_weights(model),
                                                              is_checkpoint_format=True))
        self.llm.reset_prefix_cache()  # cached prompt keys and values came from the old weights
        self.stale = False
        self.syncs, self.last_gap = self.syncs + 1, None
        if self.check_every and (self.syncs - 1) % self.check_every == 0:
            self.check_on_policy(model)

    def check_on_policy(self, model) -> float:
        """The largest |log p| difference between the engine and `model` (its autocast precision) over a short
        probe: a fixed prompt and the engine's greedy continuation. Above `check_tolerance` on any rank, every
        rank raises OffPolicyError: the engine holds other weights, and its rollouts would not be the student's."""
        from vllm import SamplingParams
        probe = self.tokenizer("On-policy probe: 12 + 34 = 46, so the answer is", add_special_tokens=False).input_ids
        params = SamplingParams(max_tokens=16, temperature=0, logprobs=0, prompt_logprobs=0, detokenize=False,
                                ignore_eos=True)
        out = self.llm.generate([{"prompt_token_ids": probe}], params, use_tqdm=False)[0]
        tokens = probe + list(out.outputs[0].token_ids)
        steps = out.prompt_logprobs[1:] + out.outputs[0].logprobs  # steps[i] holds log p(tokens[i + 1])
        engine = torch.tensor([step[token].logprob for step, token in zip(steps, tokens[1:])], dtype=torch.float64)
        inner = tip.unwrap(model)
        was_training = inner.training
        with torch.no_grad(), tip.autocast(self.device):
            inner.eval()  # no dropout: the engine has none
            logits = model(input_ids=torch.tensor([tokens], device=self.device)).logits[0, :-1]
            inner.train(was_training)
        student = logits.double().log_softmax(-1).gather(-1, torch.tensor(tokens[1:], device=self.device)[:, None])
        gaps = (engine - student[:, 0].cpu()).abs()
        worst = int(gaps.argmax())
        gap = tip.all_reduce_max(float(gaps[worst]), self.device)
        self.last_gap = gap
        if gap > self.check_tolerance:
            raise OffPolicyError(
                f"the vLLM engine's log-probabilities differ from the student's by up to {gap:.3g} nats (tolerance "
                f"{self.check_tolerance:g}; on this rank at probe token {worst + 1} of {len(tokens) - 1}, engine "
                f"{float(engine[worst]):.3f} vs student {float(student[worst, 0]):.3f}): the engine does not hold the "
                "student's weights, so its rollouts would be another model's. A parameter the sync did not reach? "
                "Stopping; --engine hf samples from the student itself")
        return gap

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights and KV cache) during the training step. vLLM has no sleep
        mode on CPU, where this does nothing."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)  # level 2 discards the weights too: the next sync() overwrites them anyway
            self.asleep, self.stale = True, True

    def wake_up(self) -> None:
        """Take the memory back; the weights are stale until the next sync()."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down (as garbage collection would). vLLM's teardown also destroys torch.distributed's
        default process group, the training one under torchrun: keep one engine for the whole run and close it
        after the last collective (then skip dist.destroy_process_group())."""
        self.llm.llm_engine.engine_core.shutdown()
        self._folder.cleanup()

    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature=1.0, top_p=1.0, seed=None,
                 show_progress=False) -> Rollouts:
        """`generate_rollouts` through the engine: same layout, stop tokens and sampling; temperature 0 is
        greedy. With a `seed` the samples are reproducible, whatever else the engine runs."""
        encoded = encode_for_sampling(self.tokenizer, prompts, n, max_new_tokens)
        responses = self._sample(encoded, n, [max_new_tokens] * len(encoded), temperature, top_p, seed, show_progress)
        return to_rollouts(self.tokenizer, encoded, responses, n, self.eos, self.pad, self.device)

    def sample_tokens(self, contexts: list[list[int]], max_new_tokens: list[int], temperature=1.0, top_p=1.0,
                      seed=None) -> list[list[int]]:
        """One continuation of each token context, at most max_new_tokens[i] tokens, up to and with its stop token:
        `rollout.sample_tokens` through the engine, for the turns of `rollout.generate_conversations`."""
        return self._sample(contexts, 1, max_new_tokens, temperature, top_p, seed)

    def _sample(self, encoded: list[list[int]], n: int, max_new_tokens: list[int], temperature: float, top_p: float,
                seed: int | None, show_progress: bool = False) -> list[list[int]]:
        """n responses per token context (context-major), each its own length limit, ending at a stop token."""
        from vllm import SamplingParams
        if self.stale:
            raise ValueError("the engine's weights are stale after sleep(): call sync(model) first")
        limit = self.llm.llm_engine.model_config.max_model_len
        if (longest := max(len(ids) + new for ids, new in zip(encoded, max_new_tokens))) > limit:
            raise ValueError(f"context + max_new_tokens = {longest} exceeds the engine's max_model_len {limit}: "
                             "rollouts would be cut short")
        copies = n if temperature <= 0 else 1  # vLLM decodes greedily once per prompt: n equal rows
        # vLLM seeds the n samples of a request with s, s + 1, ...: each prompt draws its own s
        draw = random.Random(seed)
        params = [SamplingParams(n=n // copies, max_tokens=new, temperature=max(temperature, 0.0), top_p=top_p,
                                 top_k=0, seed=None if seed is None else draw.randrange(2 ** 31), detokenize=False,
                                 ignore_eos=True, stop_token_ids=self.eos)  # our EOS list only
                  for new in max_new_tokens]
        with torch.random.fork_rng(devices=self._devices, enabled=seed is not None):  # vLLM draws from it too
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params,
                                        use_tqdm=show_progress)
        return [list(c.token_ids) for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)
                for _ in range(copies)]
