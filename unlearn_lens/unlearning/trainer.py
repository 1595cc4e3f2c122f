"""The training loop (accelerate: one process, DDP or FSDP alike) and the run's outputs.

``train(config)`` reads the data, loads the model, evaluates it, unlearns and evaluates again;
``save_run(result)`` writes ``OUT/model`` (merged when LoRA), ``config.json``,
``train_log.csv`` and ``eval.json`` into a temporary sibling, renames it into place and writes
the ``COMPLETE`` marker last. ``run_unlearning`` does both.

Data order is a seeded permutation per epoch laid out as one stream; accelerate shards the
stream by batch across processes, so N processes with batch B see exactly the examples one
process with batch N*B sees. The LR schedule steps once per optimizer step whatever the number
of processes. Dropout stays off (the model runs in eval mode) unless ``train_dropout``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_lens.core import outputs
from unlearn_lens.core.atomic import atomic_dir
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.outputs import RUN_MARKER
from unlearn_lens.unlearning.config import METHODS, REFERENCE_METHODS, UnlearnConfig

LOG_COLUMNS = ["step", "loss", "forget_loss", "retain_loss", "lr", "grad_norm", "eval_forget_nll",
               "eval_retain_nll"]


def is_complete(outdir: str | Path) -> bool:
    """True when ``outdir`` holds a finished run (its marker is written last)."""
    return outputs.is_complete(outdir)


@dataclass
class RunData:
    forget_train: list[str]
    forget_eval: list[str]
    retain_train: list[str]
    retain_eval: list[str]
    mcq: list
    data_hash: str
    retain_mcq: list = field(default_factory=list)  # retain-set questions (retain_mcq.jsonl), where the data has them
    value_spans: dict = field(default_factory=dict)  # a testbed's text -> values' spans (forget_value_nll)


@dataclass
class TrainResult:
    """Everything ``save_run`` needs; ``model`` is unwrapped (a PEFT model, unmerged, under LoRA)."""

    config: UnlearnConfig
    model: Any
    tokenizer: Any
    accelerator: Any
    prepared_model: Any
    log: list[dict] = field(default_factory=list)
    reference: Any = None
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    resolved: dict = field(default_factory=dict)


# --- data ---------------------------------------------------------------------------------

def _split(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, eval): a seeded random ``fraction`` held out (at least one text when > 0)."""
    import numpy as np

    if fraction <= 0 or len(texts) < 2:
        return list(texts), []
    order = np.random.RandomState(seed).permutation(len(texts))
    n_eval = min(len(texts) - 1, max(1, int(round(fraction * len(texts)))))
    held = set(order[:n_eval].tolist())
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def _data_hash(data_dir: Path) -> str:
    """The data directory's content hash, by the same rule as ``capture`` (manifest, else the files)."""
    from unlearn_lens import data as data_module

    return data_module.data_hash(data_dir)


def load_run_data(cfg: UnlearnConfig) -> RunData:
    """Read and split the texts; ``UserError`` for a missing or empty split."""
    from unlearn_lens import data as data_module
    from unlearn_lens import testbed

    data_dir = Path(cfg.data)
    if not data_dir.is_dir():
        raise UserError(f"{cfg.data}: no such data directory (create one with `unlearn-lens datasets create`)")
    forget = data_module.read_texts(data_dir, "forget")
    retain = data_module.read_texts(data_dir, "retain")
    mcq = data_module.read_mcq(data_dir) if (data_dir / data_module.FILES["wmdp"]).is_file() else []
    forget_train, forget_eval = _split(forget, cfg.eval_split, cfg.seed)
    retain_train, retain_eval = _split(retain, cfg.eval_split, cfg.seed + 1)
    if cfg.max_samples:
        forget_train, retain_train = forget_train[: cfg.max_samples], retain_train[: cfg.max_samples]
    if mcq:
        data_module.warn_if_contaminated(forget_train + retain_train, mcq)
    return RunData(forget_train, forget_eval, retain_train, retain_eval, mcq, _data_hash(data_dir),
                   data_module.read_retain_mcq(data_dir), testbed.value_spans(data_dir))


