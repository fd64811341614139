"""Stage III: ``MergeModule`` (fixed or learned merge coefficients) and the merge report.

* :class:`MergeModule` -- ``lit-xdistill fit --config configs/merge.yaml``: fixed weights (``learn:
  false``, streamed by :func:`lit_xdistill.modules.experts.merge_experts`) or merge coefficients learned by
  minimising the KD loss with the experts frozen.
* :func:`merge_report` -- held-out KD loss / perplexity per domain for experts, merges and a generalist.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.func import functional_call

from ..models import XDistillForCausalLM
from ..teachers import TeacherSpec
from .base import _say, warmup_then
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

    Several GPUs (``configs/fsdp.yaml`` or DDP): with ``learn: true`` the student and the experts stay out of
    the module tree (plain attributes, like the live teacher), so the strategy shards or replicates only the
    coefficients; every rank holds the experts whole (the stage is for students that fit one GPU K times) and
    takes its share of the batch, the coefficient gradients are reduced across ranks, and checkpoints hold
    only the coefficients. Under FSDP's bf16 mixed precision the coefficient logits enter the forward in bf16
    (their fp32 masters are updated). The merge is streamed by rank 0 at the end; the other ranks wait.

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
        # Not trained, only the carrier of the merged weights in functional_call: kept out of the module tree
        # (object.__setattr__ skips nn.Module's registration), so FSDP never swaps its parameters for shards.
        object.__setattr__(self, "student", models[0].requires_grad_(False))
        params = [dict(m.named_parameters()) for m in models]
        self._stacked = {n: torch.stack([p[n].detach() for p in params]) for n in params[0]}
        groups = self.expert_set.num_layers + 1 if self.per_layer else 1
        init = torch.tensor(self.weights or [1.0] * len(self.experts)).clamp_min(1e-6).log()
        self.merge_logits = torch.nn.Parameter(init.expand(groups, -1).clone())
        source = self.student_options.init_from
        if source and str(source).endswith(".ckpt"):  # `lit-xdistill export` of a learned merge: its λ
            state = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
            self.merge_logits.data.copy_(state["merge_logits"])

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
            if self.trainer.world_size > 1:  # before the strategy wraps the model (DDP refuses a frozen one)
                raise ValueError(
                    "model.learn is false: the fixed-weight merge trains nothing, and a multi-process strategy "
                    "cannot wrap a model without trainable parameters. Run `lit-xdistill validate` with the same "
                    "configs (the merge is written to export_dir when the model is configured, and scored), or "
                    "`fit` on one device."
                )
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

    def full_coefficients(self) -> Tensor:
        """λ whole and detached, on every rank. Collective under FSDP (every rank must call it): outside the
        forward each rank holds only its slice of the coefficient logits."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False):
                return self.coefficients().detach().clone()
        return self.coefficients().detach()

    def merged_parameters(self, lam: Tensor | None = None) -> dict[str, Tensor]:
        """θ = Σ λ_i θ_i for every student parameter, differentiable in the coefficient logits.

        Args:
            lam: the coefficients to merge with; None: the current ``coefficients()`` (inside the forward).
        """
        lam = self.coefficients() if lam is None else lam
        for name, stacked in self._stacked.items():
            if stacked.device != lam.device:
                self._stacked[name] = stacked.to(lam.device)
        return {n: torch.tensordot(lam[self._group(n)], t, dims=1) for n, t in self._stacked.items()}

    def _losses(self, batch: dict[str, Tensor]):
        if not self.learn:
            return super()._losses(batch)
        topk_ids, topk_lp = self.teacher_topk(batch)
        self.student.to(self.device).train(self.training)  # outside the module tree: Lightning moves it not
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
        Collective under FSDP (``full_coefficients``); ``on_train_end`` gathers λ on every rank instead.

        Args:
            path: the folder to write.
            state: unused: the merged weights are streamed from the expert files, not gathered.
        """
        return self._stream_merge(path, self.full_coefficients())

    def _stream_merge(self, path: str | os.PathLike, lam: Tensor) -> Path:
        rows = lam.cpu().double().tolist()
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
        """Learned λ: gathered on every rank, then rank 0 streams the merge; the others wait. (Fixed weights:
        ``configure_model`` wrote the merge already.)"""
        if not self.learn or not self.export_dir:
            return
        lam = self.full_coefficients()  # collective under FSDP
        if self.trainer.is_global_zero:
            _say(f"[lit-xdistill] merge exported to {self._stream_merge(self.export_dir, lam)}")
        self.trainer.strategy.barrier("export")

    def evaluation_student(self) -> torch.nn.Module | None:
        """Learned λ: a copy of the student holding the merge with the current λ, on rank 0 (None elsewhere;
        collective under FSDP). Fixed weights: the student, which holds the merge."""
        if not self.learn:
            return super().evaluation_student()
        lam = self.full_coefficients()
        if not self.trainer.is_global_zero:
            return None
        merged = copy.deepcopy(self.student).to(self.device)
        with torch.no_grad():
            merged.load_state_dict(self.merged_parameters(lam.to(self.device)), strict=False)  # buffers stay
        return merged


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
    # evenly spaced over the split (not its first blocks, which come from one or two documents)
    index = torch.linspace(0, len(heldout) - 1, min(blocks, len(heldout))).round().long().tolist()
    return list(DataLoader(Subset(heldout, index), batch_size=batch_size))


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
        n = int(out.tokens)
        loss, ce, tokens = loss + out.loss.item() * n, ce + out.ce.item() * n, tokens + n
    return loss / tokens, math.exp(ce / tokens)


def _wintie_summary(report, suite_name: str, limit: int | None) -> dict:
    """JSON-ready Win-and-Tie summary of one model: C_0, α*, C_α on the grid and per-task recovery."""
    star = report.alpha_star
    return {
        "suite": suite_name,
        "limit": limit,
        "C_0": report.coverage_at(0.0),
        "alpha_star": None if math.isnan(star) else star,
        "coverage": {f"{a:.2f}": c for a, c in zip(report.alphas, report.coverage)},
        "tasks": {
            t.task: {
                "metric": t.metric,
                "higher_is_better": t.higher_is_better,
                "teacher": t.teacher,
                "student": t.student,
                "recovery": None if math.isnan(t.recovery) else t.recovery,
                "win_or_tie_at_0": t.wins_or_ties(0.0),
            }
            for t in report.tasks
        },
    }


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


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
    suite: str | None = None,
    limit: int | None = None,
    eval_batch_size: int = 8,
    eval_cache_dir: str | None = None,
) -> Path:
    """Held-out KD loss / perplexity per domain (+ Win-and-Tie on a suite) per model: ``merge_report.md``.

    Writes ``<out_dir>/merge_report.md``, ``merge_report.json`` and ``merge_report.png``. With ``suite``,
    every model is also evaluated on that lm-eval suite (:func:`lit_xdistill.eval.harness.run_suite`)
    and compared with the teacher's scores (:func:`lit_xdistill.eval.harness.teacher_results`, cached
    per teacher + suite + limit) by Win-and-Tie: the table gains ``C_0`` and ``α*`` columns, a second
    table lists each task's score and recovery S/T per model, the JSON gains a ``wintie`` entry per
    model and the plot a ``C_α`` panel; the lm-eval results files go to ``<out_dir>/wintie/``.

    Args:
        models: row label -> exported student folder (experts, uniform merge, learned merge, generalist).
        domains: column label -> data sources of that domain (as in ``data.sources``).
        teacher: the teacher (any ``TeacherSpec`` name) whose top-k the KL term uses and whose tokenizer
            tokenises the data.
        out_dir: folder for ``merge_report.md``, ``merge_report.json`` and ``merge_report.png``.
        seq_len: tokens per evaluation block.
        blocks: at most this many held-out blocks per domain, evenly spaced over the ``heldout`` split
            (never trained on).
        batch_size: blocks per forward pass.
        ce_weight: CE weight of the reported KD loss.
        kl_weight: KL weight of the reported KD loss.
        top_k: teacher tokens kept per position.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        cache_dir: token cache folder of the data module.
        suite: Win-and-Tie suite (YAML path or name under ``configs/eval``, e.g. ``quick``); None: no
            Win-and-Tie columns (held-out KD loss and perplexity only).
        limit: items per suite task (the first N); None: the suite's limit; 0: full sets.
        eval_batch_size: lm-eval requests per forward pass.
        eval_cache_dir: cache root of rendered tasks and teacher scores; None: ``~/.cache/lit_xdistill``.
    """
    from ..models import student_from_teacher
    from .losses import topk_logprobs

    if suite is not None and "wintie" in domains:
        raise ValueError("a domain may not be called 'wintie' when a suite is given (the JSON key is taken)")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    spec = TeacherSpec(teacher, dtype="float32")
    loaded_suite = None
    if suite is not None:
        from ..eval.harness import effective_limit, task_manager
        from ..eval.tasks import load_suite

        loaded_suite = load_suite(suite)
        task_manager(loaded_suite, eval_cache_dir)  # unknown tasks or missing data fail before any model runs
        limit = effective_limit(loaded_suite, limit)
    live = student_from_teacher(spec.load_model(), spec.identity, mixer="attention").to(dev).eval()
    data, teacher_ppl = {}, {}
    for domain, sources in domains.items():
        batches = _heldout_batches(spec, sources, seq_len, blocks, batch_size, cache_dir)
        topk, ce, tokens = [], 0.0, 0
        for b in batches:
            with torch.no_grad():
                logits = live(**{k: b[k].to(dev) for k in ("input_ids", "segment_ids", "position_ids")}).logits
                own = kd_loss(logits, b["labels"].to(dev), None, None, 1.0, 0.0)
            ce, tokens = ce + own.ce.item() * int(own.tokens), tokens + int(own.tokens)
            topk.append(topk_logprobs(logits, top_k))
        data[domain], teacher_ppl[domain] = (batches, topk), math.exp(ce / tokens)
    del live
    teacher_json = None
    if loaded_suite is not None:
        from ..eval.harness import teacher_results

        teacher_json = teacher_results(spec, loaded_suite, limit, eval_batch_size, dev, eval_cache_dir)
        (Path(out_dir) / "wintie").mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "wintie" / "teacher.json").write_text(json.dumps(teacher_json, indent=2))
    results: dict[str, dict] = {}
    for label, path in models.items():
        model = XDistillForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
        if model.config.teacher_identity != spec.identity:
            raise MergeCompatibilityError(
                f"model {label} ({path}) was distilled from "
                f"{model.config.teacher_identity!r}, not from {spec.identity!r}"
            )
        results[label] = {d: _evaluate(model, b, t, dev, ce_weight, kl_weight) for d, (b, t) in data.items()}
        if loaded_suite is not None:
            results[label]["wintie"] = _suite_wintie(
                model, path, spec, loaded_suite, teacher_json, limit, eval_batch_size, eval_cache_dir,
                Path(out_dir) / "wintie" / f"{_slug(label)}.json",
            )
        del model
    return _write_report(results, list(domains), Path(out_dir), teacher, seq_len, blocks, teacher_ppl,
                         ce_weight, kl_weight)


def _suite_wintie(
    model: XDistillForCausalLM,
    path: str,
    spec: TeacherSpec,
    suite,
    teacher_json: dict,
    limit: int | None,
    batch_size: int,
    cache_dir: str | None,
    results_file: Path,
) -> dict:
    """Evaluate one model on the suite (lm-eval), save its results file and compare it with the teacher."""
    from ..eval.commands import compare_results, student_tokenizer
    from ..eval.harness import run_suite

    tokenizer = student_tokenizer(path, spec)
    student_json = run_suite(model, tokenizer, suite, limit, batch_size, cache_dir)
    results_file.write_text(json.dumps(student_json, indent=2))
    return _wintie_summary(compare_results(teacher_json, student_json, suite=suite), suite.name, limit)


def _write_report(
    results: dict[str, dict],
    domains: list[str],
    out: Path,
    teacher: str,
    seq_len: int,
    blocks: int,
    teacher_ppl: dict[str, float] | None = None,
    ce_weight: float = 0.9,
    kl_weight: float = 0.1,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    wintie = {label: row["wintie"] for label, row in results.items() if "wintie" in row}
    extra = " C_0 | α* |" if wintie else ""
    head = "| model | " + " | ".join(f"{d} KD loss | {d} ppl" for d in domains) + " | mean KD loss |" + extra
    lines = [
        f"# Merge report\n\nTeacher `{teacher}`; held-out split, up to {blocks} blocks of {seq_len} "
        f"tokens per domain; KD loss = {ce_weight:g} CE + {kl_weight:g} top-k KL (lower is better).\n",
        head,
        "|---|" + "---:|" * (2 * len(domains) + 1 + (2 if wintie else 0)),
    ]
    for label, row in results.items():
        cells = " | ".join(f"{row[d][0]:.4f} | {row[d][1]:.2f}" for d in domains)
        line = f"| {label} | {cells} | {sum(row[d][0] for d in domains) / len(domains):.4f} |"
        if label in wintie:
            star = wintie[label]["alpha_star"]
            line += f" {wintie[label]['C_0']:.2f} | {'n/a' if star is None else f'{star:.2f}'} |"
        lines.append(line)
    if teacher_ppl:
        lines += ["", "Teacher held-out perplexity: " + ", ".join(f"{d} {p:.2f}" for d, p in teacher_ppl.items())
                  + "."]
    if wintie:
        first = next(iter(wintie.values()))
        tasks = first["tasks"]
        lines += [
            "",
            f"Win-and-Tie on suite `{first['suite']}` ({first['limit']} items per task; C_0: fraction of tasks "
            "won or tied at α = 0, α*: smallest α with C_α >= 0.5, lower is better). Per task: score "
            "(recovery S/T).",
            "",
            "| task | metric | teacher | " + " | ".join(wintie) + " |",
            "|---|---|---:|" + "---:|" * len(wintie),
        ]
        for task, entry in tasks.items():
            cells = []
            for summary in wintie.values():
                t = summary["tasks"][task]
                rec = "n/a" if t["recovery"] is None else f"{t['recovery']:.2f}"
                cells.append(f"{t['student']:.3f} ({rec})")
            lines.append(f"| {task} | {entry['metric']} | {entry['teacher']:.3f} | " + " | ".join(cells) + " |")
    (out / "merge_report.md").write_text("\n".join(lines) + "\n")
    (out / "merge_report.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, domains, wintie, out / "merge_report.png", teacher_ppl or {}, ce_weight)
    return out / "merge_report.md"


def _plot(
    results: dict[str, dict], domains: list[str], wintie: dict[str, dict], path: Path, teacher_ppl: dict[str, float],
    ce_weight: float,
) -> None:
    """One panel per domain (held-out KD loss per model, own y-range, values, teacher line), plus ``C_α``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    colors = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    panels = len(domains) + (1 if wintie else 0)
    fig, axes = plt.subplots(1, panels, figsize=(0.9 + 3.2 * panels, 4.2), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        values = [results[label][domain][0] for label in labels]
        bars = ax.bar(range(len(labels)), values, color=[colors[label] for label in labels])
        teacher = ce_weight * math.log(teacher_ppl[domain]) if domain in teacher_ppl else None  # KL(T || T) = 0
        span = values + ([teacher] if teacher is not None else [])
        low, high = min(span), max(span)
        pad = max(high - low, 1e-3 * max(abs(high), 1.0))
        ax.set_ylim(low - 0.6 * pad, high + 0.4 * pad)  # differences between models are small: zoom in
        ax.bar_label(bars, [f"{v:.3f}" for v in values], fontsize=7, rotation=90, padding=2)
        ax.set_xticks([])
        if teacher is not None:
            ax.axhline(teacher, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{domain}: held-out KD loss", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("KD loss (lower is better)")
    if wintie:
        ax = axes[0][-1]
        for i, (label, summary) in enumerate(wintie.items()):
            alphas = [float(a) for a in summary["coverage"]]
            star = summary["alpha_star"]
            name = f"{label} (α* {'n/a' if star is None else f'{star:.2f}'})"
            shift = 0.01 * (i - (len(wintie) - 1) / 2)  # equal curves would hide each other
            values = [c + shift for c in summary["coverage"].values()]
            ax.step(alphas, values, where="post", color=colors[label], label=name)
        ax.axhline(0.5, color="black", linestyle="--", linewidth=1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("relative tolerance α")
        ax.set_ylabel("C_α (fraction of tasks won or tied)")
        ax.set_title(f"Win-and-Tie, suite {next(iter(wintie.values()))['suite']}\n(curves ±0.01 apart)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[label]) for label in labels]
    names = list(labels)
    if teacher_ppl:
        handles.append(plt.Line2D([], [], color="black", linestyle="--", linewidth=1))
        names.append(f"teacher ({ce_weight:g} CE; KL 0)" + ("; C_α = 0.5" if wintie else ""))
    fig.legend(handles, names, loc="lower center", ncol=len(names) if len(names) <= 8 else 4, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
