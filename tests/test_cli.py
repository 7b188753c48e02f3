"""The `thoughtfold` command, run as a subprocess like a user runs it (or through main() in this
process where one test runs it several times): JSON output, streaming, training and resuming, and
one-line errors (non-zero exit, no traceback) for every bad input."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_close_to_scale, byte_tokenizer
from thoughtfold.cli import main
from thoughtfold.cli.evaluate import default_output, run_name
from thoughtfold.cli.generate import read_prompts_file
from thoughtfold.cli.streamer import TerminalStreamer
from thoughtfold.cli.train import eval_command, flags_as_overrides
from thoughtfold.config import DataConfig, TrainConfig
from thoughtfold.config_files import load_config
from thoughtfold.errors import DataError
from thoughtfold.settings_help import default_settings, shown_value

BIN = Path(sys.executable).parent


def run_cli(*args: str, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "thoughtfold.cli", *args], input=stdin, capture_output=True, text=True,
        timeout=timeout, env=env,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert proc.stdout == ""
    return errors[0]


# --------------------------------------------------------------------------- basics


def test_version_and_console_script():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == "thoughtfold 0.1.0"
    script = BIN / "thoughtfold"
    if script.exists():  # the installed console entry point
        out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "thoughtfold 0.1.0"


def test_no_command_and_unknown_option(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("error: the following arguments are required")
    assert main(["generate", "--prompt", "x", "--frobnicate"]) == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err
    assert main(["generate"]) == 2
    assert "one of the arguments --prompt --prompts-file is required" in capsys.readouterr().err


# --------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def two_prompts(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Count: one two three", "id": 1}) + "\n\n" + json.dumps("abc") + "\n")
    return f


def test_json_output_matches_the_api(tiny_dirs, two_prompts):
    from thoughtfold.config import CacheConfig
    from thoughtfold.policy import Policy

    proc = run_cli(
        "generate", "--model", str(tiny_dirs["qwen2"]), "--prompts-file", str(two_prompts),
        "--window", "6", "--evict-ratio", "0.5", "--eviction", "snapkv", "--max-new-tokens", "20", "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 2
    for r in records:
        assert set(r) == {"text", "completion_ids", "logprobs", "evictions", "peak_cache_tokens"}
        assert len(r["completion_ids"]) == len(r["logprobs"]) >= 1
        assert all(lp <= 0.0 for lp in r["logprobs"])
    summary = proc.stderr.strip().splitlines()[-1]
    assert "tokens/s" in summary and "eviction" in summary and "peak cache" in summary
    # the summary counts each sequence's own events, not the lockstep steps after it ended
    events = [r["evictions"] for r in records]
    assert f"eviction events per sequence: {sum(events) / len(events):.1f} mean, {max(events)} max" in summary

    # the same request through the Python API gives the same tokens, log-probs and counters
    policy = Policy.from_pretrained(str(tiny_dirs["qwen2"]), cache=CacheConfig(window=6, evict_ratio=0.5,
                                                                               eviction="snapkv"))
    res = policy.generate(["Count: one two three", "abc"], max_new_tokens=20, temperature=0.0)
    for i, r in enumerate(records):
        assert r["completion_ids"] == res.completion_ids[i]
        assert r["text"] == res.texts[i]
        assert r["evictions"] == res.evictions[i]
        assert r["peak_cache_tokens"] == res.peak_cache_tokens[i]
        assert_close_to_scale(r["logprobs"], res.logprobs[i], rel=1e-5)


def test_single_prompt_streams_the_returned_text(tiny_dirs, capsys):
    args = ("generate", "--model", str(tiny_dirs["llama"]), "--prompt", "Hello there", "--window", "8",
            "--max-new-tokens", "24", "--no-chat-template")
    streamed = run_main(capsys, *args)  # in this process: four interpreter start-ups would take a minute
    assert streamed.returncode == 0, streamed.stderr
    as_json = run_main(capsys, *args, "--json")
    assert as_json.returncode == 0, as_json.stderr
    text = json.loads(as_json.stdout)["text"]
    assert streamed.stdout == text + "\n"

    # with a stop string that occurs mid-way, the stream ends where the returned text ends
    stop = next((c for c in text[2:] if c.isascii() and c.isalnum()), None)
    if stop is None:
        pytest.skip("the tiny model's text has no ASCII letter to stop at")
    cut = run_main(capsys, *args, "--stop", stop, "--json")
    cut_text = json.loads(cut.stdout)["text"]
    assert cut_text.endswith(stop) and len(cut_text) < len(text) + 1
    assert run_main(capsys, *args, "--stop", stop).stdout == cut_text + "\n"


def test_generate_slots_change_no_output(tiny_dirs, two_prompts, capsys):
    """--slots 1 decodes the batch's prompts one after the other in one call (continuous batching):
    the same tokens and log-probs as both at once."""
    args = ("generate", "--model", str(tiny_dirs["llama"]), "--prompts-file", str(two_prompts),
            "--window", "6", "--max-new-tokens", "16", "--temperature", "1", "--seed", "3", "--json")
    both, one = run_main(capsys, *args), run_main(capsys, *args, "--slots", "1")
    assert both.returncode == one.returncode == 0, one.stderr
    for a, b in zip(map(json.loads, both.stdout.splitlines()), map(json.loads, one.stdout.splitlines()),
                    strict=True):
        assert a["completion_ids"] == b["completion_ids"]
        assert_close_to_scale(a["logprobs"], b["logprobs"], rel=1e-5)


# --------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("window, needle", [("0", "window must be >= 1"), ("-3", "window must be >= 1"),
                                            ("abc", "window must be an integer")])
def test_bad_window(window, needle):
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--window", window), needle)


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1"])
def test_bad_evict_ratio(ratio):
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--window", "8", "--evict-ratio", ratio),
                          "evict_ratio must be in (0, 1]")


def test_bad_sampling_setting(tiny_dirs):
    assert_one_line_error(
        run_cli("generate", "--model", str(tiny_dirs["llama"]), "--prompt", "hi", "--top-p", "0"), "top_p"
    )


def test_missing_model_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    assert_one_line_error(run_cli("generate", "--model", missing, "--prompt", "hi"), repr(missing),
                          "not found")


def test_offline_hub_id():
    assert_one_line_error(
        run_cli("generate", "--model", "thoughtfold-test/not-a-model", "--prompt", "hi"),
        "'thoughtfold-test/not-a-model'", "could not be reached",
    )


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=259, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "hi"),
                          "'gpt2'", "llama", "qwen2", "qwen3")


def test_prompt_too_long(tiny_dirs):
    assert_one_line_error(
        run_cli("generate", "--model", str(tiny_dirs["llama"]), "--prompt", "x" * 600, "--no-chat-template"),
        "600 tokens", "512",
    )


def test_malformed_prompts_file_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "fine"}\n\n{"prompt": "also fine"\n')
    assert_one_line_error(run_cli("generate", "--prompts-file", str(f)), f"{f} line 3: invalid JSON")


def test_missing_prompts_file(tmp_path):
    assert_one_line_error(run_cli("generate", "--prompts-file", str(tmp_path / "nope.jsonl")), "not found")


# --------------------------------------------------------------------------- prompts file (in-process)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a"}', "not json"], "line 2: invalid JSON"),
        (['{"question": "a"}'], 'line 1: no "prompt" field (keys found: question)'),
        (['"a"', '{"prompt": 3}'], 'line 2: "prompt" must be a string, got a number'),
        (["[1, 2]"], 'line 1: expected a JSON object with a "prompt" field or a JSON string, got an array'),
        (['{"prompt": [1, -1]}'], "line 1: a list \"prompt\" must be messages"),
        (["", '"   "'], "line 2: the prompt is empty"),
        (["", "  "], "has no prompts"),
    ],
)
def test_read_prompts_file_errors(tmp_path, lines, message):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_prompts_file(f)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_read_prompts_file_ok(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "answer": 1}\n"b"\n\n{"prompt": [5, 6]}\n')
    assert read_prompts_file(f) == ["a", "b", [5, 6]]


# --------------------------------------------------------------------------- streamer


def _stream(tok, text_ids: list[int], eos: set[int], stop=()) -> str:
    out = io.StringIO()
    s = TerminalStreamer(tok, eos, stop, out=out)
    for t in text_ids:
        s.put(torch.tensor([t]))
    s.end()
    return out.getvalue()


def test_streamer_prints_text_and_stops_at_eos():
    tok = byte_tokenizer()
    ids = tok("héllo wörld\nsecond line", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    assert _stream(tok, ids, {eos}) == "héllo wörld\nsecond line\n"
    assert _stream(tok, ids + [eos] + ids, {eos}) == "héllo wörld\nsecond line\n"


def test_streamer_cuts_at_first_stop_string():
    tok = byte_tokenizer()
    ids = tok("step 1\nANSWER: 42\nmore text", add_special_tokens=False)["input_ids"]
    assert _stream(tok, ids, set(), stop=["ANSWER"]) == "step 1\nANSWER\n"
    assert _stream(tok, ids, set(), stop=["1\nANS"]) == "step 1\nANS\n"  # across a line break


def test_adapter_brings_its_base_model_and_cache(tiny_dirs, tmp_path, capsys):
    from thoughtfold.config import AdapterConfig, CacheConfig
    from thoughtfold.policy import Policy

    policy = Policy.from_pretrained(str(tiny_dirs["qwen3"]), cache=CacheConfig(window=5, evict_ratio=0.4),
                                    adapter=AdapterConfig(mode="lora", rank=4, alpha=8.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.normal_(0.0, 0.5)
    policy.save_adapter(str(tmp_path / "adapter"))
    expected = policy.generate(["abc"], max_new_tokens=16, temperature=0.0)
    assert expected.evictions[0] > 0

    proc = run_cli("generate", "--adapter", str(tmp_path / "adapter"), "--prompt", "abc",
                   "--max-new-tokens", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["completion_ids"] == expected.completion_ids[0]
    assert record["evictions"] == expected.evictions[0]
    assert "window 5, evict 2" in proc.stderr

    missing = run_main(capsys, "generate", "--adapter", str(tmp_path / "nope"), "--prompt", "abc")
    assert_one_line_error(missing, "adapter directory", "not found")


# --------------------------------------------------------------------------- train / sft


def test_train_then_resume_then_generate_with_the_adapter(tiny_dirs, tmp_path, capsys, monkeypatch):
    """`thoughtfold train KEY=VALUE ...` trains, checkpoints, prints where things are; `--resume`
    continues to more steps and `--evaluate` runs the printed eval command as printed, next to another
    evaluation of the same adapter; the adapter then loads in `generate --adapter` (in this process,
    to spare interpreter start-ups)."""
    monkeypatch.chdir(tmp_path)  # evaluations write under runs/eval
    out = tmp_path / "run"
    common = [f"model={tiny_dirs['llama']}", "dtype=float32", "device=cpu", "cache.window=8",
              "adapter.rank=4", "adapter.global_tokens=2", "num_generations=2", "prompts_per_step=2",
              "max_completion_length=12", "save_steps=1", f"output_dir={out}", "progress=false"]
    first = run_main(capsys, "grpo", *common, "max_steps=1")
    assert first.returncode == 0, first.stderr
    assert "adapter:" in first.stderr and (out / "metrics.jsonl").is_file()
    other = run_main(capsys, "eval", "--adapter", str(out / "adapter"), "--data", "arith:tiny", "--split",
                     "test", "--limit", "2", "--window", "4", "--max-new-tokens", "4", "--reward", "arith",
                     "--no-progress")
    assert other.returncode == 0, other.stderr
    again = run_main(capsys, "train", "--resume", *common, "max_steps=2", "--evaluate")
    assert again.returncode == 0, again.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    printed = next(line for line in again.stderr.splitlines() if line.startswith("  evaluate: "))
    assert "--window 8,none --split test --limit 64" in printed
    table = [line for line in again.stdout.splitlines() if line.startswith("| arith:tiny")]
    rows = [line.split("|")[2].strip() for line in table]
    assert rows == ["8", "full"]  # the evaluation's table: the trained window and the full cache
    assert len(list((tmp_path / "runs" / "eval").glob("run-*"))) == 2  # named after the run, no collision
    gen = run_main(capsys, "generate", "--adapter", str(out / "adapter"), "--prompt", "1+1=",
                   "--max-new-tokens", "5", "--json", "--device", "cpu", "--dtype", "float32")
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout)["completion_ids"]) <= 5


def test_eval_command_mirrors_the_training_settings(tmp_path):
    """The printed eval command: the trained task's held-out split, at the trained window and with a
    full cache, with the training prompts, grader and token budget."""
    config = TrainConfig(data=DataConfig(system_prompt=None), rewards=["arith"], max_completion_length=16)
    command = eval_command(config, tmp_path / "run" / "adapter")
    assert command == (f"thoughtfold eval --adapter {tmp_path / 'run' / 'adapter'} --data arith:tiny "
                       "--reward arith --max-new-tokens 16 --window 4,none --split test --limit 64 "
                       "--no-system-prompt")
    assert "--reward" not in eval_command(TrainConfig(rewards=[]), tmp_path)  # SFT: eval's default grader
    gsm8k = eval_command(TrainConfig(data={"dataset": "gsm8k"}, cache={"window": None}), tmp_path)
    assert "--window none" in gsm8k and "--split" not in gsm8k  # gsm8k's default split is its test split


def test_training_help_lists_every_setting_with_its_default():
    proc = run_cli("grpo", "--help")
    assert proc.returncode == 0, proc.stderr
    for name, value in default_settings(TrainConfig()).items():
        assert f"  {name}={shown_value(value)} " in proc.stdout, name
    assert "--print-config" in proc.stdout and "docs/coming-from-trl.md" in proc.stdout


def test_trl_style_flags_are_overrides_and_print_config_shows_the_result(capsys, tmp_path):
    assert flags_as_overrides(["--config", "c.yaml", "--learning-rate", "1e-5", "--bf16", "max_steps=3",
                               "--report_to=none", "--resume"]) == [
        "--config", "c.yaml", "learning_rate=1e-5", "bf16=true", "max_steps=3", "report_to=none", "--resume"]
    proc = run_main(capsys, "grpo", "--learning_rate", "1e-5", "--per_device_train_batch_size=16",
                    "--report_to", "none", "--gradient-checkpointing", "cache.window=8", "--print-config")
    assert proc.returncode == 0, proc.stderr
    saved = tmp_path / "printed.yaml"
    saved.write_text(proc.stdout)
    config = load_config(saved)  # what was printed is a config file of the same run
    assert (config.learning_rate, config.prompts_per_step, config.replay_batch_size) == (1e-5, 2, 16)
    assert (config.cache.window, config.report_to) == (8, [])
    sft = run_main(capsys, "sft", "--max_length", "64", "--print-config")
    assert sft.returncode == 0 and "max_completion_length: 64" in sft.stdout
    assert_one_line_error(run_main(capsys, "grpo", "--per_device_train_batch_size", "3"),
                          "not a multiple of num_generations")
    assert_one_line_error(run_main(capsys, "grpo", "--push_to_hub"), "push_to_hub=True has no counterpart")
    if importlib.util.find_spec("tensorboard") is None:  # refused when the config is built, in one line
        assert_one_line_error(run_main(capsys, "grpo", "report_to=tensorboard"), "pip install tensorboard")


def test_eval_output_is_named_after_the_run_and_its_settings(tmp_path):
    assert run_name(str(tmp_path / "runs" / "quick" / "adapter"), None) == "quick"
    step = tmp_path / "runs" / "quick" / "checkpoints" / "step-00000008" / "adapter"
    assert run_name(str(step), None) == "quick-step-00000008"
    assert run_name(None, "Qwen/Qwen2.5-3B-Instruct") == "Qwen2.5-3B-Instruct"
    one = default_output(None, "default", {"windows": [4]})
    other = default_output(None, "default", {"windows": [8]})
    assert one.parent == Path("runs", "eval") and one.name.startswith("default-") and one != other
    assert default_output(None, "default", {"windows": [4]}) == one  # the same command resumes


def test_train_bad_override_is_one_line(capsys):
    assert_one_line_error(run_main(capsys, "train", "max_steps"), "not KEY=VALUE")
    assert_one_line_error(run_main(capsys, "train", "cache.window=0"), "window must be >= 1")
    assert_one_line_error(run_main(capsys, "sft", "no_such_key=1"), "no_such_key")


# --------------------------------------------------------------------------- what a paranoid user tries


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """`main(args)` in this process (no interpreter start-up), as run_cli reports it. The log
    handler main() installs writes to this call's captured stderr and is removed afterwards."""
    log = logging.getLogger("thoughtfold")
    handlers, log.handlers = log.handlers, []
    try:
        code = main(list(args))
    finally:
        log.handlers = handlers
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