def _stream(texts: list[str], length: int, seed: int) -> list[str]:
    """``length`` texts: seeded permutations of ``texts`` (one per epoch), concatenated."""
    import numpy as np

    rng = np.random.RandomState(seed)
    out: list[str] = []
    while len(out) < length:
        out.extend(texts[i] for i in rng.permutation(len(texts)))
    return out[:length]


def _loader(texts: list[str], tokenizer, batch_size: int, max_length: int):
    from torch.utils.data import DataLoader

    def collate(batch: list[str]):
        encoded = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    return DataLoader(texts, batch_size=batch_size, shuffle=False, drop_last=True, collate_fn=collate)


# --- optimisation -------------------------------------------------------------------------

def make_optimizer(cfg: UnlearnConfig, params):
    import torch

    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False,
                     weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class Precision:
    """How a run trains and saves: ``load`` dtype of the trained weights (float32 master weights
    whenever the requested dtype is 16-bit), ``autocast`` of the forwards, ``save`` dtype."""

    load: str
    autocast: str
    save: str


def precision(cfg: UnlearnConfig) -> Precision:
    """float32 master weights for 16-bit runs: an update of ~1e-5 rounds away in bfloat16 for
    any |w| > ~0.004, so 16-bit training loads float32, autocasts the forwards to the requested
    16-bit type (accelerate mixed precision) and saves in the requested dtype."""
    import torch

    from unlearn_lens.loading import torch_dtype

    device = "cpu" if cfg.device == "cpu" or not torch.cuda.is_available() else "cuda"
    wanted = torch_dtype(cfg.dtype, device)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[wanted]
    if name == "float32":
        return Precision("float32", cfg.mixed_precision, "float32")
    autocast = cfg.mixed_precision if cfg.mixed_precision != "no" else {"bfloat16": "bf16", "float16": "fp16"}[name]
    return Precision("float32", autocast, name)


