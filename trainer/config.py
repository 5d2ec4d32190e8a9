"""RUN.yaml as dataclasses: one per component, each field documented, every problem reported at once.

`cpt.shared.config.load_config(RunConfig, path, overrides)` builds it and lists every unknown key,
wrong type and `problems()` entry together. `RunConfig.problems()` also checks the filesystem (model
folder, eval sets, reference, Fisher file) and the shards' tokenizer, so a run with a mistake stops
before any model weights are loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cpt.trainer.adapters import PeftConfig
from cpt.trainer.data import DataConfig, SourceConfig
from cpt.trainer.schedules import SCHEDULES


@dataclass
class TrainConfig:
    """Optimizer, schedule, batch and precision."""

    max_steps: int | None = None
    """Optimizer steps to run. Give exactly one of max_steps and max_tokens."""
    max_tokens: int | None = None
    """Tokens to train on (all ranks); converted to steps of micro_batch_size * grad_accum * world * seq_len."""
    micro_batch_size: int = 8
    """Sequences per forward pass per rank."""
    grad_accum: int = 4
    """Micro-batches per optimizer step (global batch = micro_batch_size * grad_accum * world size)."""
    lr: float = 2.0e-5
    """Peak learning rate (CPT: 1/10 to 1/5 of the base model's pre-training peak)."""
    min_lr_ratio: float = 0.1
    """cosine and wsd decay to min_lr_ratio * lr at the last step."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up linearly to lr."""
    lr_schedule: str = "cosine"
    """cosine | wsd (warmup-stable-decay) | constant (after warmup)."""
    decay_ratio: float = 0.1
    """wsd only: fraction of the steps (at the end) spent decaying linearly to min_lr_ratio * lr."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay; never applied to norms and biases (1-D parameters)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1.0e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: fp32 on CPU, bf16 on GPU (autocast; under FSDP2 a MixedPrecisionPolicy: bf16 gathered parameters,
    fp32 gradient reduction). Master weights, gradients and optimizer state stay fp32 either way."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available. Under torchrun each rank uses cuda:LOCAL_RANK."""
    compile: bool = False
    """torch.compile the training forward."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (HF gradient_checkpointing_enable): less memory, ~30% slower."""
    loss_chunk_size: int = 256
    """Sequence positions per LM-head chunk; logits are recomputed in backward, so peak logit memory is
    micro_batch_size * loss_chunk_size * vocab per model."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2 fully_shard (per decoder layer) instead of DDP.
    The model is built on the meta device and each rank reads only its shards of the weights."""
    fsdp_reduce_every_micro_batch: bool = True
    """FSDP: reduce-scatter gradients after every micro-batch, so a rank only holds its gradient shard. false:
    only after the last one (fewer collectives; every rank then holds full fp32 gradients, +4 bytes/param)."""
    dist_timeout_s: int = 3600
    """Seconds a rank waits in a collective (e.g. on the barrier while a checkpoint is written) before failing."""
    max_nonfinite_in_a_row: int = 5
    """A step with a NaN/inf loss or gradient norm is skipped and counted; this many in a row stop the run."""
    log_every_steps: int = 1
    """Write a metrics.jsonl / TensorBoard line every N steps (eval steps are always written)."""
    peft: PeftConfig | None = None
    """LoRA CPT through peft ({method: lora, r, alpha, dropout, target_modules, train_embeddings,
    embedding_lr_ratio}); null = train every weight."""

    def problems(self) -> list[str]:
        found = []
        if self.peft is not None and self.fsdp:
            found.append("peft: LoRA runs on one process or under DDP, not with fsdp: true (set fsdp: false)")
        if (self.max_steps is None) == (self.max_tokens is None):
            found.append("max_steps / max_tokens: give exactly one of them")
        for key in ("max_steps", "max_tokens", "micro_batch_size", "grad_accum", "loss_chunk_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                found.append(f"{key}: must be a positive integer, got {value!r}")
        if self.lr_schedule not in SCHEDULES:
            found.append(f"lr_schedule: {self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not (isinstance(self.lr, float) and self.lr > 0 and math.isfinite(self.lr)):
            found.append(f"lr: must be a positive finite number, got {self.lr!r}")
        for key in ("min_lr_ratio", "warmup_ratio", "decay_ratio"):
            value = getattr(self, key)
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                found.append(f"{key}: must be in [0, 1], got {value}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            found.append("weight_decay and max_grad_norm must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            found.append(f"betas: give two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.dist_timeout_s, int) or self.dist_timeout_s < 1:
            found.append(f"dist_timeout_s: must be a positive number of seconds, got {self.dist_timeout_s!r}")
        if self.max_nonfinite_in_a_row < 1 or self.log_every_steps < 1:
            found.append("max_nonfinite_in_a_row and log_every_steps must be >= 1")
        return found


@dataclass
class KLConfig:
    """KL(p_ref || p_model) per token against a frozen reference model."""

    weight: float = 0.0
    """lambda; 0 disables KL (no reference model is loaded)."""
    reference: str | None = None
    """HF model folder of the reference; null = the initial model (`model:`), frozen."""
    on: Literal["replay", "all"] = "replay"
    """replay: only tokens of sources other than the domain source (`domain:`); all: every token."""


@dataclass
class EWCConfig:
    """Elastic weight consolidation: (weight / 2) * sum F (theta - theta*)^2 with a per-token diagonal Fisher F.

    F is a mean over tokens, so (lambda / 2) sum F (dtheta)^2 is, to second order, the rise of the per-token
    NLL on the Fisher's text: weight 1 trades one nat of general loss for one nat of domain loss. Sweep
    weight over 1, 10, 100, 1000 and watch general_ppl (the quadratic model holds only near theta*).
    Memory: two extra fp32 copies of the trainable parameters (F and theta*), sharded under FSDP.
    """

    weight: float = 0.0
    """lambda; 0 disables EWC."""
    fisher: Literal["empirical", "true"] = "empirical"
    """empirical: gradients of the text's own next tokens; true: of labels sampled from the model (+1 forward)."""
    fisher_samples: int = 256
    """Sequences of general text the Fisher is estimated from (fewer if the source has fewer), drawn at random
    (seed: the run's seed) from the whole source."""
    source: str | None = None
    """Data source or eval set name to estimate F on; null = the first non-domain source, else eval set general."""
    fisher_path: str | None = None
    """Reuse this Fisher (safetensors); null = estimate it and save it as output_dir/ewc_fisher.safetensors."""


@dataclass
class RegularizationConfig:
    """Forgetting mitigation besides replay (replay and curriculum live in `data:`)."""

    kl: KLConfig = field(default_factory=KLConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)


@dataclass
class EvalConfig:
    """Perplexity on named held-out sets, at step 0 and every `every_steps`."""

    every_steps: int = 100
    """Evaluate every N optimizer steps (and at step 0 and at the end)."""
    max_sequences: int = 64
    """Fixed sequences per set (the same ones every time)."""
    micro_batch_size: int | None = None
    """Sequences per eval forward; null = train.micro_batch_size."""
    sets: dict[str, str] = field(default_factory=dict)
    """name -> prepared dataset folder; `general` is the set the best-checkpoint constraint watches."""

    def problems(self) -> list[str]:
        found = []
        if self.every_steps < 1 or self.max_sequences < 1:
            found.append("every_steps and max_sequences must be >= 1")
        return found


@dataclass
class CheckpointConfig:
    """Atomic checkpoints, keep-last-N and best-by-metric."""

    every_steps: int = 100
    """Write output_dir/checkpoint-STEP every N optimizer steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept (oldest deleted first); best/ and final/ are separate and always kept."""
    best_metric: str | None = "domain_ppl"
    """<eval set>_ppl to minimise for output_dir/best/; null = no best/."""
    max_general_ppl_increase: float | None = 0.05
    """best/ only accepts steps whose general_ppl <= (1 + this) * step-0 general_ppl; null = no constraint."""
    branch_before_decay: bool = False
    """wsd: also save output_dir/stable-checkpoint-STEP/ after the last stable step (never pruned), the state
    a cooldown branch starts from (`cpt train --from-checkpoint DIR --set data.anneal...`)."""
    async_save: bool = False
    """Write checkpoint-STEP's model/optimizer shards in a background thread (dcp.async_save); training goes on."""
    export_dtype: Literal["fp32", "bf16"] = "fp32"
    """dtype of the weights in best/ and final/ (HF folders; checkpoint-STEP/ always keeps fp32)."""

    def problems(self) -> list[str]:
        found = []
        if self.every_steps < 1 or self.keep_last < 1:
            found.append("every_steps and keep_last must be >= 1")
        if self.export_dtype not in ("fp32", "bf16"):
            found.append(f"export_dtype: {self.export_dtype!r} is not one of fp32, bf16")
        if self.max_general_ppl_increase is not None and self.max_general_ppl_increase < 0:
            found.append(f"max_general_ppl_increase: must be >= 0, got {self.max_general_ppl_increase}")
        return found


@dataclass
class RunConfig:
    """A `cpt train` run (RUN.yaml)."""

    model: str = ""
    """Starting weights: an HF model folder (AutoModelForCausalLM.from_pretrained). Resume never changes it."""
    output_dir: str = ""
    """Checkpoints, best/, final/, metrics.jsonl, tensorboard/, report.png, data_trace.jsonl."""
    tokenizer: str | None = None
    """Tokenizer folder; null = the model's."""
    trust_remote_code: bool = False
    """Allow model code from the model folder (never by default)."""
    seed: int = 0
    """Seeds torch/python RNGs and the mixture's shuffles."""
    domain: str | None = None
    """The domain source's name; null = data.schedule.source, else the first source. Other sources are replay."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in (self.data.sources or []) if s is not None]

    @property
    def domain_source(self) -> str | None:
        """The rule, in one place: `domain`, else data.schedule.source, else the first source."""
        if self.domain:
            return self.domain
        if self.data.schedule is not None and self.data.schedule.source:
            return self.data.schedule.source
        names = self.source_names
        return names[0] if names else None

    def problems(self) -> list[str]:
        found = []
        if not self.model:
            found.append("model: required (an HF model folder with the starting weights)")
        if not self.output_dir:
            found.append("output_dir: required")
        elif "://" in self.output_dir:
            # Checkpoints are renamed into place with os.replace, which object stores do not offer.
            found.append(
                f"output_dir: {self.output_dir} is a URL; checkpoints need a local or mounted folder "
                "(e.g. gcsfuse / a shared filesystem), then sync it to the bucket"
            )
        for key, folder in (("model", self.model), ("tokenizer", self.tokenizer)):
            if folder and "://" in folder:
                found.append(f"{key}: {folder} is a URL; download the folder first (from_pretrained reads it locally)")
        if None in (self.data, self.train, self.regularization, self.eval, self.checkpoint):
            return found  # a section failed to build; its problems are already listed
        names = self.source_names
        if self.domain and self.domain not in names:
            found.append(f"domain: {self.domain!r} is not a data source name (sources: {names})")
        reg = self.regularization
        if reg.kl.weight < 0 or reg.ewc.weight < 0:
            found.append("regularization.kl.weight and regularization.ewc.weight must be >= 0")
        if reg.kl.weight > 0 and reg.kl.on == "replay" and len(names) < 2:
            found.append("regularization.kl.on: replay needs a replay source besides the domain source (or on: all)")
        if reg.ewc.weight > 0 and reg.ewc.fisher_path is None:
            source = reg.ewc.source
            if source is not None and source not in names and source not in self.eval.sets:
                found.append(f"regularization.ewc.source: {source!r} is neither a data source nor an eval set")
            replay = [n for n in names if n != self.domain_source]
            if source is None and not replay and "general" not in self.eval.sets:
                found.append("regularization.ewc: no general data for the Fisher; add a replay source")
        wsd = self.train.lr_schedule == "wsd"
        if self.data.anneal is not None and self.data.anneal.start == "decay" and not wsd:
            found.append("data.anneal.start: decay needs train.lr_schedule: wsd (or give a fraction of the run)")
        if self.checkpoint.branch_before_decay and not wsd:
            found.append("checkpoint.branch_before_decay: needs train.lr_schedule: wsd (a stable phase to branch)")
        metric = self.checkpoint.best_metric
        if metric is not None and metric.removesuffix("_ppl") not in self.eval.sets:
            choices = [f"{n}_ppl" for n in self.eval.sets]
            found.append(f"checkpoint.best_metric: {metric!r} names no eval set (choose one of {choices} or null)")
        if self.checkpoint.max_general_ppl_increase is not None and metric and "general" not in self.eval.sets:
            found.append("checkpoint.max_general_ppl_increase: needs eval.sets.general (or set it to null)")
        found += self.path_problems()
        return found

    def path_problems(self) -> list[str]:
        """Filesystem checks: model and reference folders, eval sets, the Fisher file, the shards' tokenizer."""
        from cpt.shared.dataset import MANIFEST
        from cpt.trainer.conventions import run_problems
        from cpt.trainer.data import check_sources

        found = []
        for key, folder in (("model", self.model), ("regularization.kl.reference", self.regularization.kl.reference)):
            if folder and not (Path(folder) / "config.json").is_file():
                found.append(f"{key}: {folder} is not a Hugging Face model folder (no config.json)")
        tokenizer_dir = self.tokenizer or self.model
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            found.append(f"tokenizer: {self.tokenizer} is not a folder")
        for name, path in self.eval.sets.items():
            if not has_manifest(path):
                found.append(f"eval.sets.{name}: {path} has no {MANIFEST}; give a folder written by `cpt prepare`")
        fisher = self.regularization.ewc.fisher_path
        if fisher and not Path(fisher).is_file():
            found.append(f"regularization.ewc.fisher_path: {fisher} does not exist (null = estimate it)")
        if tokenizer_dir and Path(tokenizer_dir).is_dir():
            # Only datasets that exist: the missing ones are already listed (by DataConfig and above).
            present = [s for s in self.data.stream_sources() if s.path and has_manifest(s.path)]
            present += [SourceConfig(f"eval.sets.{n}", p) for n, p in self.eval.sets.items() if has_manifest(p)]
            found += check_sources(DataConfig(seq_len=self.data.seq_len, sources=present), str(tokenizer_dir))
            if self.model and (Path(self.model) / "config.json").is_file():
                found += run_problems(
                    self.model, str(tokenizer_dir), self.data.seq_len, self.data.add_bos, self.trust_remote_code
                )
        return found


def has_manifest(path: str) -> bool:
    from cpt.shared.dataset import MANIFEST, filesystem, join

    fs, manifest = filesystem(join(path, MANIFEST))
    return fs.exists(manifest)


def yaml11_keys(node):
    """Undo YAML 1.1's reading of an unquoted key `on:` as the boolean True (so `kl: {on: replay}` works)."""
    if isinstance(node, dict):
        return {("on" if key is True else key): yaml11_keys(value) for key, value in node.items()}
    if isinstance(node, list):
        return [yaml11_keys(item) for item in node]
    return node


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """RUN.yaml + `section.key=value` overrides -> RunConfig; ConfigError lists every problem at once."""
    from cpt.shared.config import ConfigError, load_config, read_yaml

    data = yaml11_keys(read_yaml(path))
    try:
        return load_config(RunConfig, overrides=list(overrides), data=data)
    except ConfigError as err:
        raise ConfigError(err.problems, str(path)) from None
