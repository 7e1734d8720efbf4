"""rollout.py: the response mask covers exactly the sampled tokens y of y ~ S_θ(·|x) (§3), EOS included."""
import copy

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen3Config, Qwen3ForCausalLM

import data
import rollout
from conftest import char_tokenizer

QUESTIONS = ["1+2", "34*5-6", "7", "(8+9)*10-11"]  # different lengths, so rows are left-padded differently




@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.3, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    # float64 so that greedy decoding cannot flip on rounding between differently padded batches
    return Qwen3ForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [data.format_prompt(tokenizer, q) for q in QUESTIONS]


def forward_logits(model, r):
    """Plain full-vocabulary forward over the rollouts, positions counted over real tokens as in generate."""
    position_ids = (r.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=position_ids).logits


def check_layout(r, tokenizer, prompts, n, eos_ids, pad_id):
    """Every row: [pad.. prompt | sampled tokens up to the first EOS | pad..], checked token by token."""
    width = int(r.prompt_lengths.max())
    assert r.input_ids.shape == r.attention_mask.shape == r.response_mask.shape
    assert r.response_mask.dtype == torch.bool and len(r.texts) == len(prompts) * n
    assert r.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(n)]
    lengths = []
    for b in range(r.input_ids.shape[0]):
        prompt = tokenizer(prompts[int(r.prompt_index[b])], add_special_tokens=False).input_ids
        pad = width - len(prompt)
        assert int(r.prompt_lengths[b]) == len(prompt)
        assert r.input_ids[b, pad:width].tolist() == prompt
        assert r.attention_mask[b, :width].tolist() == [0] * pad + [1] * len(prompt)
        assert not r.response_mask[b, :width].any()
        response = r.input_ids[b, width:].tolist()
        end = next((t for t, token in enumerate(response) if token in eos_ids), len(response) - 1)
        expected = [True] * (end + 1) + [False] * (len(response) - end - 1)
        assert r.response_mask[b, width:].tolist() == expected
        assert r.attention_mask[b, width:].tolist() == [int(e) for e in expected]
        assert response[end + 1:] == [pad_id] * (len(response) - end - 1)
        assert r.texts[b] == tokenizer.decode(response[:end + 1], skip_special_tokens=True)
        lengths.append(end + 1)
    return lengths


@pytest.mark.parametrize("pad_mode", ["pad", "eos", "none"])
def test_mask_covers_exactly_the_sampled_tokens(model, tokenizer, prompts, pad_mode):
    tokenizer = copy.deepcopy(tokenizer)
    if pad_mode == "eos":
        tokenizer.pad_token = tokenizer.eos_token  # pad == EOS: a mask built from pad comparisons would break
    elif pad_mode == "none":
        tokenizer.pad_token = None  # Llama-3 style: rollout pads with EOS
    max_new = 40
    r = rollout.generate_rollouts(model, tokenizer, prompts, n=3, max_new_tokens=max_new, temperature=1.0, seed=3)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = check_layout(r, tokenizer, prompts, 3, {tokenizer.eos_token_id}, pad_id)
    assert min(lengths) < max_new and max(lengths) == r.input_ids.shape[1] - int(r.prompt_lengths.max())
    ended_early = [b for b, length in enumerate(lengths) if length < max_new]
    assert all(r.input_ids[b, int(r.prompt_lengths.max()) + lengths[b] - 1] == tokenizer.eos_token_id
               for b in ended_early)


def test_shift_reproduces_the_sampled_distribution(model, tokenizer, prompts):
    """hidden at p predicts p+1: the logits at [:, :-1][response_mask[:, 1:]] are those the tokens came from."""
    top_p = 0.3  # a nucleus of a few tokens, so a misaligned position would fall outside it
    r = rollout.generate_rollouts(model, tokenizer, prompts, n=2, max_new_tokens=24, top_p=top_p, seed=5)
    probs = forward_logits(model, r)[:, :-1][r.response_mask[:, 1:]].softmax(-1)
    tokens = r.input_ids[r.response_mask]
    mass_above = (probs * (probs > probs.gather(1, tokens[:, None]))).sum(-1)
    assert tokens.numel() > 50 and (mass_above < top_p + 1e-9).all()
    # the same check without the shift fails: the test can tell
    wrong = forward_logits(model, r)[r.response_mask].softmax(-1)
    assert not ((wrong * (wrong > wrong.gather(1, tokens[:, None]))).sum(-1) < top_p).all()


def test_greedy_rows_end_at_eos_from_the_generation_config(model, tokenizer, prompts):
    model = copy.deepcopy(model)
    first = rollout.generate_rollouts(model, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0)
    width = int(first.prompt_lengths.max())
    row = first.input_ids[0, width:].tolist()
    # an EOS the row reaches after a few steps: a token whose first occurrence is at step >= 2
    step = next(t for t, token in enumerate(row) if t >= 2 and token not in row[:t])
    model.generation_config.eos_token_id = [row[step], tokenizer.eos_token_id]
    r = rollout.generate_rollouts(model, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0)
    lengths = check_layout(r, tokenizer, prompts, 1, {row[step], tokenizer.eos_token_id}, tokenizer.pad_token_id)
    assert lengths[0] == step + 1 and r.input_ids[0, width:width + step + 1].tolist() == row[:step + 1]
    logits = forward_logits(model, r)[:, :-1][r.response_mask[:, 1:]]
    assert torch.equal(logits.argmax(-1), r.input_ids[r.response_mask])