def _accelerator(cfg: UnlearnConfig, mixed_precision: str):
    """One Accelerator per run; DDP looks for unused parameters only where blocks after the
    target layer (and the unembedding) get no gradient: the representation methods."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise UserError(f"unknown --device {cfg.device!r}; use auto, cpu or cuda")
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision", mixed_precision) != mixed_precision:
        # a later run of this process (unlearn-all, the demo, tests) with another precision: the
        # process group (PartialState) is kept, only the precision setting is dropped
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cfg.device == "cpu", mixed_precision=mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           find_unused_parameters=METHODS[cfg.method][0] == "representation")])


def _check_wandb(cfg: UnlearnConfig):
    import os

    if not cfg.wandb:
        return None
    if not os.environ.get("WANDB_API_KEY"):
        raise UserError("--wandb needs WANDB_API_KEY in the environment (or in .env)")
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None
    return wandb


def _select_trainable(cfg: UnlearnConfig, model, adapter) -> list[str]:
    """Freeze everything outside ``--update-roles`` / ``--update-layers`` (selected by name)."""
    if cfg.update_roles is None and cfg.update_layers is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    selected = set(adapter.parameter_names(roles=set(cfg.update_roles) if cfg.update_roles else None,
                                           layers=set(cfg.update_layers) if cfg.update_layers else None))
    if not selected:
        raise UserError(f"--update-roles {cfg.update_roles} / --update-layers {cfg.update_layers} select no "
                        "parameter of this model")
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected)
    return sorted(selected)


#: methods whose loss reads only hidden states up to the last target layer (no logits).
HIDDEN_STATE_METHODS = frozenset({"rmu", "cb", "cb_lat"})


def _freeze_beyond_targets(cfg: UnlearnConfig, model, adapter) -> int:
    """Freeze the blocks after the last target layer, the final norm and the unembedding.

    A hidden-state loss gives them exactly zero gradient, so this changes no update (and keeps
    weight decay from shrinking them); it lets DDP see every trainable parameter used. The
    embedding stays trainable (tied unembeddings are the same tensor).
    """
    last = max(cfg.target_layers)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen = set(adapter.parameter_names(layers=set(range(last + 1, adapter.num_layers))))
    frozen |= set(adapter.parameter_names(roles={"final_norm", "unembed"}))
    for name, param in base.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("no trainable parameter left at or before the target layer(s)")
    return last


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    from unlearn_lens import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "peft": peft.__version__, "unlearn_lens": __version__}


# --- the loop ------------------------------------------------------------------------------

def train(cfg: UnlearnConfig, *, progress: bool = True) -> TrainResult:
    """Unlearn ``cfg.model`` with ``cfg.method``; every input check happens before training."""
    import torch
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    from unlearn_lens.architectures import ArchitectureAdapter
    from unlearn_lens.evaluation import evaluate, mean_token_nll
    from unlearn_lens.loading import load_model
    from unlearn_lens.unlearning import methods as M
    from unlearn_lens.unlearning.lora import resolve_targets, rule_of, wrap_lora

    cfg.validate()
    wandb = _check_wandb(cfg)
    data = load_run_data(cfg)
    prec = precision(cfg)
    accelerator = _accelerator(cfg, prec.autocast)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and cfg.lora:
        raise UserError("--lora under FSDP is not supported (adapters are small: launch with the DDP config)")
    set_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, revision=cfg.revision, dtype=prec.load, device=str(accelerator.device),
                                  trust_remote_code=cfg.trust_remote_code)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # batches are right-padded (positions start at 0)
    adapter = ArchitectureAdapter(model)
    cfg.resolve_layers(adapter.num_layers)
    lora_targets = resolve_targets(model, adapter.family, cfg.lora_targets) if cfg.lora else None
    world = accelerator.num_processes
    per_step = cfg.batch_size * cfg.grad_accum_steps * world
    for name, texts in (("forget", data.forget_train), ("retain", data.retain_train)):
        if not texts:
            raise UserError(f"no {name} training texts left after --eval-split {cfg.eval_split}")
    total_steps = cfg.steps or (cfg.epochs or 1) * math.ceil(len(data.forget_train) / per_step)
    warmup_steps = cfg.warmup_steps
    if cfg.warmup_epochs is not None:  # open-unlearning: int(warmup_epochs * n_forget // effective batch)
        warmup_steps = int((cfg.warmup_epochs * len(data.forget_train)) // per_step)
    run_steps = min(total_steps, cfg.stop_after or total_steps)  # --stop-after: the first steps of the run
    eval_every = cfg.eval_every or max(1, run_steps // 5)
    eval_options = {"max_length": cfg.max_length, "batch_size": cfg.eval_batch_size, "device": accelerator.device}

    eval_before = evaluate(model, tokenizer, forget_texts=data.forget_eval, retain_texts=data.retain_eval,
                           mcq_items=data.mcq, retain_mcq_items=data.retain_mcq,
                           value_spans=data.value_spans, **eval_options)

    resolved: dict[str, Any] = {"total_steps": total_steps, "run_steps": run_steps, "world_size": world,
                                "distributed_type": str(accelerator.distributed_type.value),
                                "effective_batch_size": per_step, "eval_every": eval_every,
                                "warmup_steps": warmup_steps,
                                "train_weights_dtype": str(model.dtype).replace("torch.", ""),
                                "autocast": prec.autocast if getattr(accelerator, "native_amp", True) else "no",
                                "saved_dtype": prec.save,
                                "family": adapter.family, "num_layers": adapter.num_layers,
                                "n_forget_train": len(data.forget_train), "n_retain_train": len(data.retain_train),
                                "n_forget_eval": len(data.forget_eval), "n_retain_eval": len(data.retain_eval),
                                "n_questions": len(data.mcq), "data_hash": data.data_hash,
                                "adversary_layers": cfg.adversary_layers if cfg.method in ("lat", "cb_lat") else None}
    hidden_size = int(model.config.hidden_size)
    reference = None
    if cfg.method in REFERENCE_METHODS and not cfg.lora:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        # under the same autocast as the trained forwards: at step 0 policy == reference exactly
        reference = M.Reference(frozen, ArchitectureAdapter(frozen), autocast=accelerator.autocast)
    if cfg.method == "wt_dist":
        resolved["weight_noise_std"] = M.add_weight_noise(model, cfg.wt_noise_std, cfg.seed)
    if cfg.lora:
        if cfg.update_roles is not None or cfg.update_layers is not None:
            accelerator.print("note: --update-roles/--update-layers do not apply under --lora (adapters train)")
        model = wrap_lora(model, adapter.family, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=lora_targets,
                          dropout=cfg.lora_dropout)
        adapter = ArchitectureAdapter(model.get_base_model())
        resolved["lora_targets"] = lora_targets
        resolved["lora_target_rule"] = rule_of(cfg.lora_targets)
        if cfg.method in REFERENCE_METHODS:
            reference = M.Reference(model, adapter, disable=model.disable_adapter, autocast=accelerator.autocast)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        trainable = _select_trainable(cfg, model, adapter)
    if cfg.method in HIDDEN_STATE_METHODS:
        resolved["frozen_beyond_layer"] = _freeze_beyond_targets(cfg, model, adapter)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    resolved["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    resolved["trainable_tensors"] = len(trainable)
    if len(trainable) <= 64:
        resolved["trainable_parameter_names"] = trainable
    model.train(cfg.train_dropout)

    forget_loader = _loader(_stream(data.forget_train, total_steps * per_step, cfg.seed), tokenizer,
                            cfg.batch_size, cfg.max_length)
    retain_loader = _loader(_stream(data.retain_train, total_steps * per_step, cfg.seed + 1), tokenizer,
                            cfg.batch_size, cfg.max_length)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: M.L.cosine_schedule(s, total_steps, warmup_steps, cfg.lr_scheduler))
    # model and optimizer together: under FSDP accelerate re-points the optimizer at the shards
    prepared, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in prepared.parameters() if p.requires_grad]
    forget_loader, retain_loader = accelerator.prepare(forget_loader, retain_loader)
    # sharded parameters only exist inside the FSDP wrapper: run every forward through it there
    plain = prepared if fsdp else accelerator.unwrap_model(prepared)
    # DDP must see whole forward passes (its reducer is armed when forward returns): no early stop
    ctx = M.MethodContext(cfg, prepared, adapter, total_steps, reference, plain_model=plain, hidden_size=hidden_size,
                          early_stop=world == 1, sharded=fsdp, tokenizer=tokenizer)
    method = M.build_method(ctx)
    resolved["loss_weights"] = method.loss_weights()

    run = None
    if wandb is not None and accelerator.is_main_process:
        run = wandb.init(project=cfg.wandb_project, config=cfg.to_dict())
    log: list[dict] = []
    forget_iter, retain_iter = iter(forget_loader), iter(retain_loader)
    bar = tqdm(range(run_steps), desc=f"unlearn {cfg.method}", disable=not (progress and accelerator.is_main_process))
    for step in bar:
        sums: dict[str, float] = {}
        lr = scheduler.get_last_lr()[0]
        for _ in range(cfg.grad_accum_steps):
            forget_batch, retain_batch = next(forget_iter), next(retain_iter)
            loss, metrics = method.loss(forget_batch, retain_batch, step)
            accelerator.backward(loss / cfg.grad_accum_steps)
            for key, value in {"loss": float(loss.detach()), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum_steps
        if cfg.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.norm(torch.stack([p.grad.detach().norm() for p in params if p.grad is not None]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        keys = sorted(sums)
        reduced = accelerator.reduce(torch.tensor([sums[k] for k in keys], device=accelerator.device), "mean")
        row = {"step": step + 1, **dict(zip(keys, reduced.tolist())), "lr": lr, "grad_norm": float(grad_norm)}
        if (step + 1) % eval_every == 0 or step + 1 == run_steps:
            row["eval_forget_nll"] = mean_token_nll(prepared, tokenizer, data.forget_eval, **eval_options)
            row["eval_retain_nll"] = mean_token_nll(prepared, tokenizer, data.retain_eval, **eval_options)
        log.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if run is not None:
            run.log(row, step=step + 1)

    eval_after = evaluate(prepared, tokenizer, forget_texts=data.forget_eval, retain_texts=data.retain_eval,
                          mcq_items=data.mcq, retain_mcq_items=data.retain_mcq,
                          value_spans=data.value_spans, **eval_options)
    tokenizer.padding_side = padding_side  # the saved tokenizer keeps the base model's setting
    if run is not None:
        run.summary.update({f"after/{k}": v for k, v in eval_after.items()})
        run.finish()
    return TrainResult(cfg, accelerator.unwrap_model(prepared), tokenizer, accelerator, prepared, log,
                       reference, eval_before, eval_after, resolved)


# --- outputs -------------------------------------------------------------------------------

def _write_log(path: Path, log: list[dict]) -> None:
    extras = sorted({k for row in log for k in row} - set(LOG_COLUMNS))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS + extras, restval="")
        writer.writeheader()
        writer.writerows(log)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _to_dtype(tensor, dtype_name: str):
    """Floating tensors at ``dtype_name``; integer buffers unchanged."""
    import torch

    return tensor.to(getattr(torch, dtype_name)) if tensor.is_floating_point() else tensor


def check_outdir(cfg: UnlearnConfig) -> None:
    """Refuse to redo a finished run unless ``--overwrite`` (checked before any work)."""
    if is_complete(cfg.outdir) and not cfg.overwrite:
        raise UserError(f"{cfg.outdir} already holds a finished run; pass --overwrite to redo it")


def save_run(result: TrainResult) -> Path:
    """Write the run atomically: temp sibling, rename into place, ``COMPLETE`` marker last."""
    from accelerate.utils import DistributedType

    from unlearn_lens.unlearning.lora import merge

    cfg, accelerator = result.config, result.accelerator
    out = Path(cfg.outdir)
    accelerator.wait_for_everyone()
    state_dict = None
    save_dtype = result.resolved.get("saved_dtype", "float32")
    if cfg.lora:
        final = merge(result.model)
    else:
        final = result.model
        if accelerator.distributed_type == DistributedType.FSDP:
            state_dict = accelerator.get_state_dict(result.prepared_model)  # gathered on the main process
            # FSDP2 on some devices hands back DTensors: gather them (a collective: every rank runs
            # this, in the same key order), and give each tensor its own storage for safetensors
            state_dict = {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
                          .contiguous() for name, value in (state_dict or {}).items()}
            state_dict = {name: _to_dtype(value, save_dtype) for name, value in state_dict.items()}
    if save_dtype != "float32":  # float32 master weights, saved at the requested dtype
        import torch

        final = final.to(getattr(torch, save_dtype))
    if accelerator.is_main_process:
        with atomic_dir(out) as tmp:
            final.config.name_or_path = f"{cfg.model} unlearned with {cfg.method}"
            final.save_pretrained(tmp / "model", state_dict=state_dict)
            result.tokenizer.save_pretrained(tmp / "model")
            record = {"config": cfg.to_dict(), "resolved": result.resolved, "method_kind": METHODS[cfg.method][0],
                      "data_manifest_hash": result.resolved.get("data_hash"), "seed": cfg.seed,
                      "versions": versions(), "command": sys.argv, "finished_utc": time.strftime(
                          "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / "config.json").write_text(json.dumps(_json_safe(record), indent=2))
            _write_log(tmp / "train_log.csv", result.log)
            (tmp / "eval.json").write_text(json.dumps(_json_safe(
                {"before": result.eval_before, "after": result.eval_after,
                 "scorings": {"letter": "lm-eval wmdp_bio zero-shot letter logits",
                              "cloze": "mean log-prob of each choice given the question"}}), indent=2))
        outputs.mark_complete(out, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n", RUN_MARKER)
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        # tear the process group down while every rank is still alive: left to interpreter exit,
        # gloo's worker threads can be destroyed joinable, and a rank dies with SIGABRT after a
        # finished run ("terminate called without an active exception")
        accelerator.end_training()
    return out


def run_unlearning(cfg: UnlearnConfig, *, progress: bool = True) -> Path:
    """Validate, train, evaluate and save one run; returns the output directory."""
    cfg.validate()
    check_outdir(cfg)
    return save_run(train(cfg, progress=progress))
