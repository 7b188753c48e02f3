"""What a paranoid user tries, as a table: every bad input and injected fault ends the real command
(run in this process) with one `error:` line that names the problem, exit status 2 and no traceback,
within a time limit (no hang, no allocation of what a typo asks for); the Python constructors raise
the typed ThoughtfoldError of the same check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import byte_tokenizer
from test_cli import assert_one_line_error, run_main
from thoughtfold.config import AdapterConfig, CacheConfig, SamplingConfig, TrainConfig
from thoughtfold.config_files import load_config
from thoughtfold.errors import ConfigError, DataError, ThoughtfoldError
from thoughtfold.evaluation.evaluate import EvalConfig
from thoughtfold.tasks.rewards import time_limit

LIMIT_S = 120  # per case, generous for a loaded 2-core machine: what it guards against is a hang

REWARDS = '''
import sys, time
def exits(prompts, completions, **columns):
    sys.exit(0)
def divides(prompts, completions, **columns):
    return [1 / 0 for _ in completions]
def infinite(prompts, completions, **columns):
    return [float("inf") for _ in completions]
def sleeps(prompts, completions, **columns):
    time.sleep(3600)
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dirs) -> dict[str, str]:
    """Every file the table names, built once: damaged adapters, data files, configs, a truncated model."""
    from thoughtfold.policy import Policy

    root = tmp_path_factory.mktemp("bad")
    paths = {"tmp": str(root), "llama": str(tiny_dirs["llama"])}
    good = root / "adapter"
    Policy.from_pretrained(paths["llama"], adapter=AdapterConfig(mode="pte", rank=4, global_tokens=2),
                           cache=CacheConfig(window=8)).save_adapter(str(good))
    meta = json.loads((good / "thoughtfold_adapter.json").read_text())
    changes = {"rank_huge": {"rank": 10**12}, "rank_bool": {"rank": True}, "alpha_huge": {"alpha": 1e308},
               "globals_huge": {"global_tokens": 60000}}
    for name, change in changes.items():
        settings = json.dumps({**meta, "adapter": {**meta["adapter"], **change}})
        paths[name] = _adapter_copy(good, root / name, settings)
    nested = '{"adapter": ' + "[" * 100_000 + "]" * 100_000 + "}"
    paths["nested"] = _adapter_copy(good, root / "nested", nested)
    latin1 = json.dumps(meta).encode().replace(b'"pte"', b'"pt\xe9"')
    paths["latin1"] = _adapter_copy(good, root / "latin1", latin1)
    rows = "".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in ["1+1", "2+2", "x" * 490])
    texts = {
        "num.yaml": "5\n", "bool.yaml": "true\n", "latin.yaml": b"model: caf\xe9\n",
        "binary.yaml": b"\x00\xff\xfe\x01", "latin.jsonl": b'{"prompt": "caf\xe9"}\n',
        "surrogate.jsonl": '{"prompt": "caf\\udce9"}\n',
        "null_answer.jsonl": '{"prompt": "1+1", "answer": null}\n',
        "null_prompt.jsonl": '{"prompt": "1+1", "answer": "2"}\n{"prompt": null, "answer": "2"}\n',
        "long_row.jsonl": rows,
        "ids_out_of_vocab.jsonl": json.dumps({"prompt": "hi", "answer": "", "solution": [5, 99999]}) + "\n",
        "rewards.py": REWARDS, "metrics/metrics.jsonl": '{"step": 1, "loss": 0.5}\n', "a_file": "",
    }
    for name, text in texts.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        paths[name.replace(".", "_")] = str(root / name)
    trunc = root / "truncated_model"
    trunc.mkdir()
    for f in Path(paths["llama"]).iterdir():
        data = f.read_bytes()
        (trunc / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    paths["truncated_model"] = str(trunc)
    full = root / "full_disk"
    full.mkdir()
    (full / "report.md.tmp").symlink_to("/dev/full")  # every write there: "No space left on device"
    paths["full_disk"] = str(full)
    return paths


def _adapter_copy(good: Path, target: Path, settings: str | bytes) -> str:
    target.mkdir()
    (target / "adapter.safetensors").write_bytes((good / "adapter.safetensors").read_bytes())
    data = settings.encode() if isinstance(settings, str) else settings
    (target / "thoughtfold_adapter.json").write_bytes(data)
    return str(target)


GEN = ["generate", "--model", "{llama}", "--max-new-tokens", "4", "--prompt", "hi"]
TRAIN = ["train", "model={llama}", "dtype=float32", "device=cpu", "output_dir={tmp}/run-{case}",
         "max_steps=1", "num_generations=2", "prompts_per_step=1", "max_completion_length=4",
         "progress=false"]
EVAL = ["eval", "--model", "{llama}", "--data", "arith:tiny", "--limit", "2", "--max-new-tokens", "4",
        "--reward", "arith", "--no-progress", "--output", "{tmp}/eval-{case}"]
NO_WRITE = "cannot write to the output directory"

CASES = {
    # settings that cannot work: scored eviction without a window, sizes past any sane limit, seeds
    "eviction_full_cache": (GEN + ["--eviction", "h2o"], ["full cache (window None) evicts none"]),
    "seed_2_64": (GEN + ["--seed", str(2**64)], ["seed must be an integer >= 0 and < 2**64"]),
    "train_seed_2_64": (TRAIN + [f"seed={2**64}"], ["seed must be an integer >= 0 and < 2**64"]),
    "observe_window_huge": (TRAIN + ["cache.observe_window=10000000"],
                            ["observe_window must be an integer >= 1 and at most the window"]),
    "rank_huge_setting": (TRAIN + ["adapter.rank=1000000000000"],
                          ["adapter rank must be an integer", "2**16"]),
    "globals_vs_model": (TRAIN + ["adapter.global_tokens=60000"], ["more than the base model's"]),
    "window_vs_model": (GEN + ["--window", "100000"], ["larger than the model's 512 positions"]),
    "recall_steps_huge": (EVAL[:4] + ["recall:steps=10000000000000000000000"] + EVAL[5:],
                          ["recall steps must be"]),
    # text that is not UTF-8: argv (lone surrogates), files, YAML
    "prompt_surrogate": (GEN[:-1] + ["hi\udce9"], ["the prompt is not valid UTF-8 text (byte 0xe9"]),
    "system_prompt_surrogate": (GEN + ["--system-prompt", "be \udce9"], ["system prompt is not valid UTF-8"]),
    "prompts_file_latin1": (GEN[:-2] + ["--prompts-file", "{latin_jsonl}"], ["is not UTF-8 text"]),
    "prompts_file_escape": (GEN[:-2] + ["--prompts-file", "{surrogate_jsonl}"], ["not valid UTF-8 text"]),
    "override_surrogate": (TRAIN + ["data.system_prompt=\udce9"],
                           ["override 'data.system_prompt' is not valid UTF-8"]),
    "yaml_number": (["train", "--config", "{num_yaml}"], ["must be a mapping of settings", "not a number"]),
    "yaml_bool": (["train", "--config", "{bool_yaml}"], ["not a boolean"]),
    "yaml_latin1": (["train", "--config", "{latin_yaml}"], ["is not UTF-8 text (byte 0xe9"]),
    "yaml_binary": (["train", "--config", "{binary_yaml}"], ["is not UTF-8 text"]),
    # adapters are files people download: validated like configs, sizes before allocation
    "adapter_rank_huge": (GEN + ["--adapter", "{rank_huge}"],
                          ["thoughtfold_adapter.json is malformed", "rank"]),
    "adapter_rank_bool": (GEN + ["--adapter", "{rank_bool}"], ["rank must be an integer", "True"]),
    "adapter_alpha_huge": (GEN + ["--adapter", "{alpha_huge}"], ["alpha must be a finite number, non-zero"]),
    "adapter_globals_huge": (GEN + ["--adapter", "{globals_huge}"], ["more than the base model's"]),
    "adapter_nested_json": (GEN + ["--adapter", "{nested}"], ["not valid JSON (nested too deeply)"]),
    "adapter_latin1_json": (GEN + ["--adapter", "{latin1}"], ["is not UTF-8 text"]),
    "truncated_base_model": (GEN[:2] + ["{truncated_model}"] + GEN[3:],
                             ["weights cannot be read", "truncated"]),
    # data read as its type says, and whole files checked before the first step
    "null_answer": (TRAIN + ["data.dataset={null_answer_jsonl}"],
                    ["null_answer.jsonl line 1: 'answer' is null"]),
    "null_prompt": (TRAIN + ["data.dataset={null_prompt_jsonl}"],
                    ["null_prompt.jsonl line 2: the prompt must be"]),
    "row_too_long": (TRAIN + ["data.dataset={long_row_jsonl}"],
                     ["long_row.jsonl line 3: the prompt of 509 tokens", "lower max_completion_length to 3"]),
    "eval_row_too_long": (EVAL[:4] + ["{long_row_jsonl}", "--no-system-prompt"] + EVAL[7:],
                          ["long_row.jsonl line 3: the prompt of 509 tokens", "lower max_new_tokens to 3"]),
    "sft_ids_out_of_vocab": (["sft"] + TRAIN[1:] + ["data.dataset={ids_out_of_vocab_jsonl}"],
                             ["ids_out_of_vocab.jsonl line 1: the target 'solution' has token id 99999"]),
    # rewards that fail: one line naming the reward, the traceback in the run's errors.log
    "reward_exits": (TRAIN + ["rewards=[{rewards_py}:exits]"],
                     ["reward exits raised SystemExit", "errors.log"]),
    "reward_raises": (TRAIN + ["rewards=[{rewards_py}:divides]"],
                      ["divides raised ZeroDivisionError", "errors.log"]),
    "reward_inf": (TRAIN + ["rewards=[{rewards_py}:infinite]"], ["returned inf", "finite numbers"]),
    "reward_hangs": (TRAIN + ["rewards=[{rewards_py}:sleeps]", "reward_timeout=1"],
                     ["did not return within 1 s"]),
    "eval_reward_hangs": (EVAL[:10] + ["{rewards_py}:sleeps", "--reward-timeout", "1"] + EVAL[11:],
                          ["sleeps did not return within 1 s"]),
    # where output goes: a file, a place no one may write, a full disk
    "report_output_file": (["report", "{tmp}/metrics", "--output", "{a_file}"], [NO_WRITE]),
    "report_output_unwritable": (["report", "{tmp}/metrics", "--output", "/sys/thoughtfold"], [NO_WRITE]),
    "report_disk_full": (["report", "{tmp}/metrics", "--output", "{full_disk}"], ["No space left on device"]),
    "bench_output_file": (["bench", "decode", "--shape", "tiny", "--output", "{a_file}"], [NO_WRITE]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, files, capsys):
    argv, needles = CASES[case]
    args = [a.format(**files, case=case) if "{" in a and "}" in a else a for a in argv]
    with time_limit(LIMIT_S):
        proc = run_main(capsys, *args)
    line = assert_one_line_error(proc, *needles)
    if "errors.log" in needles:
        log = Path(line.rsplit("traceback in ", 1)[1].split(")")[0])
        assert "Traceback (most recent call last)" in log.read_text()


PYTHON_CASES = [
    (CacheConfig, {"window": 8, "observe_window": 10**7}, "observe_window must be .* at most the window"),
    (CacheConfig, {"eviction": "snapkv"}, "evicts none"),
    (CacheConfig, {"window": 8, "evict_ratio": True}, "evict_ratio must be a number"),
    (AdapterConfig, {"rank": 10**12}, "adapter rank must be an integer"),
    (AdapterConfig, {"alpha": "big"}, "alpha must be a number"),
    (AdapterConfig, {"target_modules": "q_proj"}, "target_modules must be a list"),
    (SamplingConfig, {"seed": 2**64}, r"seed must be an integer >= 0 and < 2\*\*64"),
    (SamplingConfig, {"top_k": 1.5}, "top_k must be"),
    (TrainConfig, {"seed": -1}, "seed must be an integer >= 0"),
    (TrainConfig, {"max_steps": "5"}, "max_steps must be an integer"),
    (TrainConfig, {"rewards": "math"}, "rewards must be a list of names"),
    (TrainConfig, {"reward_timeout": 0}, "reward_timeout must be > 0"),
    (TrainConfig, {"cache": 8}, "cache must be a CacheConfig or a dict of its settings"),
    (EvalConfig, {"datasets": ["arith"], "reward_timeout": -1.0}, "reward timeout must be > 0"),
]


@pytest.mark.parametrize("kind, kwargs, message", PYTHON_CASES)
def test_bad_setting_in_python_is_a_config_error(kind, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        kind(**kwargs)


def test_model_checks_happen_before_allocation(tiny_dirs):
    """A window or an adapter too large for the model is refused by the Policy before it allocates."""
    from transformers import AutoModelForCausalLM

    from thoughtfold.policy import Policy

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32)
    with pytest.raises(ConfigError, match="larger than the model's 512 positions"):
        Policy(model, byte_tokenizer(), cache=CacheConfig(window=10**6))
    with pytest.raises(ConfigError, match="more than the base model's"):
        Policy(model, byte_tokenizer(), adapter=AdapterConfig(mode="pte", rank=60000))
    policy = Policy(model, byte_tokenizer(), cache=CacheConfig(window=8))
    with pytest.raises(ConfigError, match="larger than the model's"):
        policy.cache_config = CacheConfig(window=600)
    with pytest.raises(DataError, match="the prompt is not valid UTF-8"):
        policy.generate(["caf\udce9"], max_new_tokens=2)


@pytest.mark.parametrize("text, message", [
    ("seed: 18446744073709551616\n", "seed must be an integer >= 0 and < 2\\*\\*64"),
    ("[1, 2]\n", "not a list"),
    ("3.5\n", "not a number"),
    ("adapter:\n  rank: true\n", "adapter.rank"),
])
def test_bad_yaml_is_a_config_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_every_error_is_a_thoughtfold_error():
    """The typed errors a user catches: one base class, and the builtin kinds they also are."""
    from thoughtfold import errors

    for name in ("ConfigError", "DataError", "CorruptFileError", "RewardError", "StorageError",
                 "ModelLoadError", "PromptTooLongError"):
        assert issubclass(getattr(errors, name), ThoughtfoldError)
    assert issubclass(errors.StorageError, OSError) and issubclass(errors.CorruptFileError, ConfigError)


def test_a_full_disk_under_an_atomic_write_is_a_storage_error(tmp_path):
    """A file written where the disk is full: a one-line StorageError, nothing left behind."""
    from thoughtfold.errors import StorageError
    from thoughtfold.persist import atomic_write_text

    (tmp_path / ".summary.json.tmp").symlink_to("/dev/full")
    with pytest.raises(StorageError, match="summary.json: No space left on device"):
        atomic_write_text(tmp_path / "summary.json", "{}")
    assert not (tmp_path / "summary.json").exists() and not os.path.lexists(tmp_path / ".summary.json.tmp")


def test_null_and_typed_columns_are_read_as_their_type_says(tmp_path):
    """Token-id prompts stay ids, a null answer or prompt is an error naming the line."""
    from thoughtfold.tasks.data import load_jsonl

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": [1, 4, 5], "answer": 3}\n{"prompt": "x", "answer": [1, 2]}\n')
    rows = load_jsonl(path, None, None)
    assert rows[0]["prompt"] == [1, 4, 5] and rows[0]["answer"] == "3" and rows[1]["answer"] == "1, 2"
    assert rows[0].where == "d.jsonl line 1"
    path.write_text('{"prompt": "x", "answer": "1"}\n{"prompt": 7, "answer": "1"}\n')
    with pytest.raises(DataError, match="d.jsonl line 2: the prompt must be text, token ids or chat"):
        load_jsonl(path, None, None)


def test_adapter_tensors_of_another_rank_are_a_conflict_not_damage(tiny_dirs, tmp_path):
    from thoughtfold.errors import CorruptFileError
    from thoughtfold.persist import load_adapter_weights
    from thoughtfold.policy import Policy

    one = Policy.from_pretrained(str(tiny_dirs["llama"]), adapter=AdapterConfig(mode="lora", rank=4))
    one.save_adapter(str(tmp_path / "a"))
    other = Policy.from_pretrained(str(tiny_dirs["llama"]), adapter=AdapterConfig(mode="lora", rank=2))
    with pytest.raises(ConfigError, match="wrong base model or rank") as caught:
        load_adapter_weights(tmp_path / "a", other.model, other.wrappers, other.encoder)
    assert not isinstance(caught.value, CorruptFileError)
    assert load_file(tmp_path / "a" / "adapter.safetensors")  # untouched


def test_token_id_prompts_stay_ids_in_grpo_sft_and_eval(tiny_dirs, tmp_path):
    """A JSONL file with token-id prompts: GRPO's rewards and rollouts, SFT's replay and eval's samples
    all see the ids (not their printed form "[1, 4, 5]")."""
    from test_trainer import _config
    from thoughtfold import GRPOTrainer, SFTTrainer
    from thoughtfold.config import DataConfig
    from thoughtfold.evaluation.evaluate import evaluate
    from thoughtfold.policy import Policy

    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "1", "solution": [7, 8, 9]}) + "\n"
                            for p in ([1, 4, 5], [2, 6], [3, 3, 3, 3])))
    seen = []

    def lengths(prompts, completions, completion_ids, **columns):
        seen.extend(prompts)
        return [float(len(c)) for c in completion_ids]

    ids = DataConfig(str(data), chat_template=False)
    grpo = _config(tmp_path, tiny_dirs["llama"], max_steps=1, data=ids)
    GRPOTrainer(reward_funcs=lengths, args=grpo).train()
    assert seen and all(p in ([1, 4, 5], [2, 6], [3, 3, 3, 3]) for p in seen)
    sft = SFTTrainer(args=_config(tmp_path, tiny_dirs["llama"], max_steps=1, output_dir=str(tmp_path / "sft"),
                                  data=ids))
    assert sft.policy.encode([sft.dataset[0]["prompt"]], chat_template=False) == [[1, 4, 5]]
    sft.train()
    policy = Policy.from_pretrained(str(tiny_dirs["llama"]), device="cpu")
    evaluate(policy, EvalConfig(datasets=[str(data)], reward="arith", chat_template=False, progress=False,
                                sampling=SamplingConfig(max_new_tokens=3), output_dir=str(tmp_path / "eval")))
    records = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [[1, 4, 5], [2, 6], [3, 3, 3, 3]]


def test_a_reward_that_scores_nothing_is_logged_as_nan_with_a_warning(tiny_dirs, tmp_path, caplog):
    from test_trainer import _config, _dataset
    from thoughtfold import GRPOTrainer
    from thoughtfold.training.metrics import read_metrics

    def nothing(prompts, completions, **columns):
        return [float("nan")] * len(completions)

    trainer = GRPOTrainer(reward_funcs=nothing, args=_config(tmp_path, tiny_dirs["llama"], max_steps=1),
                          train_dataset=_dataset())
    record = read_metrics(trainer.train()["metrics"])[0]
    assert record["rewards/nothing/mean"] != record["rewards/nothing/mean"]  # NaN, not 0.0
    assert record["reward"] != record["reward"] and record["rewards/skipped"] == 8
    assert "reward nothing scored none of the 8 completions" in caplog.text
