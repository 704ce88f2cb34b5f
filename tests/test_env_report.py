"""`chatforge env`: RAM, what earlier runs left on disk, and a depth that suits the machine."""

import json

from chatforge import env_report, paths
from chatforge.cli import main
from chatforge.tokenizer import set_current_tokenizer
from tiny_chat import save_tiny_checkpoint, tiny_tokenizer

GiB = 2**30


def test_a_cpu_gets_a_toy_depth_and_a_gpu_one_that_grows_with_its_memory():
    depth, why = env_report.suggest_depth("cpu", None, cpu_cores=2)
    assert 4 <= depth <= 6 and "no GPU" in why and "2 CPU core(s)" in why
    depths = [env_report.suggest_depth("cuda", gib * GiB, 16)[0] for gib in (8, 24, 80)]
    assert depths == sorted(depths) and depths[0] < depths[-1]
    assert 8 <= depths[1] <= 20  # a 24 GB card: a real model, not the speedrun's largest
    assert "24 GiB" in env_report.suggest_depth("cuda", 24 * GiB, 16)[1]


def test_env_lists_what_is_on_disk(capsys):
    save_tiny_checkpoint("base", "d2")  # the old layout: the tokenizer straight in tokenizer/
    tiny_tokenizer().save(paths.tokenizer_dir("mine"))
    set_current_tokenizer("mine")
    save_tiny_checkpoint("sft", "v2")
    shards = paths.data_dir("fineweb-edu")
    for i in range(3):
        (shards / f"shard_{i:05d}.parquet").write_bytes(b"")
    (paths.task_cache_dir(create=True) / "gsm8k").mkdir()
    (paths.eval_bundle_dir(create=True) / "eval_meta_data.csv").write_text("x")

    main(["env", "--device", "cpu", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["tokenizers"] == "mine (current), tokenizer/ (unnamed, old layout)"
    assert info["checkpoints"] == "base/d2 step 1, sft/v2 step 1"
    assert info["corpus shards"] == "fineweb-edu: 3 shard(s)"
    assert info["task data"] == "gsm8k"
    assert info["CORE bundle"].endswith("eval_bundle")
    assert "GiB total" in info["RAM"] and "available" in info["RAM"]
    assert info["suggested depth"].startswith("--depth ")


def test_an_empty_base_directory_says_how_to_fill_it():
    info = env_report.collect("cpu")
    assert info["checkpoints"] == "none" and "tokenizer train" in info["tokenizers"]
    assert "data download" in info["corpus shards"]
