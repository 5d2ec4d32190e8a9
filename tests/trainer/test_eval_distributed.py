"""Eval under FSDP2 on 2 processes: each rank runs its share of the sequences, the sums match one process.

The process group is started as `cpt train` starts it, so train.dist_timeout_s is checked here too.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from tests.trainer.trainutil import one_torch_thread  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.slow


def rank_main(rank: int, world_size: int, port: int, model_dir: str, sequences_file: str, out: str) -> None:
    """One rank: shard the model with FSDP2, evaluate, write its result and how many sequences it ran forward."""
    import os

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from cpt.trainer import distributed
    from cpt.trainer.evaluate import evaluate
    from cpt.trainer.objectives import CausalLMObjective

    torch.set_num_threads(1)
    env = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({key: str(value) for key, value in env.items()})  # what torchrun sets
    world = distributed.setup("cpu", timeout_s=77)  # train.dist_timeout_s
    try:
        timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        objective = distributed.wrap(CausalLMObjective(model), world, True, model._no_split_modules)
        seen = []
        model.model.embed_tokens.register_forward_hook(lambda m, args, output: seen.append(args[0].shape[0]))
        sets = {"code": torch.load(sequences_file, weights_only=True)}
        result = evaluate(objective, sets, micro_batch_size=2, world=world)
        record = {"result": result, "forwards": seen, "timeout_s": timeout.total_seconds()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        distributed.teardown()


def test_fsdp_eval_splits_the_sequences_across_ranks_and_sums_them(tiny_model_dir, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.trainer.data import eval_sequences
    from cpt.trainer.evaluate import evaluate
    from tests.conftest import stdlib_texts
    from tests.helpers import make_prepared_dataset

    path = make_prepared_dataset(tmp_path / "code", stdlib_texts(8, max_chars=2000), tokenizer_dir=tokenizer_dir)
    sequences = eval_sequences(path, AutoTokenizer.from_pretrained(str(tokenizer_dir)), 64, 5)
    assert sequences["input_ids"].shape[0] == 5  # odd: rank 0 takes 3 sequences, rank 1 takes 2
    torch.save(sequences, tmp_path / "sequences.pt")
    expected = evaluate(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), {"code": sequences}, 2)

    context = torch.multiprocessing.get_context("spawn")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    args = (2, port, str(tiny_model_dir), str(tmp_path / "sequences.pt"), str(tmp_path))
    procs = [context.Process(target=rank_main, args=(rank, *args)) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["result"] == pytest.approx(expected, rel=1e-5)
        assert rank["timeout_s"] == 77
    # Rank 0: sequences 0, 2, then 4; rank 1: 1, 3, then one repeated sequence (its result dropped), so both
    # run 2 forwards, as FSDP's all-gathers need. Neither runs all 5 sequences.
    assert ranks[0]["forwards"] == [2, 1]
    assert ranks[1]["forwards"] == [2, 1]
