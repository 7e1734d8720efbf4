"""The teacher/student pair of TIP (paper §3): T and S_θ share one tokenizer, and their logits are hidden @ headᵀ.

score.py computes P_S and P_T of Eqs. 1–3 from final hidden states and head weights, chunk by chunk, so a pair is
checked before any weight is read: one tokenizer, no logit transform after the head (docs/decisions.md, "Logits
from hidden states"), heads of different widths cut to the shared rows ("Head widths").
"""
from __future__ import annotations

from pathlib import Path

import torch

import tip

# Config attributes that transform logits after the head (Gemma 2, Cohere, Granite, Falcon-H1). score.py
# computes Eqs. 1–3 from hidden states and head weights alone, so such a model would be scored wrongly.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


def resolve_model(name: str, role: str, online: bool) -> str:
    """The folder or hub id to load `name` from, or an InputError naming what is missing and how to get it."""
    import huggingface_hub
    if tip.looks_local(name) and not Path(name).expanduser().is_dir():
        raise tip.InputError(f"{role} path {name!r} does not exist (or is not a folder)")
    if tip.looks_local(name):
        return str(Path(name).expanduser())
    if not online and not isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        raise tip.InputError(f"{role} {name!r} is a hub id, but the hub is offline (HF_HUB_OFFLINE=1 or no network) "
                             f"and it is not cached: pass a local folder (`hf download {name} --local-dir DIR` "
                             f"elsewhere)")
    return name


def check_logit_config(config, name: str) -> None:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(text_config, attr, None)
        if value is not None and (attr == "final_logit_softcapping" or value != 1):
            raise tip.InputError(f"{name}: logits are transformed after the head ({attr}={value}), but TIP scores "
                                 f"tokens from hidden @ headᵀ (Eqs. 1–3); this model family is not supported")


def check_head(model: torch.nn.Module) -> None:
    """Refuse a model whose logits are not exactly hidden @ Wᵀ (head bias, logit scaling, softcapping):
    score.py computes P_S and P_T of Eqs. 1–3 from final hidden states and head weights, in chunks."""
    model = tip.unwrap(model)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    check_logit_config(model.config, name)
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or getattr(head, "bias", None) is not None:
        raise tip.InputError(f"{name}: TIP needs an LM head without a bias, logits = hidden @ headᵀ (Eqs. 1–3)")


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The head W [V, d], logits = hidden @ Wᵀ (see `check_head`): the P of Eqs. 1–3."""
    return tip.unwrap(model).get_output_embeddings().weight


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None = None):
    """Hidden states [B, L, d] after the final norm, one per context c_t = (x, y_<t) (§3), without logits:
    score.py multiplies chunks of them by `lm_head_weight`. Positions count real tokens, as generate does with
    left padding (or are given: packed rows restart them, see `packed`). A DDP/FSDP2-wrapped model runs through
    its wrapper (gradient sync, parameter gathering) with logits for no position, and the decoder's output is
    taken by a forward hook."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    inner = tip.unwrap(model)
    decoder = inner.get_decoder()
    if model is inner and not tip.is_sharded(model):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state
    captured = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=input_ids.new_zeros(0))
    finally:
        handle.remove()
    return captured[0]


def trimmed(batch, rows: slice):
    """A micro-batch of rollouts without the columns that are padding in all of its rows."""
    attention = batch.attention_mask[rows]
    used = attention.any(0).nonzero()
    columns = slice(int(used[0]), int(used[-1]) + 1) if used.numel() else slice(0, 0)
    return batch.input_ids[rows, columns], attention[:, columns], batch.response_mask[rows, columns]


