"""lm-evaluation-harness drives the server unchanged through its `local-completions` model (what `make eval`
runs): the base model's per-request loglikelihoods there are lm-eval's own in-process `hf` model's, and the
`shout` adapter moves reft_gen's `caps` metric. A few examples of the bench/eval tasks, not the full runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import huggingface_hub
import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from server.model import converted_gguf_dir, default_gguf_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LIMIT = 6


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing from the Hugging Face hub; from the repo root, where the tasks' data_files are resolved.

    The libraries read the offline switches when first imported (other test modules may have done so),
    so their constants are set as well as the environment."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.chdir(REPO)
        yield


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The base model as a local HF directory: `pretrained` of the `hf` model, `tokenizer` of the served one."""
    return Path(converted_gguf_dir(default_gguf_path()))


@pytest.fixture(scope="module")
def server(tmp_path_factory, reft_server_factory):
    """The base model and `shout`, from a copy of the registry (serving writes a lock file into it)."""
    root = tmp_path_factory.mktemp("eval")
    registry = root / "adapters"
    registry.mkdir()
    shutil.copy(REPO / "adapters" / "shout.safetensors", registry)
    return reft_server_factory(registry, root / "server.log")


def evaluate(model: str, model_args: dict, task: str) -> tuple[dict[str, float], list[dict]]:
    """One lm-eval run of `task` on LIMIT examples: its metrics, and its samples in doc order."""
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=LIMIT, log_samples=True,
                                  task_manager=TaskManager(include_path=str(REPO / "bench" / "eval")))
    assert out is not None
    metrics = {k.split(",")[0]: v for k, v in out["results"][task].items() if "," in k and "_stderr" not in k}
    return metrics, sorted(out["samples"][task], key=lambda s: s["doc_id"])


def served(server, model_dir: Path, name: str, task: str) -> tuple[dict[str, float], list[dict]]:
    """`evaluate` through the server with bench/eval/run.py's model_args (fewer requests in flight)."""
    return evaluate("local-completions", {
        "base_url": f"{server.url}/v1/completions", "model": name, "tokenizer": str(model_dir),
        "tokenizer_backend": "huggingface", "num_concurrent": 4, "max_retries": 1, "timeout": 600,
    }, task)


def loglikelihoods(sample: dict) -> list[tuple[float, bool]]:
    """(loglikelihood, is_greedy) per choice from the sample's `resps`; its `filtered_resps` must say the same."""
    pairs = [tuple(r) for (r,) in sample["resps"]]
    assert [tuple(r) for r in sample["filtered_resps"]] == pairs, sample
    return pairs


def test_server_loglikelihoods_match_hf(server, model_dir):
    ours, our_samples = served(server, model_dir, "base", "reft_mc")
    ref, ref_samples = evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu",
                                       "batch_size": 8}, "reft_mc")
    assert [s["doc_id"] for s in our_samples] == [s["doc_id"] for s in ref_samples] == list(range(LIMIT))
    for o, r in zip(our_samples, ref_samples, strict=True):
        assert o["arguments"] == r["arguments"]
        got, want = loglikelihoods(o), loglikelihoods(r)
        assert len(got) == len(want) == len(o["doc"]["choices"]), (got, want)
        for (got_ll, got_greedy), (want_ll, want_greedy) in zip(got, want, strict=True):
            assert abs(got_ll - want_ll) < 1e-3 and got_greedy == want_greedy, (o["doc"]["question"], got, want)
        assert (o["acc"], o["acc_norm"]) == (r["acc"], r["acc_norm"]), o["doc"]["question"]
    assert ours == ref
    assert ours["acc"] > 0, ours  # easy questions: the comparison covers right answers too


def test_shout_moves_caps(server, model_dir):
    base, base_samples = served(server, model_dir, "base", "reft_gen")
    shout, shout_samples = served(server, model_dir, "shout", "reft_gen")
    answers = [(b["filtered_resps"][0], s["filtered_resps"][0]) for b, s in zip(base_samples, shout_samples,
                                                                              strict=True)]
    assert shout["caps"] - base["caps"] >= 0.5, (base, shout, answers)
