"""Mid-epoch resume through Lightning: stop after N steps, restore in a new Trainer, lose nothing.

The reference is one uninterrupted 2-epoch run; the interrupted run's blocks (before + after the
restart) must be exactly the same sequence: no block repeated, skipped or reordered.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_xdistill.data import DistillDataModule

STEPS_PER_EPOCH = 10


class BlockRecorder(L.LightningModule):
    """Records every training block it is given; trains one dummy parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[bytes] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.extend(row.numpy().tobytes() for row in batch["input_ids"])
        return self.weight * batch["input_ids"].float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(datamodule_args: dict, root, max_steps: int = -1, ckpt_path: str | None = None) -> list[bytes]:
    model = BlockRecorder()
    trainer = L.Trainer(
        max_epochs=2,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")],
    )
    trainer.fit(model, datamodule=DistillDataModule(**datamodule_args), ckpt_path=ckpt_path)
    return model.seen


@pytest.fixture
def datamodule_args(teacher_dir, tmp_path, text_dir) -> dict:
    return {
        "tokenizer": str(teacher_dir),
        "sources": [str(text_dir)],
        "seq_len": 64,
        "batch_size": 4,
        "max_train_tokens": 64 * 4 * STEPS_PER_EPOCH,
        "cache_dir": str(tmp_path / "cache"),
        "seed": 7,
    }


@pytest.mark.parametrize(("stop_step", "num_workers"), [(3, 0), (STEPS_PER_EPOCH, 0), (13, 2)])
def test_resume_continues_exactly_where_it_stopped(datamodule_args, tmp_path, stop_step, num_workers):
    datamodule_args["num_workers"] = num_workers
    reference = fit(datamodule_args, tmp_path / "reference")
    assert len(reference) == 2 * STEPS_PER_EPOCH * 4 and len(set(reference[:40])) == 40
    before = fit(datamodule_args, tmp_path / "run", max_steps=stop_step)
    after = fit(
        datamodule_args, tmp_path / "resumed", ckpt_path=str(tmp_path / "run" / f"step={stop_step}.ckpt")
    )
    assert len(before) == stop_step * 4
    assert before + after == reference


def test_resume_refuses_other_data(datamodule_args, tmp_path):
    fit(datamodule_args, tmp_path / "run", max_steps=2)
    datamodule_args["seq_len"] = 32
    with pytest.raises(ValueError, match="trained on different data"):
        fit(datamodule_args, tmp_path / "resumed", ckpt_path=str(tmp_path / "run" / "step=2.ckpt"))


def test_resume_twice(datamodule_args, tmp_path):
    reference = fit(datamodule_args, tmp_path / "reference")
    first = fit(datamodule_args, tmp_path / "a", max_steps=3)
    second = fit(datamodule_args, tmp_path / "b", max_steps=16, ckpt_path=str(tmp_path / "a" / "step=3.ckpt"))
    third = fit(datamodule_args, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "step=16.ckpt"))
    assert first + second + third == reference


def test_ranks_share_an_epoch_and_resume_on_another_world_size(datamodule_args):
    from lit_xdistill.data.datamodule import BlockSampler, ResumableDataLoader

    dm = DistillDataModule(**datamodule_args)
    dm.setup("fit")
    dataset, fingerprint = dm.datasets["train"], dm.data_fingerprint()
    full = list(BlockSampler(dataset, shuffle=True, seed=7))
    loaders = [
        ResumableDataLoader(
            dataset, BlockSampler(dataset, True, 7, num_replicas=2, rank=r), 2, 0, fingerprint
        )
        for r in range(2)
    ]
    rank_blocks = [list(loader.sampler) for loader in loaders]
    assert sorted(rank_blocks[0] + rank_blocks[1]) == sorted(full) and not set(rank_blocks[0]) & set(
        rank_blocks[1]
    )
    iterators = [iter(loader) for loader in loaders]
    for _ in range(3):  # 3 steps of 2 blocks on each of 2 ranks: the first 12 blocks of the epoch
        for iterator in iterators:
            next(iterator)
    single = ResumableDataLoader(dataset, BlockSampler(dataset, True, 7), 4, 0, fingerprint)
    single.load_state_dict(loaders[0].state_dict())
    assert list(single.sampler) == full[12:]