def packed(batch, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real tokens of `rows` laid end to end in one row [1, T] (no padding), with positions that restart at
    each rollout, and its response mask: the model's attention keeps each rollout to itself, as transformers
    reads the rollouts' bounds from the positions (FlashAttention's variable-length path; a block-diagonal mask
    for the others)."""
    real = batch.attention_mask[rows].bool()
    lengths = real.sum(1)
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    position_ids = torch.arange(int(lengths.sum()), device=real.device) - starts
    return batch.input_ids[rows][real][None], position_ids[None], batch.response_mask[rows][real][None]


def packs_rows(model, padding_free: str) -> bool:
    """Whether `model` runs a micro-batch as one packed row (--padding-free on/off, or auto: where its attention
    has a variable-length path, FlashAttention's, so packed rows cost no more than their tokens; the other
    implementations mask a block diagonal over the whole packed row)."""
    variable_length = "flash" in str(getattr(tip.unwrap(model).config, "_attn_implementation", ""))
    return padding_free == "on" or (padding_free == "auto" and variable_length)


def response_hidden_states(model, batch, rows, padding_free: str = "off") -> torch.Tensor:
    """Final hidden states [N, d] at the contexts of the response tokens of `rows`, in row-major order: the
    hidden state at position p predicts the token at p + 1. With `packs_rows(model, padding_free)` the rows are
    packed into one (`packed`); a rollout's first token is a prompt token, so no context crosses rollouts.
    No rows (an FSDP2 rank out of micro-batches): the first row runs with the other ranks' forwards and none of
    it is returned, still attached to the model's graph, so its backward reduces zeros with theirs."""
    if packs_rows(model, padding_free):
        input_ids, position_ids, mask = packed(batch, rows or [0])
        hidden = final_hidden_states(model, input_ids, None, position_ids)[:, :-1][mask[:, 1:].bool()]
    else:
        input_ids, attention_mask, mask = trimmed(batch, rows or [0])
        hidden = final_hidden_states(model, input_ids, attention_mask)[:, :-1][mask[:, 1:].bool()]
    return hidden if rows else hidden[:0]


def torch_dtype(dtype: str | torch.dtype, device) -> torch.dtype:
    """"auto" is bf16 on GPU and fp32 on CPU; a name such as "bfloat16" or a torch.dtype is taken as given."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def attention_implementation(name: str, device) -> str | None:
    """--attn-implementation: "auto" is FlashAttention 2 on a GPU where the flash_attn package is installed (its
    variable-length path lets --padding-free micro-batches cost only their tokens), else transformers' default."""
    import importlib.util
    if name != "auto":
        return name
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def load_pair(teacher: str, student: str, device, dtype="auto", attention="auto"):
    """(teacher T, student S_θ, tokenizer) of §3 from local folders or hub ids. T is frozen (eval mode, no
    grads); "auto" dtype is bf16 on GPU, fp32 on CPU. Paths, hub, tokenizers and logit transforms are checked
    before any weight is read. Heads of different widths are allowed: scores use the shared first
    min(V_s, V_t) rows (Qwen2.5 14B → 1.5B)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if not teacher or not student:
        raise tip.InputError("pass both --teacher and --student, or neither for a built-in world's pair")
    online = not all(map(tip.looks_local, (teacher, student))) and tip.hub_reachable()
    paths = {role: resolve_model(name, role, online) for role, name in (("teacher", teacher), ("student", student))}
    load = dict(local_files_only=not online)
    tokenizer = AutoTokenizer.from_pretrained(paths["student"], **load)
    teacher_tokenizer = AutoTokenizer.from_pretrained(paths["teacher"], **load)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise tip.InputError(f"teacher {teacher!r} and student {student!r} have different tokenizers "
                             f"({len(teacher_tokenizer)} vs {len(tokenizer)} tokens): Eqs. 1–3 compare distributions "
                             f"token by token; use a pair of one model family")
    for role, path in paths.items():
        check_logit_config(AutoConfig.from_pretrained(path, **load), f"{role} {path!r}")
    dtype = torch_dtype(dtype, device)
    attention = attention_implementation(attention, device)
    models = {role: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention, **load)
              .to(device) for role, path in paths.items()}
    for model in models.values():
        check_head(model)
    models["teacher"].eval().requires_grad_(False)
    widths = [lm_head_weight(models[role]).shape[0] for role in ("teacher", "student")]
    warning = "" if len(tokenizer) <= min(widths) else f" (warning: {len(tokenizer)} tokens)"
    tip.log(f"pair: teacher {teacher} ({widths[0]} head rows), student {student} ({widths[1]}); scores use the "
            f"shared first {min(widths)} rows{warning}")
    return models["teacher"], models["student"], tokenizer


def load_model(name: str, device, dtype="auto"):
    """(model, tokenizer) of one model from a folder or hub id, for evaluation: checked as `load_pair` checks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    online = not tip.looks_local(name) and tip.hub_reachable()
    path, load = resolve_model(name, "model", online), dict(local_files_only=not online)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **load)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, device), **load)
    except OSError as error:
        raise tip.InputError(f"model {name!r} could not be loaded ({error}); offline, pass a local folder") from error
    return model.to(device).eval(), tokenizer
