"""tip.py: loading the pair T, S_θ and the prompts x of §3, with the checks that keep Eqs. 1–3 well defined."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen3Config, Qwen3ForCausalLM

import data
import pair
import tip
from conftest import CHARS, char_tokenizer




def tiny_config(vocab_size, hidden_size, **extra):
    return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       max_position_embeddings=128, tie_word_embeddings=False, **extra)



@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """teacher (head 96 rows) and student (head 88 rows) with one tokenizer; two folders without weights
    (a different tokenizer; softcapped logits), so their errors can only come before any weight is read."""
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    for name, vocab_size, hidden in (("teacher", 96, 48), ("student", 88, 32)):
        Qwen3ForCausalLM(tiny_config(vocab_size, hidden)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    tiny_config(96, 48).save_pretrained(root / "other_tokenizer")
    char_tokenizer(CHARS[::-1]).save_pretrained(root / "other_tokenizer")  # same tokens, other ids
    tiny_config(96, 48, final_logit_softcapping=30.0).save_pretrained(root / "softcapped")
    tokenizer.save_pretrained(root / "softcapped")
    return root


def test_load_pair_from_local_folders(folders, tokenizer, capsys):
    teacher, student, loaded = pair.load_pair(str(folders / "teacher"), str(folders / "student"), "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert teacher.dtype == student.dtype == torch.float32  # "auto" on CPU
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert pair.lm_head_weight(teacher).shape == (96, 48) and pair.lm_head_weight(student).shape == (88, 32)
    assert "shared first 88 rows" in capsys.readouterr().out  # different head widths: allowed and noted
    teacher, _, _ = pair.load_pair(str(folders / "teacher"), str(folders / "student"), "cpu", dtype="bfloat16")
    assert teacher.dtype == torch.bfloat16


def test_the_attention_implementation_reaches_both_models(folders, monkeypatch):
    """--attn-implementation is what transformers loads both models with; auto is its default (SDPA) on a CPU,
    and FlashAttention 2 on a GPU only where the flash_attn package is installed."""
    import importlib.util
    teacher, student, _ = pair.load_pair(str(folders / "teacher"), str(folders / "student"), "cpu", attention="eager")
    assert teacher.config._attn_implementation == student.config._attn_implementation == "eager"
    teacher, student, _ = pair.load_pair(str(folders / "teacher"), str(folders / "student"), "cpu")
    assert teacher.config._attn_implementation == student.config._attn_implementation == "sdpa"
    installed = {"flash_attn": True, "other": False}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if installed[name] else None)
    assert pair.attention_implementation("auto", "cuda") == "flash_attention_2"
    assert pair.attention_implementation("auto", "cpu") is None
    assert pair.attention_implementation("sdpa", "cuda") == "sdpa"
    installed["flash_attn"] = False
    assert pair.attention_implementation("auto", "cuda") is None


def test_different_tokenizers_are_refused_naming_both(folders):
    teacher, student = str(folders / "other_tokenizer"), str(folders / "student")
    with pytest.raises(ValueError, match="different tokenizers") as error:
        pair.load_pair(teacher, student, "cpu")
    assert teacher in str(error.value) and student in str(error.value)


def test_missing_path_says_which(folders):
    with pytest.raises(ValueError, match=r"student path './no/such/model' does not exist"):
        pair.load_pair(str(folders / "teacher"), "./no/such/model", "cpu")
    with pytest.raises(ValueError, match="teacher path"):
        pair.load_pair(str(folders / "nothing_here"), str(folders / "student"), "cpu")
    with pytest.raises(ValueError, match="both --teacher and --student"):
        pair.load_pair("", str(folders / "student"), "cpu")


def test_hub_id_offline_or_without_network_asks_for_a_local_path(folders, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="pass a local folder"):
        pair.load_pair("tip-tests-nobody/no-such-model", str(folders / "student"), "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(tip, "hub_reachable", lambda timeout=3.0: False)  # no network, offline flag unset
    with pytest.raises(ValueError, match="pass a local folder"):
        pair.load_pair(str(folders / "teacher"), "tip-tests-nobody/no-such-model", "cpu")


def test_logit_transforms_and_head_bias_are_refused(folders):
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        pair.load_pair(str(folders / "softcapped"), str(folders / "student"), "cpu")
    model = Qwen3ForCausalLM(tiny_config(64, 32))
    pair.check_head(model)  # a plain head passes
    biased = copy.deepcopy(model)
    biased.lm_head = torch.nn.Linear(32, 64, bias=True)
    with pytest.raises(ValueError, match="bias"):
        pair.check_head(biased)
    model.config.logit_scale = 0.0625  # Cohere-style scaling
    with pytest.raises(ValueError, match="logit_scale"):
        pair.check_head(model)


def test_final_hidden_states_give_the_logits_without_computing_them(tmp_path):
    torch.manual_seed(1)
    model = Qwen3ForCausalLM(tiny_config(64, 32)).double()
    ids = torch.randint(3, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding after an ended response
    head_calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_calls.append(args[0].shape[1]))
    hidden = pair.final_hidden_states(model, ids, mask)
    assert head_calls == []  # no logits were built
    logits = hidden @ pair.lm_head_weight(model).T
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    reference = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    assert torch.allclose(logits[mask.bool()], reference[mask.bool()], atol=1e-10)
    # a left-padded row scores exactly as the same tokens without padding (positions count real tokens)
    alone = model(input_ids=ids[1:2, 4:]).logits[0]
    assert torch.allclose(logits[1, 4:], alone, atol=1e-10)
    # through a DDP wrapper: same states, the head runs on zero positions, gradients reach the decoder
    head_calls.clear()
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        wrapped_hidden = pair.final_hidden_states(wrapped, ids, mask)
        wrapped_hidden[mask.bool()].sum().backward()
    finally:
        if started:
            dist.destroy_process_group()
    assert head_calls == [0]
    assert torch.allclose(wrapped_hidden[mask.bool()], hidden[mask.bool()], atol=1e-12)
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_format_prompt(tokenizer):
    assert data.format_prompt(tokenizer, "1+2") == "<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n"
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert data.format_prompt(plain, "1+2") == "1+2"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_load_prompts_from_jsonl(tmp_path, tokenizer, capsys):
    long_problem = "9" * 200
    rows = [{"problem": "1+2", "answer": 3}, {"problem": "4*5", "answer": "20"}, {"problem": "1+2", "answer": 3},
            {"problem": long_problem, "answer": "0"}, {"problem": "x\\boxed{}?", "answer": None}]
    formatted = data.format_prompt(tokenizer, f"4*5\n\n{data.MATH_INSTRUCTION}")
    limit = len(tokenizer(formatted, add_special_tokens=False).input_ids)  # the longest that is kept
    config = tip.Config(prompts=write_jsonl(tmp_path / "p.jsonl", rows), max_prompt_len=limit)
    prompts = data.load_prompts(config, tokenizer)
    assert prompts == [
        {"prompt": data.format_prompt(tokenizer, f"1+2\n\n{data.MATH_INSTRUCTION}"), "answer": "3"},
        {"prompt": formatted, "answer": "20"},
        {"prompt": data.format_prompt(tokenizer, "x\\boxed{}?"), "answer": None},  # already asks for a box
    ]
    assert "1 duplicates and 1 longer than" in capsys.readouterr().out
    bare = data.load_prompts(tip.Config(prompts=config.prompts, math_instruction=False), tokenizer)
    assert bare[0]["prompt"] == data.format_prompt(tokenizer, "1+2")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_a_local_prompt_file_is_one_split_whatever_the_split_flag(tmp_path, tokenizer, suffix):
    """--prompt-split names a split of a hub dataset; a local file has one, read whole for any value."""
    import datasets
    rows = [{"problem": f"{a}+1", "answer": str(a + 1)} for a in range(5)]
    path = tmp_path / f"p{suffix}"
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(path) if suffix == ".parquet" else table.to_json(path, lines=suffix == ".jsonl")
    for split in ("train", "test", "validation"):
        prompts = data.load_prompts(tip.Config(prompts=str(path), prompt_split=split, math_instruction=False),
                                    tokenizer)
        assert [p["answer"] for p in prompts] == [r["answer"] for r in rows], split


def test_load_prompts_chat_messages_nested_answer_and_fields(tmp_path, tokenizer):
    dapo = ("Solve the following math problem step by step. The last line of your response should be of the form "
            "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 2+2?\n\n"
            "Remember to put your answer on its own line after \"Answer:\".")
    rows = [{"prompt": [{"role": "user", "content": dapo}], "question": "QQ",
             "reward_model": {"ground_truth": "4", "style": "rule"}}]
    path = write_jsonl(tmp_path / "dapo.jsonl", rows)
    prompts = data.load_prompts(tip.Config(prompts=path), tokenizer)
    # DAPO's own answer format is replaced by the paper's \boxed{} instruction
    assert prompts == [{"prompt": data.format_prompt(tokenizer, f"What is 2+2?\n\n{data.MATH_INSTRUCTION}"),
                        "answer": "4"}]
    chosen = data.load_prompts(tip.Config(prompts=path, prompt_field="question", math_instruction=False), tokenizer)
    assert chosen[0]["prompt"] == data.format_prompt(tokenizer, "QQ")
    with pytest.raises(ValueError, match=r"no answer field 'nope' \(columns: prompt, question, reward_model\)"):
        data.load_prompts(tip.Config(prompts=path, answer_field="nope"), tokenizer)
    path = write_jsonl(tmp_path / "other.jsonl", [{"text": "1+1"}])
    with pytest.raises(ValueError, match="--prompt-field"):
        data.load_prompts(tip.Config(prompts=path), tokenizer)
    assert data.load_prompts(tip.Config(prompts=path, prompt_field="text"), tokenizer)[0]["answer"] is None


def test_load_prompts_parquet_file_and_dataset_folder(tmp_path, tokenizer):
    import datasets
    (tmp_path / "set" / "data").mkdir(parents=True)
    path = str(tmp_path / "set" / "data" / "train-00000-of-00001.parquet")  # the layout of a hub download
    datasets.Dataset.from_dict({"question": ["5-3"], "solution": ["2"]}).to_parquet(path)
    expected = [{"prompt": data.format_prompt(tokenizer, f"5-3\n\n{data.MATH_INSTRUCTION}"), "answer": "2"}]
    assert data.load_prompts(tip.Config(prompts=path), tokenizer) == expected
    assert data.load_prompts(tip.Config(prompts=str(tmp_path / "set")), tokenizer) == expected


def test_load_prompts_errors_name_the_source(tmp_path, tokenizer, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl' is empty"):
        data.load_prompts(tip.Config(prompts=str(empty)), tokenizer)
    path = write_jsonl(tmp_path / "long.jsonl", [{"problem": "1" * 50}])
    with pytest.raises(ValueError, match="no prompts left from .*long.jsonl"):
        data.load_prompts(tip.Config(prompts=path, max_prompt_len=10), tokenizer)
    with pytest.raises(ValueError, match="does not exist"):
        data.load_prompts(tip.Config(prompts=str(tmp_path / "missing.jsonl")), tokenizer)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="is not cached and the hub is offline: pass a local dataset folder"):
        data.load_prompts(tip.Config(prompts="tip-tests-nobody/no-such-prompts"), tokenizer)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(tip, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="unreachable"):
        data.load_prompts(tip.Config(prompts="tip-tests-nobody/no-such-prompts"), tokenizer)


def test_a_prompt_that_is_neither_text_nor_a_user_turn_is_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": [{"role": "system", "content": "be brief"}]}])
    with pytest.raises(tip.InputError, match="odd.jsonl: a prompt is neither text nor chat messages with a user turn"):
        data.load_prompts(tip.Config(prompts=path), tokenizer)


def test_chat_template_switches_reach_the_template(tokenizer):
    template = "{% if enable_thinking is defined and not enable_thinking %}NOTHINK{% endif %}{{ messages[0].content }}"
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    switches = data.template_switches(tip.Config())  # the default turns thinking off
    assert data.format_prompt(tokenizer, "1+2", switches) == "NOTHINK1+2"
    assert data.format_prompt(tokenizer, "1+2", data.template_switches(tip.Config(chat_template_kwargs="{}"))) == "1+2"
    with pytest.raises(tip.InputError, match="is not a JSON object"):
        data.template_switches(tip.Config(chat_template_kwargs="[1]"))


def test_built_in_world_problems_are_asked_bare(tokenizer):
    prompts = data.load_prompts(tip.Config(prompts="toy"), tokenizer, [{"problem": "1+2", "answer": 3}])
    assert prompts == [{"prompt": data.format_prompt(tokenizer, "1+2"), "answer": "3"}]  # bare, as trained


def test_prompt_flags_on_the_command_line():
    args = tip.build_parser().parse_args(["--prompts", "open-r1/DAPO-Math-17k-Processed", "--prompt-subset", "en",
                                          "--prompt-field", "prompt", "--answer-field", "solution",
                                          "--no-math-instruction"])
    config = tip.config_from_args(args)
    assert (config.prompts, config.prompt_subset, config.prompt_field, config.answer_field,
            config.math_instruction) == ("open-r1/DAPO-Math-17k-Processed", "en", "prompt", "solution", False)


@pytest.mark.parametrize("models,preset", [
    ([], "toy"), (["--teacher", "T"], "paper"), (["--student", "S"], "paper"),
    (["--teacher", "T", "--student", "S"], "paper"), (["--preset", "toy", "--teacher", "T"], "toy"),
    (["--preset", "paper"], "paper")])
def test_the_preset_follows_the_models_given_and_every_typed_flag_wins(models, preset):
    """No model named: the toy preset; either model named: the paper's defaults; --preset decides when given. A
    flag typed on the command line wins over the preset, also when its value is 0 or false."""
    typed = ["--steps", "7", "--save-every", "0", "--ratio", "0", "--no-gradient-checkpointing", "--lr", "0.5"]
    config = tip.config_from_args(tip.build_parser().parse_args([*models, *typed]))
    named = {"teacher": "T"} if "T" in models else {}
    named |= {"student": "S"} if "S" in models else {}
    typed_values = dict(steps=7, save_every=0, ratio=0.0, gradient_checkpointing=False, lr=0.5)
    expected = dataclasses.replace(tip.Config(), **{**tip.PRESETS[preset], **named, **typed_values})
    assert config == expected


def test_a_caller_that_waited_for_the_build_reuses_it(tmp_path, monkeypatch):
    """Concurrent builders (torchrun ranks): one builds while the others wait on the lock; a waiter then finds
    the finished folder and returns it, never building a second time."""
    import fcntl
    import threading
    path, waiting, real_flock = tmp_path / "world", threading.Event(), fcntl.flock

    def flock_noting_the_wait(handle, operation):
        waiting.set()
        return real_flock(handle, operation)

    def second_build(tmp):
        raise AssertionError("the world was built a second time")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as held:
        real_flock(held, fcntl.LOCK_EX)  # the first builder
        monkeypatch.setattr(tip.fcntl, "flock", flock_noting_the_wait)
        result = []
        waiter = threading.Thread(target=lambda: result.append(tip.build_once(path, second_build, log=lambda m: None)))
        waiter.start()
        assert waiting.wait(30)
        path.mkdir()
        (path / "world.json").write_text("{}")  # the first builder finishes
        real_flock(held, fcntl.LOCK_UN)
    waiter.join(30)
    assert result == [path]


def test_reductions_keep_float64():
    """Counts and sums over ranks (Eq. 9's kept count, the logged totals) stay exact past float32's 2^24."""
    big = 2.0 ** 24 + 1
    assert tip.all_reduce_sum([big, 1.0 + 1e-9, 3.0], "cpu") == [big, 1.0 + 1e-9, 3.0]
    assert tip.all_reduce_max(big, "cpu") == big


def test_a_script_config_declares_its_flags_with_tip_arg(capsys):
    """The one way every script declares flags: a dataclass of `tip.arg` fields, parsed by `tip.parse_flags`."""
    from dataclasses import dataclass

    @dataclass
    class Flags:
        lengths: list[int] = tip.arg([256], "response lengths")
        split: float | None = tip.arg(None, "a boundary; default: the median")
        greedy: bool = tip.arg(False, "greedy decoding")
        engine: str = tip.arg("hf", "sampler", ["hf", "vllm"])

    assert tip.parse_flags(Flags, []) == Flags([256], None, False, "hf")
    assert Flags().lengths is not Flags().lengths  # a list default is not shared between configs
    parsed = tip.parse_flags(Flags, ["--lengths", "256", "1024", "--split", "-1", "--greedy", "--engine", "vllm"])
    assert parsed == Flags([256, 1024], -1.0, True, "vllm")
    assert tip.parse_flags(Flags, ["--no-greedy"]).greedy is False
    with pytest.raises(SystemExit):
        tip.parse_flags(Flags, ["--engine", "tgi"])
    assert "invalid choice: 'tgi'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tip.parse_flags(Flags, ["--help"])
    assert "response lengths (default: [256])" in capsys.readouterr().out


def project_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports anywhere in the file, functions included} for the top-level files
    and the worlds package (`worlds` its __init__, `worlds.toy` a world)."""
    import ast
    from pathlib import Path
    root = Path(tip.__file__).parent
    modules = {path.stem: path for path in root.glob("*.py")}
    modules.update({"worlds" if path.stem == "__init__" else f"worlds.{path.stem}": path
                    for path in (root / "worlds").glob("*.py")})
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module == "worlds":  # from worlds import toy
                found |= {f"worlds.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant):  # importlib.import_module("rollout")
                found.add(node.args[0].value)
        graph[name] = (found & set(modules)) - {name}
    return graph


def test_imports_flow_one_way_and_the_math_files_stand_alone():
    graph = project_imports()
    assert graph["score"] == set() and graph["select"] == set(), "score.py and select.py copy out alone"
    assert graph["tip"] == set() and graph["grade"] == set(), "the base knows none of its users"
    worlds = {name for name in graph if name.split(".")[0] == "worlds"}
    assert len(worlds) >= 6, worlds
    method = set(graph) - worlds - {"train", "evaluate"}  # the method's files know no world, train nor evaluate
    assert not {(name, used) for name in method for used in graph[name] & (worlds | {"train", "evaluate"})}
    assert not {(name, used) for name in worlds for used in graph[name] & {"train", "evaluate"}}
    done, visiting = set(), []

    def visit(module):  # depth-first: a module met again while its own imports are open closes a cycle
        assert module not in visiting, f"import cycle: {' -> '.join(visiting + [module])}"
        if module in done:
            return
        visiting.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        visiting.pop()
        done.add(module)
    for module in sorted(graph):
        visit(module)


def test_no_file_calls_another_files_private_names():
    import re
    from pathlib import Path
    root = Path(tip.__file__).parent
    modules = "|".join(path.stem for path in [*root.glob("*.py"), *root.glob("worlds/*.py")])
    for path in [*root.glob("*.py"), *root.glob("benchmarks/*.py"), *root.glob("worlds/*.py")]:
        calls = re.findall(rf"\b(?:{modules})\._[A-Za-z]\w*", path.read_text())
        assert not calls, f"{path.name} reaches into another file's private names: {calls}"


def test_peak_memory_is_in_gib_by_the_kernels_and_torchs_own_counters(monkeypatch):
    """CPU: the process's high-water resident set, as the kernel reports it in /proc/self/status (VmHWM, kB);
    GPU: torch.cuda.max_memory_allocated, in bytes. Both are read back in GiB."""
    def high_water_gib() -> float:
        line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20
    before = high_water_gib()
    peak = tip.peak_memory_gb(torch.device("cpu"))
    assert before * 0.999 <= peak <= high_water_gib() * 1.001 and peak > 0.01  # a torch process holds > 10 MiB
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    assert tip.peak_memory_gb(torch.device("cuda", 0)) == 3.0