def test_left_padding_and_sub_batches_match_single_prompts(model, tokenizer, prompts):
    kwargs = dict(n=2, max_new_tokens=12, temperature=0)
    whole = rollout.generate_rollouts(model, tokenizer, prompts, **kwargs)
    split = rollout.generate_rollouts(model, tokenizer, prompts, batch_size=3, **kwargs)
    for field in ("input_ids", "attention_mask", "response_mask", "prompt_lengths", "prompt_index"):
        assert torch.equal(getattr(whole, field), getattr(split, field)), field
    assert whole.texts == split.texts
    for i, prompt in enumerate(prompts):  # alone, without padding, each prompt gives the same response
        alone = rollout.generate_rollouts(model, tokenizer, [prompt], **kwargs)
        assert alone.input_ids[0][alone.response_mask[0]].tolist() == \
            whole.input_ids[2 * i][whole.response_mask[2 * i]].tolist()


def test_seed_determinism_and_caller_rng_untouched(model, tokenizer, prompts):
    kwargs = dict(n=2, max_new_tokens=10)
    state = torch.get_rng_state()
    a = rollout.generate_rollouts(model, tokenizer, prompts, seed=11, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    b = rollout.generate_rollouts(model, tokenizer, prompts, seed=11, **kwargs)
    c = rollout.generate_rollouts(model, tokenizer, prompts, seed=12, **kwargs)
    assert torch.equal(a.input_ids, b.input_ids) and a.texts == b.texts
    assert not torch.equal(a.input_ids, c.input_ids) and a.texts != c.texts


def test_model_sampling_defaults_are_ignored(model, tokenizer, prompts):
    """Qwen3 ships top_k=20, temperature=0.6: sampling must follow only the temperature and top-p given."""
    skewed = copy.deepcopy(model)
    for key, value in dict(top_k=1, temperature=0.1, min_p=0.5, repetition_penalty=3.0).items():
        setattr(skewed.generation_config, key, value)
    a = rollout.generate_rollouts(model, tokenizer, prompts, n=2, max_new_tokens=10, seed=4)
    b = rollout.generate_rollouts(skewed, tokenizer, prompts, n=2, max_new_tokens=10, seed=4)
    assert torch.equal(a.input_ids, b.input_ids)
    assert skewed.generation_config.top_k == 1  # restored


def test_samples_come_from_the_whole_vocabulary(tokenizer, prompts):
    """temperature 1, top-p 1: no top-k of any kind (transformers' own default is 50). On a near-uniform model
    the sampled tokens' ranks then reach past 50."""
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=1e-3,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    flat = Qwen3ForCausalLM(config).eval()
    r = rollout.generate_rollouts(flat, tokenizer, prompts, n=8, max_new_tokens=10, seed=2)
    probs = forward_logits(flat, r)[:, :-1][r.response_mask[:, 1:]]
    tokens = r.input_ids[r.response_mask]
    ranks = (probs > probs.gather(1, tokens[:, None])).sum(-1)  # 0 = the most likely token
    assert len(tokenizer) > 60 and ranks.max() >= 55


def test_training_model_with_gradient_checkpointing(model, tokenizer, prompts):
    trained = copy.deepcopy(model)
    # transformers 5.24 renamed the switch (activation_checkpointing_enable); 5.17 has only the old name
    getattr(trained, "activation_checkpointing_enable", trained.gradient_checkpointing_enable)()
    trained.train()
    r = rollout.generate_rollouts(trained, tokenizer, prompts, n=2, max_new_tokens=10, seed=7)
    assert trained.training and all(layer.gradient_checkpointing for layer in trained.model.layers)
    reference = rollout.generate_rollouts(model, tokenizer, prompts, n=2, max_new_tokens=10, seed=7)
    assert torch.equal(r.input_ids, reference.input_ids)


def test_ddp_wrapped_model(model, tokenizer, prompts, tmp_path):
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model).train())
        r = rollout.generate_rollouts(wrapped, tokenizer, prompts, n=2, max_new_tokens=8, seed=2)
        assert wrapped.module.training
    finally:
        if started:
            dist.destroy_process_group()
    reference = rollout.generate_rollouts(model, tokenizer, prompts, n=2, max_new_tokens=8, seed=2)
    assert torch.equal(r.input_ids, reference.input_ids)


def test_bad_arguments(model, tokenizer, prompts):
    with pytest.raises(ValueError, match="n >= 1"):
        rollout.generate_rollouts(model, tokenizer, prompts, n=0, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"need prompts, n >= 1 and max_new_tokens >= 1 \(got 0, 1, 4\)"):
        rollout.generate_rollouts(model, tokenizer, [], n=1, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        rollout.generate_rollouts(model, tokenizer, [prompts[0], ""], n=1, max_new_tokens=4)
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    bare = copy.deepcopy(model)
    bare.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="names an EOS token"):
        rollout.generate_rollouts(bare, no_eos, prompts, n=1, max_new_tokens=4)
