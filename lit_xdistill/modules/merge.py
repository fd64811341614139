"""Stage III: ``MergeModule`` (fixed or learned merge coefficients) and the merge report.

* :class:`MergeModule` -- ``lit-xdistill fit --config configs/merge.yaml``: fixed weights (``learn:
  false``, streamed by :func:`lit_xdistill.modules.experts.merge_experts`) or merge coefficients learned by
  minimising the KD loss with the experts frozen.
* :func:`merge_report` -- held-out KD loss / perplexity per domain for experts, merges and a generalist.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call

from ..models import XDistillForCausalLM
from ..teachers import TeacherSpec
from .base import warmup_then
from .experts import (
    COEFFICIENTS_FILE,
    ExpertSet,
    MergeCompatibilityError,
    check_experts,
    layer_group,
    merge_lineage,
    normalise_weights,
    stream_merge,
)
from .kd import KDModule
from .losses import kd_loss

__all__ = ["MergeModule", "merge_report"]


class MergeModule(KDModule):
    """Stage III (METHOD.md): merge frozen experts, with fixed weights or learned merge coefficients.

    ``learn: false``: the experts are merged by streaming (:func:`merge_experts`) into ``export_dir``
    (a temporary folder without one) when the model is configured; ``fit`` then trains nothing and
    ``validate`` reports the KD loss of that merge (use it to sweep weights).

    ``learn: true``: all K experts are held in memory (fine for small students; 8B experts need the
    streaming path) and the coefficients are the only parameters: λ = softmax(logits) per expert
    (per decoder layer with ``per_layer``, plus one group for embeddings, final norm and head), so λ
    stays on the simplex. Each step evaluates the student with θ = Σ λ_i θ_i computed on the fly
    (``torch.func.functional_call``) and minimises the KD loss of ``KDModule`` (cached top-k from the
    batch, else a live teacher). At the end of ``fit`` the merge with the learned λ is streamed from
    the expert files to ``export_dir`` together with ``merge_coefficients.json``. λ is fitted on the
    data module's train split: give the merge run a small mix of every domain (``data.max_train_tokens``).

    Args:
        experts: exported expert folders, all fine-tuned from the same stage-I student.
        weights: fixed merge weights λ_i >= 0 (normalised with a warning when they do not sum to 1);
            with ``learn`` they initialise the coefficients. None: uniform.
        learn: learn the merge coefficients by minimising the KD loss (experts frozen).
        per_layer: learn one coefficient vector per decoder layer (else one per expert).
        teacher: the teacher the experts were distilled from (checked against their ``teacher_identity``).
        lr: Adam learning rate of the coefficient logits.
        warmup_steps: linear warm-up steps.
        ce_weight: weight of the next-token cross-entropy in the KD loss.
        kl_weight: weight of KL(teacher || student) on the teacher's top-k.
        top_k: teacher tokens kept per position for a live teacher.
        export_dir: write the merged student (plain HF folder) here.
    """

    def __init__(
        self,
        experts: list[str],
        weights: list[float] | None = None,
        learn: bool = False,
        per_layer: bool = False,
        teacher: TeacherSpec | None = None,
        lr: float = 5e-2,
        warmup_steps: int = 0,
        ce_weight: float = 0.9,
        kl_weight: float = 0.1,
        top_k: int = 256,
        export_dir: str | None = None,
    ):
        super().__init__(teacher, None, lr, warmup_steps, 0.0, ce_weight, kl_weight, top_k, "all", export_dir)
        if not experts:
            raise ValueError("experts is empty: list the exported expert folders to merge")
        if per_layer and not learn:
            raise ValueError("per_layer needs learn: true (fixed weights are one value per expert)")
        self.experts = list(experts)
        self.weights = None if weights is None else normalise_weights(weights, len(experts))
        self.learn, self.per_layer = learn, per_layer
        self.expert_set: ExpertSet | None = None
        self.merge_logits: torch.nn.Parameter | None = None
        self._stacked: dict[str, Tensor] = {}  # name -> (K, ...) expert tensors; kept out of checkpoints
        self._tmp_dir: str | None = None

    def configure_model(self) -> None:
        """Check the experts, then load the fixed merge or the frozen experts and the coefficients."""
        if self.student is not None:
            return
        self.expert_set = check_experts(self.experts)
        found = self.expert_set.teacher_identity
        if found != self.teacher_spec.identity:
            raise MergeCompatibilityError(
                f"the experts were distilled from teacher {found!r}, but model.teacher is "
                f"{self.teacher_spec.identity!r}: set model.teacher to the experts' teacher"
            )
        if not self.learn:
            self.student = XDistillForCausalLM.from_pretrained(self._fixed_merge(), dtype=torch.float32)
            self.student.requires_grad_(False)
            return
        models = [XDistillForCausalLM.from_pretrained(p, dtype=torch.float32) for p in self.experts]
        self.student = models[0].requires_grad_(False)
        params = [dict(m.named_parameters()) for m in models]
        self._stacked = {n: torch.stack([p[n].detach() for p in params]) for n in params[0]}
        groups = self.expert_set.num_layers + 1 if self.per_layer else 1
        init = torch.tensor(self.weights or [1.0] * len(self.experts)).clamp_min(1e-6).log()
        self.merge_logits = torch.nn.Parameter(init.expand(groups, -1).clone())

    def _fixed_merge(self) -> Path:
        target = self.export_dir
        if target is None:
            self._tmp_dir = target = tempfile.mkdtemp(prefix="lit-xdistill-merge-")
        weights = self.weights or [1 / len(self.experts)] * len(self.experts)
        trainer = self._trainer
        if trainer is None or trainer.is_global_zero:
            stream_merge(
                self.expert_set, lambda name: weights, target, merge_lineage(self.expert_set, weights)
            )
        if trainer is not None:
            trainer.strategy.barrier("merge")
        return Path(target)

    def setup(self, stage: str) -> None:
        """Fixed weights: ``fit`` has nothing to train (the merge is written by ``configure_model``)."""
        if stage == "fit" and not self.learn:
            self.trainer.limit_train_batches = 0

    def teardown(self, stage: str) -> None:
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def select_trainable(self) -> None:
        self.student.requires_grad_(False)

    def coefficients(self) -> Tensor:
        """λ, shape (groups, K): softmax of the logits (rows on the simplex)."""
        return self.merge_logits.softmax(-1)

    def _group(self, name: str) -> int:
        return layer_group(name, self.expert_set.num_layers) if self.per_layer else 0

    def merged_parameters(self) -> dict[str, Tensor]:
        """θ = Σ λ_i θ_i for every student parameter, differentiable in the coefficient logits."""
        lam = self.coefficients()
        for name, stacked in self._stacked.items():
            if stacked.device != lam.device:
                self._stacked[name] = stacked.to(lam.device)
        return {n: torch.tensordot(lam[self._group(n)], t, dims=1) for n, t in self._stacked.items()}

    def _losses(self, batch: dict[str, Tensor]):
        if not self.learn:
            return super()._losses(batch)
        topk_ids, topk_lp = self.teacher_topk(batch)
        out = functional_call(
            self.student, self.merged_parameters(), args=(), kwargs=self.student_inputs(batch)
        )
        lam = self.coefficients().detach().mean(0)
        self.log_dict({f"merge/lambda_{i}": v for i, v in enumerate(lam)})
        return kd_loss(out.logits, batch["labels"], topk_ids, topk_lp, self.ce_weight, self.kl_weight)

    def configure_optimizers(self):
        if not self.learn:
            return None
        optimizer = torch.optim.Adam([self.merge_logits], lr=self.lr)
        schedule = partial(
            warmup_then, warmup=max(1, self.warmup_steps), total=1, decay="constant", final_ratio=1.0
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("train/grad_norm", self.merge_logits.grad.detach().norm(), on_step=True)

    def export(self, path: str | os.PathLike, state: dict | None = None) -> Path:
        """Stream the merge with the learned λ from the expert files; λ also goes to a JSON file.

        Args:
            path: the folder to write.
            state: unused: the merged weights are streamed from the expert files, not gathered.
        """
        lam = self.coefficients().detach().cpu().double()
        rows = lam.tolist()
        groups = (
            [f"layer_{i:02d}" for i in range(self.expert_set.num_layers)] + ["other"]
            if self.per_layer
            else ["all"]
        )
        record = {
            "experts": self.experts,
            "per_layer": self.per_layer,
            "lambda": {g: r for g, r in zip(groups, rows)},
        }
        weights_of = lambda name: rows[self._group(name)]
        return stream_merge(
            self.expert_set,
            weights_of,
            path,
            merge_lineage(self.expert_set, record["lambda"]),
            {COEFFICIENTS_FILE: json.dumps(record, indent=2) + "\n"},
        )

    def on_train_end(self) -> None:
        if self.learn:
            super().on_train_end()


# -- report ---------------------------------------------------------------------------------------------
def _heldout_batches(
    teacher: TeacherSpec, sources: list[str], seq_len: int, blocks: int, batch_size: int, cache_dir: str
) -> list[dict[str, Tensor]]:
    from torch.utils.data import DataLoader, Subset

    from ..data import DistillDataModule

    dm = DistillDataModule(
        tokenizer=teacher.name, sources=sources, seq_len=seq_len, batch_size=batch_size, cache_dir=cache_dir
    )
    dm.prepare_data()
    dm.setup()
    heldout = dm.datasets["heldout"]
    if len(heldout) == 0:
        raise ValueError(f"sources {sources} hold no held-out block of seq_len={seq_len}: lower seq_len")
    return list(DataLoader(Subset(heldout, range(min(blocks, len(heldout)))), batch_size=batch_size))


@torch.no_grad()
def _evaluate(
    model: XDistillForCausalLM,
    batches: list[dict[str, Tensor]],
    teacher_topk: list,
    device: str,
    ce_weight: float,
    kl_weight: float,
) -> tuple[float, float]:
    """Token-weighted held-out KD loss and perplexity (exp of the mean CE)."""
    loss = ce = tokens = 0.0
    for batch, (ids, lps) in zip(batches, teacher_topk):
        inputs = {k: batch[k].to(device) for k in ("input_ids", "segment_ids", "position_ids")}
        out = kd_loss(model(**inputs).logits, batch["labels"].to(device), ids, lps, ce_weight, kl_weight)
        loss, ce, tokens = (
            loss + out.loss.item() * out.tokens,
            ce + out.ce.item() * out.tokens,
            tokens + out.tokens,
        )
    return loss / tokens, math.exp(ce / tokens)


def merge_report(
    models: dict[str, str],
    domains: dict[str, list[str]],
    teacher: str,
    out_dir: str,
    seq_len: int = 1024,
    blocks: int = 16,
    batch_size: int = 4,
    ce_weight: float = 0.9,
    kl_weight: float = 0.1,
    top_k: int = 256,
    device: str = "auto",
    cache_dir: str = ".cache/lit_xdistill/data",
) -> Path:
    """Held-out KD loss and perplexity per domain for every model: ``<out_dir>/merge_report.md`` (+ .png).

    Args:
        models: row label -> exported student folder (experts, uniform merge, learned merge, generalist).
        domains: column label -> data sources of that domain (as in ``data.sources``).
        teacher: the teacher (any ``TeacherSpec`` name) whose top-k the KL term uses and whose tokenizer
            tokenises the data.
        out_dir: folder for ``merge_report.md``, ``merge_report.json`` and ``merge_report.png``.
        seq_len: tokens per evaluation block.
        blocks: at most this many held-out blocks per domain (the ``heldout`` split, never trained on).
        batch_size: blocks per forward pass.
        ce_weight: CE weight of the reported KD loss.
        kl_weight: KL weight of the reported KD loss.
        top_k: teacher tokens kept per position.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        cache_dir: token cache folder of the data module.
    """
    from ..models import student_from_teacher
    from .losses import topk_logprobs

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    spec = TeacherSpec(teacher, dtype="float32")
    live = student_from_teacher(spec.load_model(), spec.identity, mixer="attention").to(dev).eval()
    data = {}
    for domain, sources in domains.items():
        batches = _heldout_batches(spec, sources, seq_len, blocks, batch_size, cache_dir)
        topk = []
        for b in batches:
            logits = live(**{k: b[k].to(dev) for k in ("input_ids", "segment_ids", "position_ids")}).logits
            ids, lps = topk_logprobs(logits.flatten(0, 1), top_k)
            topk.append((ids.view(*logits.shape[:2], -1), lps.view(*logits.shape[:2], -1)))
        data[domain] = (batches, topk)
    del live
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for label, path in models.items():
        model = XDistillForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
        if model.config.teacher_identity != spec.identity:
            raise MergeCompatibilityError(
                f"model {label} ({path}) was distilled from "
                f"{model.config.teacher_identity!r}, not from {spec.identity!r}"
            )
        results[label] = {d: _evaluate(model, b, t, dev, ce_weight, kl_weight) for d, (b, t) in data.items()}
        del model
    return _write_report(results, list(domains), Path(out_dir), teacher, seq_len, blocks)


def _write_report(
    results: dict[str, dict[str, tuple[float, float]]],
    domains: list[str],
    out: Path,
    teacher: str,
    seq_len: int,
    blocks: int,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    head = "| model | " + " | ".join(f"{d} KD loss | {d} ppl" for d in domains) + " | mean KD loss |"
    lines = [
        f"# Merge report\n\nTeacher `{teacher}`; held-out split, up to {blocks} blocks of {seq_len} "
        "tokens per domain; KD loss = 0.9 CE + 0.1 top-k KL (lower is better).\n",
        head,
        "|" + "---|" * (2 * len(domains) + 2),
    ]
    for label, row in results.items():
        cells = " | ".join(f"{row[d][0]:.4f} | {row[d][1]:.2f}" for d in domains)
        lines.append(f"| {label} | {cells} | {sum(row[d][0] for d in domains) / len(domains):.4f} |")
    (out / "merge_report.md").write_text("\n".join(lines) + "\n")
    (out / "merge_report.json").write_text(json.dumps(results, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(domains) * max(1, len(results)) / 2, 3.5))
    width = 0.8 / len(results)
    for i, (label, row) in enumerate(results.items()):
        ax.bar([d + i * width for d in range(len(domains))], [row[d][0] for d in domains], width, label=label)
    ax.set_xticks([d + 0.4 - width / 2 for d in range(len(domains))], domains)
    ax.set_ylabel("held-out KD loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "merge_report.png", dpi=120)
    plt.close(fig)
    return out / "merge_report.md"