@pytest.mark.parametrize("option", ["--temperature", "--top-p"])
def test_nan_sampling_settings_fail_before_the_model_loads(tmp_path, capsys, option):
    proc = run_main(capsys, "generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi",
                    option, "nan")
    assert_one_line_error(proc, option.lstrip("-").replace("-", "_"), "nan")


def test_token_ids_outside_the_vocabulary(tiny_dirs, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": [1, 2, 99999999]}\n')
    proc = run_main(capsys, "generate", "--model", str(tiny_dirs["llama"]), "--prompts-file", str(f))
    assert_one_line_error(proc, "token id 99999999", "0 to 258")


def test_deeply_nested_json_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match="line 1: JSON nested too deeply"):
        read_prompts_file(f)


def test_prompt_plus_new_tokens_beyond_the_model_positions(tiny_dirs, capsys):
    proc = run_main(capsys, "generate", "--model", str(tiny_dirs["llama"]), "--prompt", "x" * 500,
                    "--no-chat-template", "--max-new-tokens", "20")
    assert_one_line_error(proc, "500 tokens + max_new_tokens 20 = 520", "at most 512",
                          "lower max_new_tokens to 12")


@pytest.mark.parametrize("damage, needles", [
    ("nan", ("holds NaN or infinite values",)),
    ("truncate", ("truncated or corrupt",)),
])
def test_damaged_adapter_is_refused_at_load(tiny_dirs, tmp_path, capsys, damage, needles):
    from safetensors.torch import load_file, save_file

    from thoughtfold.config import AdapterConfig
    from thoughtfold.policy import Policy

    Policy.from_pretrained(str(tiny_dirs["llama"]), adapter=AdapterConfig(mode="pte", rank=4)).save_adapter(
        str(tmp_path / "ad"))
    weights = tmp_path / "ad" / "adapter.safetensors"
    if damage == "nan":
        tensors = load_file(weights)
        next(iter(tensors.values()))[0, 0] = float("nan")
        save_file(tensors, weights)
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    proc = run_main(capsys, "generate", "--adapter", str(tmp_path / "ad"), "--prompt", "hi", "--json")
    assert_one_line_error(proc, str(weights), *needles)


def test_train_rejects_non_finite_numbers_and_a_list_config(tmp_path, capsys):
    assert_one_line_error(run_main(capsys, "train", "learning_rate=nan"),
                          "learning_rate must be a finite number, got nan")
    assert_one_line_error(run_main(capsys, "train", "epsilon_high=inf"),
                          "epsilon_high must be a finite number")
    assert_one_line_error(run_main(capsys, "train", "adapter.alpha=nan"), "alpha must be a finite number")
    config = tmp_path / "list.yaml"
    config.write_text("- learning_rate: 1.0e-3\n- max_steps: 2\n")
    assert_one_line_error(run_main(capsys, "train", "--config", str(config)),
                          "must be a mapping of settings (key: value), not a list")


def test_building_the_parser_imports_neither_torch_nor_transformers():
    """`thoughtfold --help` and a usage error answer at once: the commands load the engine when they run."""
    code = ("import sys\nfrom thoughtfold.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
